package lifecycle

import (
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/liverestore"
	"citadel-supervisor/supervisor/schedule"
)

// Interleavings that would break "nothing changes a GPU's memory on
// purpose while a model loads or wakes there" (docs/on-demand.md, "Quiet
// GPUs"), or the record a successor reads. Each failed on the code before
// its fix.

// TestStopOfASleeperWaitingToWakeWaitsForQuiet: a
// sleeper that waits for its memory to wake (Waking, its want in flight) is
// typically waiting because a neighbour is starting on its GPU. An
// operator's stop, restart, or a reload that changes it, stops it at once:
// plannedStop waits for quiet GPUs only from ready, unhealthy or asleep.
// Its SIGTERM frees its residue (CUDA graphs, NCCL) beside the neighbour
// that profiles its memory (vllm#56830). It is not the loading model
// itself (its engine sleeps, nothing of it loads), so nothing excuses it.
func TestStopOfASleeperWaitingToWakeWaitsForQuiet(t *testing.T) {
	changed := onDemandCfg()
	changed.MaxModelLen = 4096
	for _, tc := range []struct {
		name string
		ev   Event
	}{
		{"operator stop", EvOp{Op: OpStop}},
		{"operator restart", EvOp{Op: OpRestart}},
		{"reload that changes it", EvConfig{Config: changed, Kind: config.Respawn}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mt := newODTest(t).toWakingAwaiting()
			mt.state(Waking)
			got := describe(mt.step(tc.ev))
			if strings.Contains(got, "stop(") {
				t.Fatalf("a sleeper waiting for memory (a neighbour starts on its GPU) is stopped at once: effects %q; want a quiet request first", got)
			}
		})
	}
}

// TestRestoredHeldModelWaitsForQuiet: a model taken
// over held (an operator's stop that waited for quiet GPUs when the
// upgrade froze it; or, after a crash, a configuration that disables it)
// is stopped at once by restore, beside a neighbour adopted while it loads
// on the same GPU. A reload's restart restored the same way waits for
// quiet GPUs (the configuration-changed case in TestMachineRestore).
func TestRestoredHeldModelWaitsForQuiet(t *testing.T) {
	for _, tc := range []struct {
		name    string
		enabled bool
		st      liverestore.ModelState
	}{
		{"upgrade: an operator's stop waiting for quiet GPUs", true,
			liverestore.ModelState{State: Ready, Hold: true, HoldReason: "held stopped by operator",
				Reason: "waiting for b, which is starting or waking on GPU0, before it stops"}},
		{"crash: disabled while the daemon was away", false, liverestore.ModelState{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := testModelCfg()
			c.Enabled = tc.enabled
			m := New(c, func() time.Time { return t0 }, func() float64 { return 0.5 }, zap.NewNop())
			st := tc.st
			st.Instance = &liverestore.InstanceState{Model: "m", PID: 100, Started: t0.Add(-time.Hour), GPUs: []string{"GPU-0"},
				Digest: c.SpawnDigest(), ReadyAt: t0.Add(-50 * time.Minute)}
			in := &Instance{PID: 100, Started: st.Instance.Started, GPUs: st.Instance.GPUs}
			got := describe(m.Restore(st, in, c.SpawnDigest(), false))
			if strings.Contains(got, "stop(") || !strings.Contains(got, "quiet(") {
				t.Fatalf("restored held: effects %q; want a quiet request before its stop (a neighbour may be adopted loading)", got)
			}
		})
	}
}

// TestDemandDoesNotWakeASleeperBeingStopped: a sleeper
// told to stop for its residue (an eviction by stop) waits for quiet GPUs,
// still Sleeping. A request then wakes it (onDemand: Sleeping, no sleep op):
// the wake is granted (the scheduler's quiet check skips the model's own
// Starting claim, so the quiet is granted in the same decision), the engine
// wakes, and the quiet answer stops it mid-wake, undrained: a wasted wake,
// a cold start for the requests, and the memory the wake took changes
// again at once.
func TestDemandDoesNotWakeASleeperBeingStopped(t *testing.T) {
	mt := newODTest(t).toAsleep()
	if got := describe(mt.step(EvEvict{ForModel: "x"})); !strings.Contains(got, "quiet(") {
		t.Fatalf("evicted asleep: effects %q; want a quiet request (a stop for its residue)", got)
	}
	seq := mt.m.quietSeq
	efs := describe(mt.step(EvDemand{}))
	if strings.Contains(efs, "want(") {
		efs += " | " + describe(mt.step(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}}))
	}
	got := describe(mt.step(EvQuiet{Seq: seq, OK: true}))
	if mt.m.wakeInFlight() || (strings.Contains(efs, "wake(") && strings.Contains(got, "stop(")) {
		t.Fatalf("demand while its stop waits: %q; then quiet granted: %q (state %s): a wake begun and then stopped", efs, got, mt.m.state)
	}
}

// TestRemovedModelStopsOnceItsGPUsAreQuiet: a model a reload removes stops
// as an operator's stop does, once its GPUs are quiet (a neighbour may
// load there), drained; its runner ends once it is stopped. Before, a
// removal was the daemon's shutdown to the model: SIGTERM at once. One not
// running ends at once.
func TestRemovedModelStopsOnceItsGPUsAreQuiet(t *testing.T) {
	mt := newMTest(t).toReady()
	mt.quiet(EvRemoved{}, "disarm(deadline) disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	if mt.m.Done() {
		t.Fatal("done before its stop completed")
	}
	mt.step(EvStopped{Inst: mt.m.inst})
	if st := mt.m.Status(); st.State != Stopped || !strings.Contains(st.Reason, "removed from the configuration") || !mt.m.Done() {
		t.Errorf("after its stop: %s %q, done %v; want stopped, removed, done", st.State, st.Reason, mt.m.Done())
	}

	mt = newODTest(t)
	mt.m.Begin()
	mt.step(EvRemoved{})
	if !mt.m.Done() || mt.m.state != Stopped {
		t.Errorf("an idle on-demand model removed: %s, done %v; want stopped and done", mt.m.state, mt.m.Done())
	}
}

// TestStopWhileSettlingEndsTheSettle: a model taken over mid-wake and
// stopped before its settle timer fires is not said asleep (Slept) when
// the timer fires: its claim is being released by then.
func TestStopWhileSettlingEndsTheSettle(t *testing.T) {
	two := onDemandCfg()
	two.SleepLevel = 2
	mt := newODTest(t)
	mt.m.cfg = two
	mt.toWaking()
	is := *mt.m.Snapshot().Instance
	is.Digest = two.SpawnDigest()
	m := New(two, func() time.Time { return mt.now }, func() float64 { return 0.5 }, zap.NewNop())
	if got := describe(m.Restore(liverestore.ModelState{Name: "m", Instance: &is}, mt.m.inst, two.SpawnDigest(), false)); !strings.Contains(got, "adopt(asleep,changing)") {
		t.Fatalf("restore: %q; want an adoption that keeps its GPUs busy", got)
	}
	m.Step(EvOp{Op: OpStop})
	m.Step(EvQuiet{Seq: m.quietSeq, OK: true})
	if m.state != Stopping {
		t.Fatalf("%s; want stopping", m.state)
	}
	if got := describe(m.onTimer(Settle)); got != "" {
		t.Errorf("settle timer after its stop began: effects %q; want none", got)
	}
}
