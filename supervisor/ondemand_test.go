package supervisor

import (
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/supervisortest"
	"context"
	"strings"
	"testing"
	"time"
)

// TestOnDemandStartsOnRequestAndStopsWhenIdle: an on-demand model with
// sleep_level 0 does not start with the daemon; a request starts it; after
// idle_after without requests it is stopped again, idle, not held, and
// counted in citadel_model_sleeps_total.
func TestOnDemandStartsOnRequestAndStopsWhenIdle(t *testing.T) {
	h := newHarness(t, modelSpec{Name: "m", YAML: "activation: on_demand\nsleep_level: 0\nidle_after: 1s"}).start(Options{})
	st := h.waitState("m", Stopped, 10*time.Second)
	if st.State != Stopped || st.Held || !st.OnDemand || !st.Serving() {
		t.Fatalf("at start: %s (%s) held=%v on_demand=%v", st.State, st.Reason, st.Held, st.OnDemand)
	}
	if procs := h.procs("m"); len(procs) != 0 {
		t.Fatalf("started without a request: %v", procs)
	}
	h.sup.Demand("m")
	ready := h.waitState("m", Ready, 20*time.Second)
	idle := h.waitState("m", Stopped, 20*time.Second)
	if idle.Held || idle.Reason != "on demand: stopped (idle); starts at its next request" {
		t.Errorf("after idle: held=%v %q", idle.Held, idle.Reason)
	}
	if live := liveOf(h.procs("m"), ""); len(live) != 0 {
		t.Errorf("processes left after the idle stop: %v", live)
	}
	if ran := idle.Since.Sub(ready.ReadyAt); ran < time.Second {
		t.Errorf("stopped %s after ready, before idle_after", ran)
	}
	// The next request starts it again.
	h.sup.Demand("m")
	again := h.waitState("m", Ready, 20*time.Second)
	if again.PID == ready.PID {
		t.Error("the same process after a stop")
	}
}

// TestOnDemandEvictsTheIdleOne: two on-demand models that cannot share the
// one GPU: a request for the second stops the first (sleep_level 0) once
// its min_awake is past, and the second starts on the memory it gave back.
func TestOnDemandEvictsTheIdleOne(t *testing.T) {
	od := "activation: on_demand\nsleep_level: 0\nidle_after: 1h\nmin_awake: 0s\ngpu_memory_utilization: 0.6"
	h := newHarnessWith(t, simGPUs("", 1),
		modelSpec{Name: "a", YAML: od},
		modelSpec{Name: "b", YAML: od},
	).start(Options{})
	h.sup.Demand("a")
	a := h.waitState("a", Ready, 20*time.Second)
	h.sup.Demand("b")
	b := h.waitState("b", Ready, 30*time.Second)
	if st := h.status("a"); st.State != Stopped || st.Held {
		t.Errorf("a: %s (%s) held=%v", st.State, st.Reason, st.Held)
	}
	if live := liveOf(h.procs("a"), ""); len(live) != 0 {
		t.Errorf("a's processes left: %v", live)
	}
	if b.StartedAt.Before(a.ReadyAt) || len(b.GPUs) != 1 || b.GPUs[0] != a.GPUs[0] {
		t.Errorf("b on %v started %s; a on %v", b.GPUs, b.StartedAt, a.GPUs)
	}
}

// TestAlwaysModelIsNeverEvicted: an always model keeps its GPU; the
// on-demand model that does not fit waits, saying why.
func TestAlwaysModelIsNeverEvicted(t *testing.T) {
	h := newHarnessWith(t, simGPUs("", 1),
		modelSpec{Name: "always", YAML: "gpu_memory_utilization: 0.6"},
		modelSpec{Name: "od", YAML: "activation: on_demand\nsleep_level: 0\nmin_awake: 0s\ngpu_memory_utilization: 0.6"},
	).start(Options{})
	h.waitState("always", Ready, 20*time.Second)
	h.sup.Demand("od")
	var st Status
	h.waitFor(t, 20*time.Second, "od pending on the GPU", func() bool {
		st = h.status("od")
		return st.State == Pending && st.PendingCause == CauseGPU && st.Reason != "waiting for GPUs"
	})
	if got := h.status("always"); got.State != Ready {
		t.Errorf("always: %s", got.State)
	}
	// By hand, an always model refuses sleep.
	res, err := h.sup.Do(context.Background(), api.OpSleep, "always")
	if err != nil || res["always"] == nil {
		t.Errorf("sleep always: %v %v", res, err)
	}
}

// TestOnDemandHoldsNothingBackAtStart: an on-demand model of higher
// priority, not yet requested, does not keep an always model from its GPU
// at start-up (it is not among the models expected to start).
func TestOnDemandHoldsNothingBackAtStart(t *testing.T) {
	h := newHarnessWith(t, simGPUs("", 1),
		modelSpec{Name: "low", YAML: "priority: 0\ngpu_memory_utilization: 0.3"},
		modelSpec{Name: "high", YAML: "priority: 100\nactivation: on_demand\ngpu_memory_utilization: 0.3"},
	).start(Options{})
	h.waitState("low", Ready, 20*time.Second)
	if st := h.status("high"); st.State != Stopped {
		t.Errorf("high: %s (%s)", st.State, st.Reason)
	}
}

var fakeStats = supervisortest.FakeStats

// TestSleepAndWakeKeepTheProcess: an idle on-demand model sleeps (level 1)
// and a request wakes it: the same process throughout, its GPU memory down
// to the residue while asleep (sim usage_dir), and the fake never saw an
// inference request while asleep nor a sleep with one in flight.
func TestSleepAndWakeKeepTheProcess(t *testing.T) {
	usage := t.TempDir()
	h := newHarnessWith(t, simGPUs("", 1)+"    usage_dir: "+usage+"\n",
		modelSpec{Name: "m", YAML: "activation: on_demand\nsleep_level: 1\nidle_after: 1s\ngpu_memory_utilization: 0.5",
			Fake: []string{"--fake-usage-dir", usage, "--fake-sleep-residue", "2GiB", "--fake-wake-time-l1", "100ms"}},
	).start(Options{})
	h.sup.Demand("m")
	ready := h.waitState("m", Ready, 20*time.Second)
	asleep := h.waitState("m", Sleeping, 20*time.Second)
	h.waitFor(t, 10*time.Second, "asleep, not going to sleep", func() bool {
		asleep = h.status("m")
		return asleep.SleepLevel == 1
	})
	if asleep.PID != ready.PID {
		t.Fatalf("sleeping in another process: %d, was %d", asleep.PID, ready.PID)
	}
	port := h.site.Models[0].Port
	var used uint64
	h.waitFor(t, 10*time.Second, "the sleeper's memory down to its residue", func() bool {
		views, err := h.sup.GPUs(context.Background())
		if err != nil || len(views) != 1 {
			return false
		}
		used = views[0].MemoryUsed
		return used == 2<<30
	})
	h.sup.Demand("m")
	woke := h.waitState("m", Ready, 20*time.Second)
	if woke.PID != ready.PID {
		t.Errorf("woke as another process: %d, was %d", woke.PID, ready.PID)
	}
	st := fakeStats(t, port)
	if st["sleeps"] != 1 || st["wakes_l1"] != 1 || st["refused_asleep"] != 0 || st["refused_sleeps"] != 0 || st["served"] < 1 {
		t.Errorf("fake's counters %v (served counts the canary)", st)
	}
}

// TestEvictionSleepsAndWakes: two on-demand models that cannot share the
// one GPU take turns: each request puts the other to sleep, and a sleeper
// wakes in the same process.
func TestEvictionSleepsAndWakes(t *testing.T) {
	usage := t.TempDir()
	od := "activation: on_demand\nsleep_level: 1\nidle_after: 1h\nmin_awake: 0s\ngpu_memory_utilization: 0.6"
	fake := []string{"--fake-usage-dir", usage, "--fake-wake-time-l1", "100ms"}
	h := newHarnessWith(t, simGPUs("", 1)+"    usage_dir: "+usage+"\n",
		modelSpec{Name: "a", YAML: od, Fake: fake},
		modelSpec{Name: "b", YAML: od, Fake: fake},
	).start(Options{})
	h.sup.Demand("a")
	a := h.waitState("a", Ready, 20*time.Second)
	h.sup.Demand("b")
	b := h.waitState("b", Ready, 30*time.Second)
	if st := h.status("a"); st.State != Sleeping || st.PID != a.PID {
		t.Fatalf("a: %s (%s) pid %d, was %d", st.State, st.Reason, st.PID, a.PID)
	}
	h.sup.Demand("a")
	h.waitFor(t, 30*time.Second, "a awake in its own process, b asleep", func() bool {
		sa, sb := h.status("a"), h.status("b")
		return sa.State == Ready && sa.PID == a.PID && sb.State == Sleeping && sb.SleepLevel == 1 && sb.PID == b.PID
	})
	for _, m := range h.site.Models {
		if st := fakeStats(t, m.Port); st["refused_asleep"] != 0 || st["refused_sleeps"] != 0 {
			t.Errorf("%s's counters %v", m.Name, st)
		}
	}
}

// TestSleepHostMemoryBudget: level-1 sleepers' host memory is measured
// (their resident memory grown across the sleep: the fake really allocates
// its "weights"); once it reaches sleep_host_memory, the next model sleeps
// at level 2 instead, and says so.
func TestSleepHostMemoryBudget(t *testing.T) {
	od := "activation: on_demand\nsleep_level: 1\nidle_after: 1h\ngpu_memory_utilization: 0.3"
	fake := []string{"--fake-model-bytes", "64MiB", "--fake-wake-time-l1", "50ms", "--fake-wake-time-l2", "50ms"}
	h := newHarnessWith(t, "sleep_host_memory: 32MiB\n"+simGPUs("", 1),
		modelSpec{Name: "a", YAML: od, Fake: fake},
		modelSpec{Name: "b", YAML: od, Fake: fake},
	).start(Options{})
	for _, m := range []string{"a", "b"} {
		h.sup.Demand(m)
		h.waitState(m, Ready, 20*time.Second)
	}
	asleep := func(m string, level int) Status {
		t.Helper()
		if res, err := h.sup.Do(context.Background(), api.OpSleep, m); err != nil || res[m] != nil {
			t.Fatalf("sleep %s: %v %v", m, res, err)
		}
		var st Status
		h.waitFor(t, 20*time.Second, m+" asleep", func() bool {
			st = h.status(m)
			return st.State == Sleeping && st.SleepLevel != 0
		})
		if st.SleepLevel != level {
			t.Errorf("%s asleep at level %d (%s), want %d", m, st.SleepLevel, st.Reason, level)
		}
		return st
	}
	asleep("a", 1)
	var held uint64
	for _, r := range *h.sup.runners.Load() {
		if r.name == "a" {
			held = r.status.Load().SleepHostMemory
		}
	}
	if held < 32<<20 {
		t.Fatalf("a's host memory asleep measured as %d bytes, want about 64 MiB", held)
	}
	b := asleep("b", 2)
	if !strings.Contains(b.Reason, "level 2, not 1: level-1 sleepers hold") {
		t.Errorf("b's reason %q", b.Reason)
	}
}

// TestFailedWakeRestartsCold: a wake that fails (another process took the
// memory, say) restarts the model cold, and it serves again.
func TestFailedWakeRestartsCold(t *testing.T) {
	h := newHarness(t, modelSpec{Name: "m", YAML: "activation: on_demand\nsleep_level: 1\nidle_after: 1h", Fake: []string{"--fake-fail-wake"}}).start(Options{})
	h.sup.Demand("m")
	first := h.waitState("m", Ready, 20*time.Second)
	if res, err := h.sup.Do(context.Background(), api.OpSleep, "m"); err != nil || res["m"] != nil {
		t.Fatalf("sleep: %v %v", res, err)
	}
	h.waitFor(t, 20*time.Second, "asleep", func() bool { st := h.status("m"); return st.State == Sleeping && st.SleepLevel == 1 })
	h.sup.Demand("m")
	var st Status
	h.waitFor(t, 30*time.Second, "ready again, in a new process", func() bool {
		st = h.status("m")
		return st.State == Ready && st.PID != first.PID
	})
}

// TestConcurrentRequestsShareOneWake: many requests for a sleeping model
// at once wake it once.
func TestConcurrentRequestsShareOneWake(t *testing.T) {
	h := newHarness(t, modelSpec{Name: "m", YAML: "activation: on_demand\nsleep_level: 1\nidle_after: 1h", Fake: []string{"--fake-wake-time-l1", "200ms"}}).start(Options{})
	h.sup.Demand("m")
	first := h.waitState("m", Ready, 20*time.Second)
	if res, err := h.sup.Do(context.Background(), api.OpSleep, "m"); err != nil || res["m"] != nil {
		t.Fatalf("sleep: %v %v", res, err)
	}
	h.waitFor(t, 20*time.Second, "asleep", func() bool { st := h.status("m"); return st.State == Sleeping && st.SleepLevel == 1 })
	done := make(chan struct{})
	for range 16 {
		go func() { h.sup.Demand("m"); done <- struct{}{} }()
	}
	for range 16 {
		<-done
	}
	if st := h.waitState("m", Ready, 20*time.Second); st.PID != first.PID {
		t.Fatalf("woke as another process")
	}
	if st := fakeStats(t, h.site.Models[0].Port); st["wakes_l1"] != 1 {
		t.Errorf("%g wakes for 16 requests", st["wakes_l1"])
	}
}
