package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata and the generated examples in docs/cli.md from this run (make docs)")

// gatewayStub stands in for one host's gateway: GET /v1/models lists
// models (id → fleet state), and answers 401 without token when set.
func gatewayStub(t *testing.T, token string, models ...[2]string) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || r.URL.Path != "/v1/models" {
			http.NotFound(w, r)
			return
		}
		if token != "" && r.Header.Get("Authorization") != "Bearer "+token {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		type entry struct {
			ID      string         `json:"id"`
			Object  string         `json:"object"`
			Citadel map[string]any `json:"citadel"`
		}
		out := struct {
			Object string  `json:"object"`
			Data   []entry `json:"data"`
		}{Object: "list", Data: []entry{}}
		for _, m := range models {
			out.Data = append(out.Data, entry{ID: m[0], Object: "model",
				Citadel: map[string]any{"name": m[0], "fleet": m[1], "servable": m[1] != "unavailable"}})
		}
		json.NewEncoder(w).Encode(out) //nolint:errcheck // test stub
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// fleetRun runs citadelctl with args and returns its exit code, stdout
// and stderr.
func fleetRun(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, nil, &out, &errb)
	return code, out.String(), errb.String()
}

// stable replaces the stubs' random addresses by fixed names, so the
// output can be compared with a golden file.
func stable(s string, hosts map[string]string) string {
	for addr, name := range hosts {
		s = strings.ReplaceAll(s, addr, name)
		s = strings.ReplaceAll(s, sanitize(addr), sanitize(name))
	}
	return s
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (go test -run TestFleetHAProxy -update creates it)", err)
	}
	if string(want) != got {
		t.Errorf("%s changed; if intended, run go test -run TestFleetHAProxy -update and review the diff\ngot:\n%s", path, got)
	}
}

// Two hosts, one model on each only and one on both: one backend per
// model listing the hosts that serve it, sleeping and startable hosts as
// backup, an unavailable one as a plain server its check keeps out.
func TestFleetHAProxyGolden(t *testing.T) {
	a := gatewayStub(t, "", [2]string{"org/alpha-7b", "awake"}, [2]string{"shared", "awake"}, [2]string{"gamma", "unavailable"})
	b := gatewayStub(t, "", [2]string{"beta", "startable"}, [2]string{"shared", "sleeping"}, [2]string{"gamma", "awake"})
	code, out, errs := fleetRun(t, "fleet", "haproxy", "--bind", "127.0.0.1:8000", a, b)
	if code != exitOK || errs != "" {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	got := stable(out, map[string]string{a: "gpu1.example:8080", b: "gpu2.example:8080"})
	golden(t, "fleet-haproxy.cfg", got)
	haproxyCheck(t, out)
}

// With keys, citadelctl sends the key; the file names the environment
// variable HAProxy reads it from, never the key.
func TestFleetHAProxyKeys(t *testing.T) {
	const token = "test-key-not-a-secret"
	a := gatewayStub(t, token, [2]string{"alpha", "awake"})
	code, _, errs := fleetRun(t, "fleet", "haproxy", a)
	if code != exitFailed || !strings.Contains(errs, "401") || !strings.Contains(errs, "--key-file") {
		t.Errorf("without a key: exit %d, stderr %q; want 1 and a hint", code, errs)
	}
	keyFile := filepath.Join(t.TempDir(), "key")
	if err := os.WriteFile(keyFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, errs := fleetRun(t, "fleet", "haproxy", "--key-file", keyFile, a)
	if code != exitOK {
		t.Fatalf("with a key: exit %d, stderr %q", code, errs)
	}
	if strings.Contains(out, token) {
		t.Errorf("the key is in the configuration:\n%s", out)
	}
	if !strings.Contains(out, `http-check send hdr Authorization "Bearer ${`+fleetKeyEnv+`}"`) {
		t.Errorf("no keyed health check:\n%s", out)
	}
	t.Setenv(fleetKeyEnv, token)
	haproxyCheck(t, out)
}

// Model names and host addresses are foreign input: none of them can
// write a directive, a comment or a second word into the configuration.
func TestFleetHAProxyHostileNames(t *testing.T) {
	hostile := []string{
		"zq\nfrontend evil", "zq\r\nx", "zq b", "zq#b", "zq\"b", "zq'b", "zq\\b", "zq%0ab", "zq%2fb",
		"../zq", "zq/../b", "zq//b", "/zq", "zq/", ".zq", "", "zq\tb", "zq;b", "zq{b}", "zq$b",
		"zqünïcode", strings.Repeat("zq", 101),
	}
	models := [][2]string{{"good/model-1.5b", "awake"}}
	for _, h := range hostile {
		models = append(models, [2]string{h, "awake"})
	}
	a := gatewayStub(t, "", models...)
	code, out, errs := fleetRun(t, "fleet", "haproxy", a)
	if code != exitOK {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	if got := strings.Count(errs, "skipped model"); got != len(hostile) {
		t.Errorf("%d models skipped, want %d:\n%s", got, len(hostile), errs)
	}
	if !strings.Contains(out, "use_backend m_good_model-1.5b if { var(txn.model) -m str good/model-1.5b }") {
		t.Errorf("the good model is missing:\n%s", out)
	}
	for _, h := range hostile {
		if h != "" && strings.Contains(out, h) {
			t.Errorf("%q reached the configuration", h)
		}
	}
	if strings.Contains(out, "evil") {
		t.Errorf("an injected directive:\n%s", out)
	}
	cfg := out

	for _, tc := range []struct{ name, arg, want string }{
		{"space", "gpu 1:8080", "neither an IP address nor a host name"},
		{"newline", "gpu1:8080\nbackend x", "want HOST:PORT"},
		{"hash", "gpu#1:8080", "neither an IP address nor a host name"},
		{"no port", "gpu1", "want HOST:PORT"},
		{"port zero", "gpu1:0", "want HOST:PORT"},
		{"port word", "gpu1:http", "want HOST:PORT"},
		{"twice", a, "named twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := []string{"fleet", "haproxy", a, tc.arg}
			if tc.name == "twice" {
				args = []string{"fleet", "haproxy", a, a}
			}
			code, out, errs := fleetRun(t, args...)
			if code != exitUsage || out != "" || !strings.Contains(errs, tc.want) {
				t.Errorf("exit %d, stdout %q, stderr %q; want 2, nothing, %q", code, out, errs, tc.want)
			}
		})
	}
	if code, _, errs := fleetRun(t, "fleet", "haproxy", "--bind", "0.0.0.0:80 ssl crt /x", a); code != exitUsage || !strings.Contains(errs, "--bind") {
		t.Errorf("a hostile --bind: exit %d, stderr %q", code, errs)
	}
	haproxyCheck(t, cfg)
}

// An unreachable host fails the command: no configuration rather than one
// that silently drops a host.
func TestFleetHAProxyUnreachable(t *testing.T) {
	a := gatewayStub(t, "", [2]string{"alpha", "awake"})
	srv := httptest.NewServer(http.NotFoundHandler())
	gone := strings.TrimPrefix(srv.URL, "http://")
	srv.Close()
	code, out, errs := fleetRun(t, "fleet", "haproxy", a, gone)
	if code != exitFailed || out != "" || !strings.Contains(errs, gone) {
		t.Errorf("exit %d, stdout %q, stderr %q; want 1, nothing, the host named", code, out, errs)
	}
}

// --output replaces the file whole.
func TestFleetHAProxyOutputFile(t *testing.T) {
	a := gatewayStub(t, "", [2]string{"alpha", "awake"})
	path := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	code, out, errs := fleetRun(t, "fleet", "haproxy", "--output", path, a)
	if code != exitOK || out != "" {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, out, errs)
	}
	b, err := os.ReadFile(path)
	if err != nil || !strings.Contains(string(b), "backend m_alpha\n") {
		t.Errorf("%s: %v\n%s", path, err, b)
	}
	ents, _ := os.ReadDir(filepath.Dir(path))
	if len(ents) != 1 {
		t.Errorf("left behind: %v", ents)
	}
}

func TestFleetUsage(t *testing.T) {
	for _, args := range [][]string{{"fleet"}, {"fleet", "nginx", "h:1"}, {"fleet", "haproxy"}, {"fleet", "haproxy", "--check-interval", "1ms", "h:1"}} {
		if code, _, _ := fleetRun(t, args...); code != exitUsage {
			t.Errorf("%q: exit %d, want 2", args, code)
		}
	}
}

// haproxyCheck validates cfg with Debian's HAProxy (haproxy -c). CI
// installs it (.ci/run); elsewhere the check is skipped, saying so, as
// the Makefile does for promtool. Call it last: it may skip.
func haproxyCheck(t *testing.T, cfg string) {
	t.Helper()
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("CI: haproxy missing; .ci/run installs it (apt-get install haproxy)")
		}
		t.Skip("NOTE: haproxy not installed: the configuration was NOT checked with haproxy -c (apt-get install haproxy)")
	}
	path := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "-c", "-f", path).CombinedOutput()
	if err != nil {
		t.Errorf("haproxy -c: %v\n%s\n%s", err, out, cfg)
	}
	if strings.Contains(string(out), "[WARNING]") {
		t.Errorf("haproxy -c warns:\n%s", out)
	}
}
