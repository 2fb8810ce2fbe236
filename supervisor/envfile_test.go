package supervisor

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// TestEnvFileNULWaitsPending: a NUL byte cannot be passed in an environment
// variable (execve takes C strings), so a spawn with one fails. The model
// must wait as pending naming the file and line, without the value, and
// start once the file is fixed, instead of failing with "spawn: invalid
// argument".
func TestEnvFileNULWaitsPending(t *testing.T) {
	const secret = "hf_value_that_must_not_leak"
	h := newHarness(t, modelSpec{Name: "m"})
	envFile := filepath.Join(h.dir, "secrets.env")
	if err := os.WriteFile(envFile, []byte("# token\nHF_TOKEN="+secret+"\x00tail\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	h.cfg.Models[0].EnvFiles = []string{envFile}
	h.start(Options{})

	want := "env_files: " + envFile + " line 2: contains a NUL byte, which an environment variable cannot hold"
	var st Status
	h.waitFor(t, 10*time.Second, "pending: "+want, func() bool {
		st = h.status("m")
		return st.State == Pending && st.PendingCause == CauseEnvFiles && st.Reason == want
	})
	if strings.Contains(fmt.Sprintf("%+v", st), secret) {
		t.Error("the secret is in the status")
	}
	if err := os.WriteFile(envFile, []byte("HF_TOKEN="+secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	h.waitState("m", Ready, 20*time.Second)
}

// TestSpawnLogMasksSecretArgs: a token given in args (--api-key X,
// --hf-token=X) is masked in the daemon's "spawned" line, and the child
// still gets the real value.
func TestSpawnLogMasksSecretArgs(t *testing.T) {
	const key, token = "sk-value-that-must-not-leak", "hf_value_that_must_not_leak"
	h := newHarness(t, modelSpec{Name: "m"})
	dump := filepath.Join(h.dir, "env.json")
	h.cfg.Models[0].Args = append(h.cfg.Models[0].Args, "--api-key", key, "--hf-token="+token, "--fake-env-file", dump)
	core, logs := observer.New(zap.DebugLevel)
	h.start(Options{Logger: zap.New(core)})
	h.waitState("m", Ready, 20*time.Second)
	h.stop()

	spawned := logs.FilterMessage("spawned").All()
	if len(spawned) == 0 {
		t.Fatal("no spawned line: the check below proves nothing")
	}
	argv := fmt.Sprint(spawned[0].ContextMap()["argv"])
	if !strings.Contains(argv, "--api-key ***") || !strings.Contains(argv, "--hf-token=***") {
		t.Errorf("argv not masked as expected: %s", argv)
	}
	for _, e := range logs.All() {
		if s := fmt.Sprintf("%s %v", e.Message, e.ContextMap()); strings.Contains(s, key) || strings.Contains(s, token) {
			t.Errorf("secret in log entry %q", e.Message)
		}
	}
	b, err := os.ReadFile(dump)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), key) || !strings.Contains(string(b), token) {
		t.Errorf("the child did not get the real values: %s", b)
	}
}
