package supervisor

import (
	"context"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
)

// The on-demand swap core under the faults that broke it: each test here
// provokes one, on sim GPUs whose ledger the fake models keep (an
// overcommit exits the model with CUDA's out-of-memory, and the site's
// cleanup fails the test on it).

// twoOnOneGPU is a and b, on demand, each 0.6 of the one GPU: they never
// fit together.
func twoOnOneGPU(t *testing.T, extra string, fake ...string) *harness {
	t.Helper()
	spec := func(name string) modelSpec {
		return modelSpec{Name: name, YAML: od + "gpu_memory_utilization: 0.6\n" + extra, Fake: slices.Clone(fake)}
	}
	return sleepSite(t, 1, spec("a"), spec("b"))
}

// aAsleepBAwake demands a, then b: a is put to sleep for b.
func (h *harness) aAsleepBAwake() (a, b Status) {
	h.t.Helper()
	a = h.demandReady("a")["a"]
	b = h.demandReady("b")["b"]
	h.waitFor(h.t, 20*time.Second, "a asleep for b", func() bool { return h.asleep("a") })
	return a, b
}

// TestRestartOfASleeperAsksForMemory: an operator's restart of a model
// asleep does not take back the memory it gave to the model it was put to
// sleep for: it asks as a fresh start, which puts b to sleep first (it
// was granted its full share as a reservation, and started next to b: out
// of memory on a real GPU).
func TestRestartOfASleeperAsksForMemory(t *testing.T) {
	h := twoOnOneGPU(t, "min_awake: 0s")
	a, _ := h.aAsleepBAwake()
	if res, err := h.sup.Do(context.Background(), api.OpRestart, "a"); err != nil || res["a"] != nil {
		t.Fatalf("restart a: %v %v", res, err)
	}
	h.waitFor(t, 30*time.Second, "a ready in a new process, b asleep", func() bool {
		st := h.status("a")
		return st.State == Ready && st.PID != a.PID && h.asleep("b")
	})
}

// TestReloadOfASleeperLeavesItStopped: a reload that changes a sleeping
// model restarts it as an idle on-demand model: stopped, started by its
// next request, asking for memory then (it was granted its full share as a
// reservation, next to the model it was put to sleep for).
func TestReloadOfASleeperLeavesItStopped(t *testing.T) {
	h := twoOnOneGPU(t, "min_awake: 0s")
	a, b := h.aAsleepBAwake()
	next := *h.cfg
	next.Models = slices.Clone(h.cfg.Models)
	next.Models[0].Env = map[string]string{selfEnv: "1", "CHANGED": "1"} // a
	if _, err := h.sup.Apply(context.Background(), &next); err != nil {
		t.Fatal(err)
	}
	h.waitFor(t, 30*time.Second, "a stopped, not held, its process gone", func() bool {
		st := h.status("a")
		return st.State == Stopped && !st.Held && !running(a.PID)
	})
	if st := h.status("b"); st.State != Ready || st.PID != b.PID {
		t.Errorf("b: %s pid %d, was ready pid %d", st.State, st.PID, b.PID)
	}
	h.sup.Demand("a")
	h.waitFor(t, 30*time.Second, "a started by its next request, b asleep", func() bool {
		return h.status("a").State == Ready && h.asleep("b")
	})
}

// TestCrashedSleeperStaysStopped: a sleeper whose process dies stays
// stopped until a request asks for it; it is not started awake by
// itself (it was, with its full share kept as a reservation, next to the
// model it was put to sleep for).
func TestCrashedSleeperStaysStopped(t *testing.T) {
	h := twoOnOneGPU(t, "min_awake: 0s")
	a, b := h.aAsleepBAwake()
	if err := syscall.Kill(a.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var st Status
	h.waitFor(t, 20*time.Second, "a stopped, not held", func() bool {
		st = h.status("a")
		return st.State == Stopped && !st.Held
	})
	if st.LastExit == "" || st.RestartsByReason[ReasonExit] != 1 {
		t.Errorf("a: last exit %q, restarts %v; want its exit said and counted", st.LastExit, st.RestartsByReason)
	}
	// It stays so: no start of its own (the restart delay is 50 ms).
	deadline := time.Now().Add(time.Second)
	h.waitFor(t, 5*time.Second, "a second to pass", func() bool {
		if s := h.status("a"); s.State != Stopped {
			t.Fatalf("a left stopped by itself: %s (%s)", s.State, s.Reason)
		}
		return time.Now().After(deadline)
	})
	if live := liveOf(h.procs("a"), ""); len(live) != 0 {
		t.Errorf("a's processes: %v", live)
	}
	if s := h.status("b"); s.State != Ready || s.PID != b.PID {
		t.Errorf("b disturbed: %s pid %d", s.State, s.PID)
	}
	h.sup.Demand("a")
	h.waitFor(t, 30*time.Second, "a started on request, b asleep for it", func() bool {
		return h.status("a").State == Ready && h.asleep("b")
	})
}

// TestMinAwakeFromTheInstantOfReady: a model that wakes while another
// waits for its GPU is not put to sleep within min_awake of becoming
// ready (it was, in the same millisecond: the scheduler read a ready
// time published after it decided).
func TestMinAwakeFromTheInstantOfReady(t *testing.T) {
	const minAwake = 3 * time.Second
	usage := t.TempDir()
	spec := func(name, prio string) modelSpec {
		return modelSpec{Name: name, YAML: od + "gpu_memory_utilization: 0.6\nmin_awake: 3s\npriority: " + prio,
			Fake: []string{"--fake-usage-dir", usage, "--fake-wake-time-l1", "1s"}}
	}
	h := newHarnessWith(t, simGPUs("", 1)+"    usage_dir: "+usage+"\n", spec("a", "5"), spec("b", "1")).start(Options{})
	h.demandReady("a")
	// Ready long enough ago that a stale ready time is past min_awake.
	deadline := time.Now().Add(minAwake)
	h.waitFor(t, 10*time.Second, "a awake past min_awake", func() bool { return time.Now().After(deadline) })
	if res, err := h.sup.Do(context.Background(), api.OpSleep, "a"); err != nil || res["a"] != nil {
		t.Fatalf("sleep a: %v %v", res, err)
	}
	h.waitFor(t, 20*time.Second, "a asleep", func() bool { return h.asleep("a") })
	// a wakes (1 s); b asks meanwhile and waits for the GPU.
	h.sup.Demand("a")
	h.waitFor(t, 20*time.Second, "a's wake under way", func() bool { return strings.HasPrefix(h.status("a").Reason, "waking") })
	h.sup.Demand("b")
	h.waitState("b", Ready, 30*time.Second)
	var woke, slept time.Time
	for _, e := range h.site.ReadEvents(t) {
		if e.Model != "a" {
			continue
		}
		switch e.Ev {
		case "wake":
			woke = time.Unix(0, e.T)
		case "sleep_begin":
			slept = time.Unix(0, e.T)
		}
	}
	if woke.IsZero() || !slept.After(woke) {
		t.Fatalf("a's engine: woke %s, went to sleep %s", woke, slept)
	}
	if awake := slept.Sub(woke); awake < minAwake {
		t.Errorf("a was put to sleep for b %s after it woke, within min_awake %s", awake, minAwake)
	}
}

// waitingTraffic is a gateway whose queue for one model always holds a
// request: nothing is ever in flight, and the queue never empties.
type waitingTraffic struct {
	model   string
	drained atomic.Int64
}

func (w *waitingTraffic) Drain(context.Context, string, uint64) error { w.drained.Add(1); return nil }
func (w *waitingTraffic) InFlight(string) int                         { return 0 }
func (w *waitingTraffic) Waiting(model string) int {
	if model == w.model {
		return 1
	}
	return 0
}

// TestEvictedWithWaitersIsDemandedAgain: a model put to sleep while
// requests wait in its queue is demanded again at once: they do not wait
// for max_wait and a 503 (nothing demanded it any more).
func TestEvictedWithWaitersIsDemandedAgain(t *testing.T) {
	h := twoOnOneGPU(t, "min_awake: 0s")
	tr := &waitingTraffic{model: "a"}
	h.sup.SetTraffic(tr)
	a := h.demandReady("a")["a"]
	h.sup.Demand("b")
	// a sleeps for b; its waiting request wants it back and gets it (b has
	// no min_awake) without another request: a wakes on its process, and
	// b, which started meanwhile, sleeps.
	h.waitFor(t, 30*time.Second, "b started, then a awake again and b asleep", func() bool {
		st := h.status("a")
		return st.State == Ready && st.PID == a.PID && h.asleep("b")
	})
	wakes := 0
	for _, e := range h.site.ReadEvents(t) {
		if e.Model == "a" && e.Ev == "wake" {
			wakes++
		}
	}
	if wakes != 1 {
		t.Errorf("a's engine woke %d times, want once", wakes)
	}
}

// TestSleepLevelChangeKeepsTheProcess: a reload that changes sleep_level
// between 1 and 2 keeps the running model (it restarted it); the next
// sleep is at the new level. A change to 0 applies at its next start:
// until then it is stopped when it would sleep.
func TestSleepLevelChangeKeepsTheProcess(t *testing.T) {
	h := sleepSite(t, 1, modelSpec{Name: "m", YAML: od + "gpu_memory_utilization: 0.5"})
	m := h.demandReady("m")["m"]
	reload := func(level int) {
		t.Helper()
		next := *h.cfg
		next.Models = slices.Clone(h.cfg.Models)
		next.Models[0].SleepLevel = level
		changes, err := h.sup.Apply(context.Background(), &next)
		if err != nil || len(changes) != 1 || changes[0].Kind.String() != "update" {
			t.Fatalf("reload to sleep_level %d: %v %v; want an update", level, changes, err)
		}
		h.cfg = &next
	}
	sleep := func() Status {
		t.Helper()
		if res, err := h.sup.Do(context.Background(), api.OpSleep, "m"); err != nil || res["m"] != nil {
			t.Fatalf("sleep: %v %v", res, err)
		}
		var st Status
		h.waitFor(t, 20*time.Second, "m asleep or stopped", func() bool {
			st = h.status("m")
			return (st.State == Sleeping && st.SleepLevel > 0) || st.State == Stopped
		})
		return st
	}
	reload(2)
	if st := h.status("m"); st.PID != m.PID || st.State != Ready {
		t.Fatalf("after sleep_level 1 → 2: %s pid %d, was pid %d", st.State, st.PID, m.PID)
	}
	if st := sleep(); st.SleepLevel != 2 || st.PID != m.PID {
		t.Errorf("asleep at level %d pid %d; want level 2, pid %d", st.SleepLevel, st.PID, m.PID)
	}
	h.sup.Demand("m")
	h.waitState("m", Ready, 20*time.Second)
	reload(0)
	if st := h.status("m"); st.PID != m.PID || st.State != Ready {
		t.Fatalf("after sleep_level 2 → 0: %s pid %d, was pid %d", st.State, st.PID, m.PID)
	}
	if st := sleep(); st.State != Stopped {
		t.Errorf("with sleep_level 0: %s (%s); want stopped", st.State, st.Reason)
	}
}

// TestHungWakeIsProbed: a wake into an engine that hangs (SIGSTOPped) is
// seen by probing, not left to startup_timeout (20 minutes by default):
// the model is restarted cold and serves again.
func TestHungWakeIsProbed(t *testing.T) {
	h := sleepSite(t, 1, modelSpec{Name: "m", YAML: od + "gpu_memory_utilization: 0.5\nprobe: {period: 100ms, timeout: 300ms, failure_threshold: 3, startup_timeout: 5m}"})
	m := h.demandReady("m")["m"]
	if res, err := h.sup.Do(context.Background(), api.OpSleep, "m"); err != nil || res["m"] != nil {
		t.Fatalf("sleep: %v %v", res, err)
	}
	h.waitFor(t, 20*time.Second, "m asleep", func() bool { return h.asleep("m") })
	if err := syscall.Kill(m.PID, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Kill(m.PID, syscall.SIGCONT) }) //nolint:errcheck // it may be gone
	h.sup.Demand("m")
	var st Status
	h.waitFor(t, 30*time.Second, "m ready again in a new process", func() bool {
		st = h.status("m")
		return st.State == Ready && st.PID != m.PID
	})
}
