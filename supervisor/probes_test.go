package supervisor

import (
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"citadel-supervisor/supervisor/proc"
	"citadel-supervisor/supervisor/supervisortest"
)

// TestHangAfterReadyIsRestarted: /health stops answering; the model's
// restart (reason probe) begins within period × failure_threshold +
// timeout. The bound is asserted with slack for a loaded CI
// machine: it checks the schedule (fixed-rate probes, no pile-up), not speed.
func TestHangAfterReadyIsRestarted(t *testing.T) {
	const (
		hangAfter = 500 * time.Millisecond
		period    = 200 * time.Millisecond
		timeout   = 150 * time.Millisecond
		threshold = 3
		delay     = 50 * time.Millisecond
		slack     = time.Second
	)
	h := newHarness(t, modelSpec{
		Name: "m",
		YAML: "probe: {period: 200ms, timeout: 150ms, failure_threshold: 3}\nrestart: {delay: 50ms, max_delay: 50ms}",
		Fake: []string{"--fake-hang-after", hangAfter.String()},
	}).start(Options{})
	first := h.waitState("m", Ready, 20*time.Second)
	// The restart begins when the failure is counted; the stop that
	// follows is not the probes' schedule (the hung fake's own graceful
	// shutdown waits a second for its stuck handler).
	var seen time.Time
	waitFor(t, 20*time.Second, "the probe failure counted", func() bool {
		seen = time.Now()
		return h.status("m").RestartsByReason[ReasonProbe] > 0
	})
	var next Status
	h.waitFor(t, 20*time.Second, "a restarted, ready replacement", func() bool {
		next = h.status("m")
		return next.PID != first.PID && next.PID != 0
	})
	if next.RestartsByReason[ReasonProbe] != 1 {
		t.Errorf("restarts = %v, want probe:1", next.RestartsByReason)
	}
	hungAt := first.StartedAt.Add(hangAfter)
	bound := period*threshold + timeout
	if took := seen.Sub(hungAt); took > bound+slack {
		t.Errorf("restart began %s after the hang; bound %s (+%s slack)", took, bound, slack)
	}
}

func TestHealth503RestartsAtOnce(t *testing.T) {
	core, logs := observer.New(zap.WarnLevel)
	h := newHarness(t, modelSpec{
		Name: "m",
		YAML: "probe: {period: 100ms, failure_threshold: 5}\nrestart: {delay: 1s}",
		Fake: []string{"--fake-unhealthy-after", "300ms"},
	}).start(Options{Logger: zap.New(core)})
	first := h.waitState("m", Ready, 20*time.Second)
	h.waitFor(t, 20*time.Second, "a probe restart", func() bool {
		return h.status("m").RestartsByReason[ReasonProbe] == 1
	})
	// One 503 is enough: five failures would have taken ≥ 500 ms more.
	found := false
	for _, e := range logs.FilterMessage("restarting model").All() {
		if e.ContextMap()["detail"] == "engine dead: /health answered HTTP 503" {
			found = true
		}
	}
	if !found {
		t.Errorf("no restart for a dead engine in the log: %v", logs.All())
	}
	if st := h.status("m"); st.PID == first.PID && st.State == Ready {
		t.Error("the dead engine is still counted ready")
	}
}

func TestSlowLoaderIsNotKilledBeforeStartupTimeout(t *testing.T) {
	// Loading takes 1.5 s: fifteen probe periods of refused connections.
	h := newHarness(t,
		modelSpec{Name: "slow", YAML: "probe: {period: 100ms, startup_timeout: 5s}", Fake: []string{"--fake-load-time", "1500ms"}},
		// vLLM binds its port before loading and listens after (vllm#8204):
		// refusals while it loads, whatever the probe timeout.
		modelSpec{Name: "early", YAML: "probe: {period: 100ms, timeout: 100ms, startup_timeout: 5s}", Fake: []string{"--fake-load-time", "1500ms", "--fake-bind-early"}},
	).start(Options{})
	for _, n := range []string{"slow", "early"} {
		st := h.waitState(n, Ready, 20*time.Second)
		if st.Restarts != 0 || len(h.procs(n)) != 1 {
			t.Errorf("%s: %d restarts, %d starts: a loading model was killed", n, st.Restarts, len(h.procs(n)))
		}
		if st.StartupDuration < 1500*time.Millisecond {
			t.Errorf("%s: startup %s, shorter than its load", n, st.StartupDuration)
		}
	}
}

func TestSlowLoaderIsRestartedAfterStartupTimeout(t *testing.T) {
	h := newHarness(t, modelSpec{
		Name: "m",
		YAML: "probe: {period: 100ms, startup_timeout: 700ms}\nrestart: {delay: 10ms, burst: 2}",
		Fake: []string{"--fake-load-time", "1h"},
	}).start(Options{})
	st := h.waitState("m", Failed, 20*time.Second)
	if st.RestartsByReason[ReasonStartup] != 2 {
		t.Errorf("restarts = %v, want startup:2", st.RestartsByReason)
	}
	if !strings.Contains(st.Reason, "no healthy answer within startup_timeout 700ms") {
		t.Errorf("reason = %q", st.Reason)
	}
}

// TestForeignServerOnThePortIsDetected: another server joins the model's
// port with SO_REUSEPORT (as vLLM binds) and takes part of the connections.
// /health says 200 from both; /v1/models gives the impostor away.
func TestForeignServerOnThePortIsDetected(t *testing.T) {
	core, logs := observer.New(zap.WarnLevel)
	h := newHarness(t, modelSpec{
		Name: "m",
		YAML: "probe: {period: 50ms, failure_threshold: 2}\nrestart: {delay: 50ms}",
	}).start(Options{Logger: zap.New(core)})
	h.waitState("m", Ready, 20*time.Second)
	port := h.cfg.Models[0].Port

	impostor := exec.Command(os.Args[0], "--model", "/x", "--port", strconv.Itoa(port), "--served-model-name", "impostor")
	impostor.Env = append(os.Environ(), supervisortest.SelfEnv+"=1")
	if err := testReaper.Start(impostor); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		impostor.Process.Kill() //nolint:errcheck // best effort
		impostor.Wait()         //nolint:errcheck // killed
		testReaper.Done(impostor.Process.Pid)
	})
	h.waitFor(t, 20*time.Second, "a restart for the impostor", func() bool {
		for _, e := range logs.FilterMessage("restarting model").All() {
			if strings.Contains(e.ContextMap()["detail"].(string), "the port answers for impostor, not m: another server shares the port") {
				return true
			}
		}
		return false
	})
	// Restarted, ours finds the impostor holding the port and says who.
	self, _ := proc.ReadStat(impostor.Process.Pid)
	want := "port " + strconv.Itoa(port) + " in use by pid " + strconv.Itoa(impostor.Process.Pid) + " (" + self.Comm + ")"
	h.waitFor(t, 20*time.Second, "pending: "+want, func() bool {
		st := h.status("m")
		return st.State == Pending && st.Reason == want
	})
}

// TestDeepProbeCatchesAHungEngine: /health answers 200 while completions
// hang; only the deep probe sees it.
func TestDeepProbeCatchesAHungEngine(t *testing.T) {
	core, logs := observer.New(zap.WarnLevel)
	h := newHarness(t,
		modelSpec{
			Name: "hung",
			YAML: "probe: {period: 50ms, failure_threshold: 2, deep_period: 100ms, deep_timeout: 200ms}\nrestart: {delay: 1s}",
			Fake: []string{"--fake-engine-hang-after", "300ms"},
		},
		// The same engine without the deep probe: /health alone never notices.
		modelSpec{Name: "blind", YAML: "probe: {period: 50ms, failure_threshold: 2}", Fake: []string{"--fake-engine-hang-after", "300ms"}},
	).start(Options{Logger: zap.New(core)})
	blind := h.waitState("blind", Ready, 20*time.Second)
	h.waitFor(t, 20*time.Second, "hung restarted by the deep probe", func() bool {
		return h.status("hung").RestartsByReason[ReasonProbe] == 1
	})
	found := false
	for _, e := range logs.FilterMessage("restarting model").All() {
		if e.ContextMap()["model"] == "hung" && e.ContextMap()["detail"] == "probe failed 2/2: one-token completion: no answer within the deep probe timeout" {
			found = true
		}
	}
	if !found {
		t.Errorf("no deep-probe restart in the log: %v", logs.All())
	}
	if st := h.status("blind"); st.PID != blind.PID || st.Restarts != 0 {
		t.Errorf("blind restarted without a deep probe: %+v", st)
	}
}
