package supervisor

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/proc"
)

func TestReadEnvFile(t *testing.T) {
	dir := t.TempDir()
	good := filepath.Join(dir, "good.env")
	os.WriteFile(good, []byte("# secrets\n\nHF_TOKEN=hf_abc\nexport QUOTED=\"a b\"\nSINGLE='x=y'\n  SPACED = v \n"), 0o600)
	got, err := readEnvFile(good)
	want := map[string]string{"HF_TOKEN": "hf_abc", "QUOTED": "a b", "SINGLE": "x=y", "SPACED": "v"}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("got %v, %v; want %v", got, err, want)
	}

	bad := filepath.Join(dir, "bad.env")
	os.WriteFile(bad, []byte("OK=1\nhf_secretvalue_no_key\n"), 0o600)
	_, err = readEnvFile(bad)
	if err == nil || err.Error() != "env_files: "+bad+" line 2: expected KEY=VALUE" {
		t.Errorf("got %v", err)
	}
	if err != nil && strings.Contains(err.Error(), "secretvalue") {
		t.Error("the error quotes the secret line")
	}
	if envDigest(want) == envDigest(map[string]string{"HF_TOKEN": "hf_abd"}) {
		t.Error("digest does not change with the value")
	}
}

// TestChildEnvMarker: the instance marker reaches the child, and it is an
// EnvPrefix variable, so a model's env cannot set it (Validate refuses the
// prefix) and the daemon's own value is never inherited.
func TestChildEnvMarker(t *testing.T) {
	if !strings.HasPrefix(proc.MarkerEnv, config.EnvPrefix) {
		t.Fatalf("%s lacks the %s prefix the supervisor reserves", proc.MarkerEnv, config.EnvPrefix)
	}
	m := config.Model{Name: "m", Command: []string{"x"}, Env: map[string]string{"A": "1"}}
	env := childEnv([]string{proc.MarkerEnv + "=inherited", "PATH=/bin"}, m, nil, nil, "id/m/tok")
	if !slices.Contains(env, proc.MarkerEnv+"=id/m/tok") || slices.Contains(env, proc.MarkerEnv+"=inherited") {
		t.Errorf("env: %q", env)
	}
}

func TestRing(t *testing.T) {
	r := newRing(3)
	if got := r.last(5); len(got) != 0 {
		t.Errorf("empty ring: %q", got)
	}
	ch, cancel := r.subscribe(10)
	defer cancel()
	for i := range 5 {
		r.add(fmt.Sprint(i))
	}
	if got := r.last(10); !slices.Equal(got, []string{"2", "3", "4"}) {
		t.Errorf("last(10) = %q", got)
	}
	if got := r.last(2); !slices.Equal(got, []string{"3", "4"}) {
		t.Errorf("last(2) = %q", got)
	}
	if first := <-ch; first != "0" {
		t.Errorf("follower got %q first", first)
	}
}

// TestCPUCounterMonotonic: a worker exiting does not make the counter go
// backwards.
func TestCPUCounterMonotonic(t *testing.T) {
	var c cpuCounter
	a, b := procKey{1, 10}, procKey{2, 20}
	if got := c.total(map[procKey]float64{a: 5, b: 3}); got != 8 {
		t.Fatalf("got %g", got)
	}
	if got := c.total(map[procKey]float64{a: 6}); got != 9 { // b exited at 3
		t.Fatalf("after exit: %g, want 9", got)
	}
	if got := c.total(map[procKey]float64{{1, 11}: 1}); got != 10 { // pid reused
		t.Fatalf("after reuse: %g, want 10", got)
	}
}
