package supervisor

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"citadel-supervisor/supervisor/lifecycle"
	"citadel-supervisor/supervisor/proc"
)

func TestKillNineRestartsAfterDelay(t *testing.T) {
	const delay = 300 * time.Millisecond
	// The probe's failures take 2 s to add up, so the exit, not a probe
	// (3 × 50 ms by default), is what a loaded machine shows first.
	h := newHarness(t, modelSpec{Name: "m", YAML: "restart: {delay: 300ms, max_delay: 1s}\nprobe: {failure_threshold: 40}"}).start(Options{})
	first := h.waitState("m", Ready, 20*time.Second)

	killed := time.Now()
	if err := syscall.Kill(first.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var next Status
	h.waitFor(t, 20*time.Second, "a new ready process", func() bool {
		next = h.status("m")
		return next.State == Ready && next.PID != first.PID
	})
	// Lower bound only: the restart must honour the delay (less its jitter).
	if gap := next.StartedAt.Sub(killed); gap < time.Duration(float64(delay)*(1-lifecycle.JitterSpread)) {
		t.Errorf("respawned %s after kill -9, before the %s delay", gap, delay)
	}
	if next.RestartsByReason[ReasonExit] != 1 || next.Restarts != 1 {
		t.Errorf("restarts = %v, want exit:1", next.RestartsByReason)
	}
	if next.LastExit != "killed by SIGKILL" || next.LastExitCode == nil || *next.LastExitCode != 137 {
		t.Errorf("last exit = %q (%v), want killed by SIGKILL (137)", next.LastExit, next.LastExitCode)
	}
	if servers := liveOf(h.procs("m"), "server"); len(servers) != 1 || servers[0] != next.PID {
		t.Errorf("live servers = %v, want exactly [%d]", servers, next.PID)
	}
}

func TestExitAtStartFailsAfterBurst(t *testing.T) {
	h := newHarness(t, modelSpec{
		Name: "m",
		YAML: "restart: {delay: 10ms, max_delay: 20ms, burst: 3, interval: 1m}",
		Fake: []string{"--fake-exit-at-start", "--fake-exit-code", "3"},
	}).start(Options{})
	st := h.waitState("m", Failed, 20*time.Second)

	if n := len(h.procs("m")); n != 3 {
		t.Errorf("started %d times, want exactly burst = 3", n)
	}
	if !strings.HasPrefix(st.Reason, "start limit: 3 starts within 1m0s; last: exited (exit code 3)") {
		t.Errorf("reason = %q", st.Reason)
	}
	if st.LastExitCode == nil || *st.LastExitCode != 3 {
		t.Errorf("last exit code = %v, want 3", st.LastExitCode)
	}
	if !slices.ContainsFunc(st.LastOutput, func(l string) bool { return strings.Contains(l, "CUDA out of memory") }) {
		t.Errorf("last output does not show the failure: %q", st.LastOutput)
	}
	// Failed stays failed (retry_failed_after: 0) and starts nothing more.
	if got := h.status("m"); got.State != Failed || len(h.procs("m")) != 3 {
		t.Errorf("after failing: %s with %d starts", got.State, len(h.procs("m")))
	}
}

func TestResetClearsStartLimit(t *testing.T) {
	h := newHarness(t, modelSpec{
		Name: "m",
		YAML: "restart: {delay: 10ms, max_delay: 20ms, burst: 2, interval: 1m}",
		Fake: []string{"--fake-exit-at-start"},
	}).start(Options{})
	h.waitState("m", Failed, 20*time.Second)
	res, err := h.sup.Do(context.Background(), "reset", "m")
	if err != nil || res["m"] != nil {
		t.Fatalf("reset: %v %v", res, err)
	}
	h.waitFor(t, 20*time.Second, "two more starts and failed again", func() bool {
		return len(h.procs("m")) == 4 && h.status("m").State == Failed
	})
}

// TestStopKillsDetachedStubbornTree: a model that ignores SIGTERM, with
// workers that left its process group (as vLLM's EngineCore does), one of
// them orphaned at birth by a double fork so no parent link leads to it,
// all ignoring SIGTERM. Nothing of it may survive a stop.
func TestStopKillsDetachedStubbornTree(t *testing.T) {
	h := newHarness(t, modelSpec{
		Name: "m",
		YAML: "stop_timeout: 300ms",
		Fake: []string{"--fake-ignore-sigterm", "--fake-workers", "1", "--fake-detached-workers", "2",
			"--fake-orphan-workers", "1", "--fake-worker-ignore-sigterm"},
	}).start(Options{})
	st := h.waitState("m", Ready, 20*time.Second)
	var procs map[int]string
	// Six processes start (the double fork's middle one exits at once);
	// five stay: server, worker, two detached workers, the orphan.
	h.waitFor(t, 10*time.Second, "6 processes started, 5 alive", func() bool {
		procs = h.procs("m")
		return len(procs) == 6 && len(liveOf(procs, "")) == 5
	})
	for _, pid := range liveOf(procs, "worker") {
		if s, _ := proc.ReadStat(pid); s.PGID != st.PID && s.PGID != pid {
			t.Errorf("worker %d in unexpected group %d", pid, s.PGID)
		}
	}

	res, err := h.sup.Do(context.Background(), "stop", "m")
	if err != nil || res["m"] != nil {
		t.Fatalf("stop: %v %v", res, err)
	}
	stopped := h.waitState("m", Stopped, 20*time.Second)
	if live := liveOf(procs, ""); len(live) != 0 {
		t.Errorf("alive after stop: %v", live)
	}
	if stopped.LastExit != "killed by SIGKILL" {
		t.Errorf("last exit = %q: the server ignores SIGTERM, so SIGKILL must have ended it", stopped.LastExit)
	}
	// The detached workers were re-parented to us (subreaper) and reaped:
	// no zombie is left behind either.
	h.waitFor(t, 10*time.Second, "workers reaped", func() bool {
		for pid := range procs {
			if _, err := proc.ReadStat(pid); err == nil {
				return false
			}
		}
		return true
	})
	// Held stopped: nothing restarts it.
	if got := h.status("m"); got.State != Stopped || len(h.procs("m")) != len(procs) {
		t.Errorf("after stop: %s, %d processes ever started", got.State, len(h.procs("m")))
	}
}

func TestShutdownStopsEveryTree(t *testing.T) {
	h := newHarness(t,
		modelSpec{Name: "a", Fake: []string{"--fake-detached-workers", "1"}},
		modelSpec{Name: "b", YAML: "stop_timeout: 200ms", Fake: []string{"--fake-ignore-sigterm", "--fake-workers", "2"}},
		modelSpec{Name: "c", Fake: []string{"--fake-stop-delay", "100ms"}},
	).start(Options{})
	var all []int
	for _, n := range []string{"a", "b", "c"} {
		h.waitState(n, Ready, 20*time.Second)
		for pid := range h.procs(n) {
			all = append(all, pid)
		}
	}
	h.stop()
	for _, n := range []string{"a", "b", "c"} {
		if st := h.status(n); st.State != Stopped {
			t.Errorf("%s is %s after shutdown", n, st.State)
		}
	}
	for _, pid := range all {
		if running(pid) {
			t.Errorf("pid %d alive after shutdown", pid)
		}
	}
}

func TestPendingOnStorageThenStarts(t *testing.T) {
	h := newHarness(t, modelSpec{Name: "m"})
	m, _ := h.cfg.Model("m")
	if err := os.Remove(m.Path); err != nil {
		t.Fatal(err)
	}
	h.start(Options{})
	h.waitFor(t, 10*time.Second, "pending: storage", func() bool {
		st := h.status("m")
		return st.State == Pending && st.PendingCause == CauseStorage && st.Reason == "storage: "+m.Path+": no such file or directory"
	})
	if err := os.Mkdir(m.Path, 0o755); err != nil {
		t.Fatal(err)
	}
	h.waitState("m", Ready, 20*time.Second)
}

func TestPendingOnForeignPort(t *testing.T) {
	h := newHarness(t, modelSpec{Name: "m"})
	m, _ := h.cfg.Model("m")
	ln, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(m.Port))
	if err != nil {
		t.Fatal(err)
	}
	h.start(Options{})
	self, _ := proc.ReadStat(os.Getpid())
	want := "port " + strconv.Itoa(m.Port) + " in use by pid " + strconv.Itoa(os.Getpid()) + " (" + self.Comm + ")"
	h.waitFor(t, 10*time.Second, "pending: "+want, func() bool {
		st := h.status("m")
		return st.State == Pending && st.PendingCause == CausePort && st.Reason == want
	})
	ln.Close()
	h.waitState("m", Ready, 20*time.Second)
}

func TestSecretsReachOnlyTheChild(t *testing.T) {
	const secret = "hf_test_value_that_must_not_leak"
	h := newHarness(t, modelSpec{Name: "m"})
	envFile := filepath.Join(h.dir, "secrets.env")
	if err := os.WriteFile(envFile, []byte("# token\nHF_TOKEN="+secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	dump := filepath.Join(h.dir, "env.json")
	h.cfg.Models[0].EnvFiles = []string{envFile}
	h.cfg.Models[0].Args = append(h.cfg.Models[0].Args, "--fake-env-file", dump)
	core, logs := observer.New(zap.DebugLevel)
	h.start(Options{Logger: zap.New(core)})
	st := h.waitState("m", Ready, 20*time.Second)
	h.stop()

	b, err := os.ReadFile(dump)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"HF_TOKEN":"` + secret + `"`, `"CUDA_DEVICE_ORDER":"PCI_BUS_ID"`, `"VLLM_PORT":"` + strconv.Itoa(h.cfg.Models[0].VLLMPortStart()) + `"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("child environment lacks %s", want)
		}
	}
	if strings.Contains(fmt.Sprintf("%+v", st), secret) {
		t.Error("secret in status")
	}
	for _, e := range logs.All() {
		if strings.Contains(fmt.Sprintf("%s %v", e.Message, e.ContextMap()), secret) {
			t.Errorf("secret in log entry %q", e.Message)
		}
	}
	if logs.Len() == 0 {
		t.Error("nothing logged: the check above proves nothing")
	}
}
