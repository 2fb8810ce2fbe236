package supervisor

import (
	"context"
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
	waitFor(t, 20*time.Second, "od pending on the GPU", func() bool {
		st = h.status("od")
		return st.State == Pending && st.PendingCause == CauseGPU && st.Reason != "waiting for GPUs"
	})
	if got := h.status("always"); got.State != Ready {
		t.Errorf("always: %s", got.State)
	}
	// By hand, an always model refuses sleep.
	res, err := h.sup.Do(context.Background(), OpSleep, "always")
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
