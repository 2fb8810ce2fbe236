package vllm

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseAndCompare(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{
		{"0.10.1", "0.10.1", 0},
		{"0.10.1.post1", "0.10.1", 0},
		{"0.10.1+cu126", "0.10.1", 0},
		{"0.9.2", "0.10.1", -1},
		{"0.10.2rc1", "0.10.2", -1}, // a pre-release is not its release
		{"0.7.2.dev185+g1234abcd", "0.7.2", -1},
		{"0.7.3", "0.7.2.dev185", 1},
		{"v0.33.0", "0.24.0", 1},
		{"1.0", "0.33.0", 1},
		{"0.6", "0.6.0", 0},
	} {
		a, err := Parse(tc.a)
		if err != nil {
			t.Fatalf("Parse(%q): %v", tc.a, err)
		}
		b := MustParse(tc.b)
		if got := a.Compare(b); got != tc.want {
			t.Errorf("%s vs %s = %d, want %d", tc.a, tc.b, got, tc.want)
		}
		if a.String() != strings.TrimSpace(tc.a) {
			t.Errorf("String() = %q, want it as written %q", a.String(), tc.a)
		}
	}
	for _, bad := range []string{"", "vllm", "1", "0.10.x", "0.10.1-foo"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) succeeded", bad)
		}
	}
}

// TestFeatureTable: the releases docs/vllm.md cites, and what each version
// the tests play gets.
func TestFeatureTable(t *testing.T) {
	for _, tc := range []struct {
		version   string
		level     int // for sleep_level 2
		uuids     bool
		nested    bool
		isSleep   bool
		wakeTags  bool
		noteLevel string
	}{
		{"0.6.3", 0, false, false, false, false, "has no sleep mode"},
		{"0.7.2", 0, false, false, false, false, "has no sleep mode"},
		{"0.7.3", 1, false, false, false, false, "sleep_level 2 needs vLLM 0.10.2"},
		{"0.8.3", 1, false, false, true, true, "sleep_level 2 needs vLLM 0.10.2"},
		{"0.10.1", 1, false, true, true, true, "sleep_level 2 needs vLLM 0.10.2"},
		{"0.10.2", 2, false, true, true, true, ""},
		{"0.20.1", 2, false, true, true, true, ""},
		{"0.24.0", 2, true, true, true, true, ""},
		{"0.33.0", 2, true, true, true, true, ""},
	} {
		v := MustParse(tc.version)
		level, why := v.SleepLevel(2)
		if level != tc.level || (tc.noteLevel == "") != (why == "") || !strings.Contains(why, tc.noteLevel) {
			t.Errorf("%s: SleepLevel(2) = %d %q, want %d with %q", tc.version, level, why, tc.level, tc.noteLevel)
		}
		if got := v.Has(UUIDDevices); got != tc.uuids {
			t.Errorf("%s: UUIDs %v", tc.version, got)
		}
		if got := v.Has(NestedErrors); got != tc.nested {
			t.Errorf("%s: nested errors %v", tc.version, got)
		}
		if got := v.Has(IsSleeping); got != tc.isSleep {
			t.Errorf("%s: is_sleeping %v", tc.version, got)
		}
		if got := v.Has(WakeTags); got != tc.wakeTags {
			t.Errorf("%s: wake tags %v", tc.version, got)
		}
	}
	if l, why := MustParse("0.6.3").SleepLevel(1); l != 0 || why == "" {
		t.Errorf("0.6.3 at level 1: %d %q", l, why)
	}
	if l, why := MustParse("0.10.1").SleepLevel(1); l != 1 || why != "" {
		t.Errorf("0.10.1 at level 1: %d %q", l, why)
	}
	for i := 1; i < len(Features); i++ {
		if Features[i].Since.Compare(Features[i-1].Since) < 0 {
			t.Errorf("Features out of order at %s", Features[i].Name)
		}
	}
}

func TestInterpreter(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "venv", "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	write := func(name, content string) string {
		p := filepath.Join(bin, name)
		if err := os.WriteFile(p, []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
		return p
	}
	python := write("python3", "\x7fELF")
	vllmScript := write("vllm", "#!"+python+"\nimport sys\n")
	envScript := write("serve", "#!/usr/bin/env -S python3 -u\n")
	wrapper := write("wrapper.sh", "#!/bin/sh\nexec python3 \"$@\"\n")
	binary := write("fake", "\x7fELF...")
	path := bin + ":/usr/bin:/bin"
	for _, tc := range []struct {
		name    string
		command []string
		want    string
		err     string
	}{
		{"the interpreter itself", []string{python, "-m", "vllm.entrypoints.openai.api_server"}, python, ""},
		{"a bare name in the model's PATH", []string{"python3", "-m", "vllm"}, python, ""},
		{"a console script's #! line", []string{vllmScript, "serve"}, python, ""},
		{"#!/usr/bin/env -S", []string{envScript}, python, ""},
		{"env(1) with variables", []string{"/usr/bin/env", "FOO=1", "-u", "BAR", "python3", "-m", "vllm"}, python, ""},
		{"a shell wrapper", []string{wrapper}, "", "cannot tell which Python"},
		{"a binary", []string{binary}, "", "neither a python nor a #! script"},
		{"missing", []string{"no-such-python-here"}, "", "not found in the model's PATH"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Interpreter(tc.command, path)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("Interpreter = %q, %v; want an error with %q", got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("Interpreter = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}

func TestParseOutput(t *testing.T) {
	v, err := ParseOutput([]byte("some warning from a site hook\n0.10.1\n"))
	if err != nil || v.String() != "0.10.1" {
		t.Errorf("ParseOutput = %v, %v", v, err)
	}
	if _, err := ParseOutput([]byte("\n")); err == nil {
		t.Error("empty output parsed")
	}
}

// TestDocsTableInStep: docs/vllm.md's table says, for every feature, the
// release this package has for it, its first vLLM reference, and whether
// the release was inferred.
func TestDocsTableInStep(t *testing.T) {
	b, err := os.ReadFile("../docs/vllm.md")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(string(b), "\n")
	for _, f := range Features {
		ref, _, _ := strings.Cut(f.Refs, ",")
		ref = strings.Fields(ref)[0]
		var row string
		for _, l := range lines {
			if strings.HasPrefix(l, "| ") && strings.Contains(l, ref) && strings.Contains(l, "| "+f.Since.String()) {
				row = l
				break
			}
		}
		if row == "" {
			t.Errorf("docs/vllm.md has no table row with %s and %s (%s)", ref, f.Since, f.Name)
			continue
		}
		if strings.Contains(row, f.Since.String()+" (inferred)") != f.Inferred {
			t.Errorf("docs/vllm.md's row for %s: inferred %v in the code, row %q", f.Name, f.Inferred, row)
		}
	}
}
