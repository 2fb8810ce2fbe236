package supervisor

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
			m := newMachine(c, func() time.Time { return t0 }, func() float64 { return 0.5 }, zap.NewNop())
			st := tc.st
			st.Instance = &liverestore.InstanceState{Model: "m", PID: 100, Started: t0.Add(-time.Hour), GPUs: []string{"GPU-0"},
				Digest: c.SpawnDigest(), ReadyAt: t0.Add(-50 * time.Minute)}
			in := &instance{PID: 100, Started: st.Instance.Started, GPUs: st.Instance.GPUs, done: make(chan struct{})}
			got := describe(m.Restore(st, in, c.SpawnDigest(), false))
			if strings.Contains(got, "stop(") || !strings.Contains(got, "quiet(") {
				t.Fatalf("restored held: effects %q; want a quiet request before its stop (a neighbour may be adopted loading)", got)
			}
		})
	}
}

// TestQuietDeadlineLeavesNoWindow: a sleep that goes
// ahead after waiting startup_timeout for quiet GPUs sends Unquiet, then
// Changing (EfSleep). Between the two the scheduler decides with the
// model's GPU not busy: a neighbour ready in between lets another start be
// granted there, and the sleep then begins beside that load. The same
// happens when the quiet grant crosses the deadline: Unquiet clears the
// Changing the grant set.
func TestQuietDeadlineLeavesNoWindow(t *testing.T) {
	mt := newODTest(t).toODReady()
	mt.m.cfg.Name = "a"
	mt.now = mt.now.Add(11 * time.Minute)
	mt.step(EvIdle{})
	mt.now = mt.now.Add(mt.m.cfg.Probe.StartupTimeout)
	efs := mt.step(EvTimer{Deadline})

	sp := newSchedProbe(t)
	a, b, c := schedModel("a"), schedModel("b"), schedModel("c")
	sp.s.Want(a, 1, nil)
	sp.granted("a")
	sp.s.Ready("a", time.Now())
	sp.s.Want(b, 1, nil)
	sp.granted("b")
	sp.s.Quiet("a", 1)
	if q := sp.quietAnswer("a"); q.ok {
		t.Fatalf("quiet for a while b starts: %+v; want a wait", q)
	}
	// a's runner carries out its deadline's effects, in order, as do()
	// does; b's ready and c's want (other goroutines) land right after
	// a's first message to the scheduler.
	others := func() {
		sp.s.Ready("b", time.Now())
		sp.s.Want(c, 1, nil)
	}
	sent := false
	for _, ef := range efs {
		switch ef.(type) {
		case EfUnquiet:
			sp.s.Unquiet("a")
		case EfSleep, EfStop:
			sp.s.Changing("a")
		default:
			continue
		}
		if !sent {
			sent = true
			others()
		}
	}
	if !sent {
		t.Fatalf("deadline effects %q: no message to the scheduler", describe(efs))
	}
	if p := sp.next("c"); p.GPUs != nil {
		t.Fatalf("c granted %v while a's sleep begins on its GPU (deadline effects %q); want it to wait for a", p.GPUs, describe(efs))
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

// TestRecordDuringADeepenedSleepKeepsItsLevel: the host memory budget
// deepens a level-1 sleep to 2 as the runner begins it (EfSleep: the
// machine chooses the level from what the runner reads, SleepBegins). A
// reload of a policy key during the drain or /sleep rewrites the record
// (EfRedigest) from the machine's snapshot: it must say level 2, or a
// daemon that dies then leaves a successor that wakes the level-2 sleeper
// at level 1, without reloading the weights it discarded.
func TestRecordDuringADeepenedSleepKeepsItsLevel(t *testing.T) {
	mt := newODTest(t).toODReady()
	mt.m.inst.marker = "m/tok"
	recs := liverestore.Records{Dir: t.TempDir()}
	d := &deps{
		now: func() time.Time { return mt.now }, log: zap.NewNop(),
		sched:       schedule.New(schedule.Options{}),
		records:     records{recs},
		sleepBudget: func() uint64 { return 1 << 30 },
		level1Held:  func(string) uint64 { return 2 << 30 }, // past the budget: level 2
		after:       func(time.Duration) <-chan time.Time { return nil },
	}
	r := newRunner(mt.m.cfg, d)
	l := &loop{r: r, m: mt.m, results: make(chan Event, 4)}
	run := func(efs []Effect) {
		for _, ef := range efs {
			l.do(ef)
		}
	}
	mt.now = mt.now.Add(11 * time.Minute)
	run(mt.step(EvIdle{}))
	run(mt.quietOK()) // EfSleep: the record says level 2, a sleep began
	level := func() (int, bool) {
		all, err := recs.All()
		if err != nil || len(all) != 1 {
			t.Fatalf("records %v, %v", all, err)
		}
		for _, is := range all {
			return is.SleepLevel, !is.SleepBegan.IsZero()
		}
		return 0, false
	}
	if lv, began := level(); lv != 2 || !began {
		t.Fatalf("record as the sleep begins: level %d, began %v; want level 2, began", lv, began)
	}
	policy := mt.m.cfg
	policy.IdleAfter = 20 * time.Minute // a policy key: the process is kept (Update)
	efs := mt.step(EvConfig{Config: policy, Kind: config.Update})
	run(efs)
	if lv, began := level(); lv != 2 {
		t.Fatalf("after a reload during the sleep (effects %q): record says level %d (began %v); the engine sleeps at level 2", describe(efs), lv, began)
	}
}

// TestAdoptedMidSleepOrWakeKeepsItsGPUBusy: a daemon
// that dies while a model's /sleep or wake_up is in flight leaves a record
// that says asleep (a sleep began; or, waking, asleep until the wake is
// proven). The engine goes on giving its memory back, or taking it (a
// level-2 wake reloads the weights: seconds to minutes). The successor
// adopts it Asleep, a claim that marks nothing busy once a reading taken
// after the takeover is in: a start granted then on its GPU loads while
// that engine's memory changes (vllm#56830).
func TestAdoptedMidSleepOrWakeKeepsItsGPUBusy(t *testing.T) {
	two := onDemandCfg()
	two.SleepLevel = 2
	for _, tc := range []struct {
		name   string
		record func() (*mtest, liverestore.InstanceState)
	}{
		{"a sleep in flight (record: a sleep began)", func() (*mtest, liverestore.InstanceState) {
			mt := newODTest(t)
			mt.m.cfg = two
			mt.toGoingToSleep()
			is := *mt.m.Snapshot().Instance
			is.SleepLevel, is.SleepCause, is.SleepBegan = 2, "idle", mt.now // as EfSleep writes it
			return mt, is
		}},
		{"a wake in flight (wake_up sent)", func() (*mtest, liverestore.InstanceState) {
			mt := newODTest(t)
			mt.m.cfg = two
			mt.toWaking()
			if !mt.m.wakeInFlight() {
				t.Fatal("not waking")
			}
			return mt, *mt.m.Snapshot().Instance
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mt, is := tc.record()
			is.Digest = two.SpawnDigest()
			m := newMachine(two, func() time.Time { return mt.now }, func() float64 { return 0.5 }, zap.NewNop())
			efs := m.Restore(liverestore.ModelState{Name: "m", Instance: &is}, mt.m.inst, two.SpawnDigest(), false)

			sp := newSchedProbe(t)
			sp.s.Restoring()
			adopted := false
			for _, ef := range efs {
				if a, ok := ef.(EfAdopt); ok {
					adopted = true
					sp.s.Adopt(schedModel("a"), []string{oneGPU}, a.Phase, a.AwakeAt, a.Changing)
				}
			}
			if !adopted {
				t.Fatalf("restore effects %q: no adoption", describe(efs))
			}
			sp.s.Restored()
			sp.s.Want(schedModel("b"), 1, nil)
			// Its answers until it names a: never GPUs while a may change.
			for p := sp.next("b"); !strings.Contains(p.Reason, "a is giving its memory back"); p = sp.next("b") {
				if p.GPUs != nil {
					t.Fatalf("adopted %s (effects %q): b granted %v while a's engine may still be changing its memory there", m.state, describe(efs), p.GPUs)
				}
			}
			// Its bound passed: a no longer counts as changing.
			if got := describe(m.onTimer(Settle)); got != "settled" {
				t.Fatalf("settle timer: effects %q, want settled", got)
			}
			sp.s.Slept("a")
			sp.granted("b")
		})
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
	m := newMachine(two, func() time.Time { return mt.now }, func() float64 { return 0.5 }, zap.NewNop())
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
