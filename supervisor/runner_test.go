package supervisor

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/lifecycle"
	"citadel-supervisor/supervisor/liverestore"
	"citadel-supervisor/supervisor/schedule"
	"citadel-supervisor/supervisor/schedule/scheduletest"
	"citadel-supervisor/vllm"
)

// mdrive drives a model's machine (package lifecycle) through its events
// as the runner would, on an injected clock, answering the effects that
// ask something (the version lookup, the want) as the outside world
// would.
type mdrive struct {
	t             *testing.T
	m             *lifecycle.Machine
	now           time.Time
	inst          *instance
	seq, quietSeq int // of the last want and quiet request
}

// onDemandReady is an on-demand model (idle after 10m) named name,
// sleeping at sleepLevel, driven to ready: started by a request, spawned, probed.
func onDemandReady(t *testing.T, name string, sleepLevel int) *mdrive {
	md := &mdrive{t: t, now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	cfg := config.Model{
		Name: name, Port: 11400, Enabled: true, TensorParallel: 1, GPUMemoryUtilization: 0.5,
		StopTimeout: 30 * time.Second,
		Restart: config.Restart{
			Delay: 10 * time.Second, MaxDelay: 5 * time.Minute, ResetAfter: 10 * time.Minute,
			Burst: 5, Interval: 30 * time.Minute, RetryFailedAfter: time.Hour,
		},
		Probe:      config.Probe{Path: "/health", Period: 10 * time.Second, Timeout: 5 * time.Second, FailureThreshold: 3, StartupTimeout: 20 * time.Minute},
		Activation: config.ActivationOnDemand, SleepLevel: sleepLevel, IdleAfter: 10 * time.Minute, MinAwake: time.Minute,
	}
	md.m = lifecycle.New(cfg, func() time.Time { return md.now }, func() float64 { return 0.5 }, zap.NewNop())
	md.inst = &instance{
		Instance: lifecycle.Instance{PID: 101, Started: md.now, GPUs: []string{"GPU-a"}, SleepMode: true},
		done:     make(chan struct{}),
	}
	md.m.Begin()
	md.step(lifecycle.EvDemand{})
	for _, ef := range md.step(lifecycle.EvChecked{}) {
		if ef, ok := ef.(lifecycle.EfLearn); ok {
			md.step(lifecycle.EvLearned{Seq: ef.Seq, Version: vllm.Newest})
		}
	}
	md.step(lifecycle.EvPlaced{Placement: schedule.Placement{Seq: md.wantSeq(), GPUs: []string{"GPU-a"}}})
	md.step(lifecycle.EvSpawned{Inst: &md.inst.Instance})
	md.step(lifecycle.EvTimer{Timer: lifecycle.Tick})
	md.step(lifecycle.EvProbed{Inst: &md.inst.Instance})
	if st := md.m.State(); st != Ready {
		t.Fatalf("driven to ready: %s (%s)", st, md.m.Reason())
	}
	return md
}

// wantSeq is the want the machine asked last.
func (md *mdrive) wantSeq() int { return md.seq }

func (md *mdrive) step(ev lifecycle.Event) []lifecycle.Effect {
	efs := md.m.Step(ev)
	for _, ef := range efs {
		switch ef := ef.(type) {
		case lifecycle.EfWant:
			md.seq = ef.Seq
		case lifecycle.EfQuiet:
			md.quietSeq = ef.Seq
		}
	}
	return efs
}

// toGoingToSleep has it idle for idle_after: its sleep begins once its
// GPUs are quiet (EfSleep).
func (md *mdrive) toGoingToSleep() *mdrive {
	md.now = md.now.Add(11 * time.Minute)
	md.step(lifecycle.EvIdle{})
	md.quietOK()
	return md
}

// quietOK answers the machine's last quiet request: its GPUs are quiet.
func (md *mdrive) quietOK() []lifecycle.Effect {
	return md.step(lifecycle.EvQuiet{Seq: md.quietSeq, OK: true})
}

// kinds names effects by type, for failure messages.
func kinds(efs []lifecycle.Effect) string {
	var s []string
	for _, ef := range efs {
		s = append(s, fmt.Sprintf("%T", ef))
	}
	return strings.Join(s, " ")
}

// TestRecordDuringADeepenedSleepKeepsItsLevel: the host memory budget
// deepens a level-1 sleep to 2 as the runner begins it (EfSleep: the
// machine chooses the level from what the runner reads, SleepBegins). A
// reload of a policy key during the drain or /sleep rewrites the record
// (EfRedigest) from the machine's snapshot: it must say level 2, or a
// daemon that dies then leaves a successor that wakes the level-2 sleeper
// at level 1, without reloading the weights it discarded.
func TestRecordDuringADeepenedSleepKeepsItsLevel(t *testing.T) {
	mt := onDemandReady(t, "m", 1)
	mt.inst.marker = "m/tok"
	recs := liverestore.Records{Dir: t.TempDir()}
	d := &deps{
		now: func() time.Time { return mt.now }, log: zap.NewNop(),
		sched:       schedule.New(schedule.Options{}),
		records:     records{recs},
		sleepBudget: func() uint64 { return 1 << 30 },
		level1Held:  func(string) uint64 { return 2 << 30 }, // past the budget: level 2
		after:       func(time.Duration) <-chan time.Time { return nil },
	}
	r := newRunner(mt.m.Config(), d)
	l := &loop{r: r, m: mt.m, results: make(chan lifecycle.Event, 4), procs: map[*lifecycle.Instance]*instance{}}
	l.track(mt.inst)
	run := func(efs []lifecycle.Effect) {
		for _, ef := range efs {
			l.do(ef)
		}
	}
	mt.now = mt.now.Add(11 * time.Minute)
	run(mt.step(lifecycle.EvIdle{}))
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
	policy := mt.m.Config()
	policy.IdleAfter = 20 * time.Minute // a policy key: the process is kept (Update)
	efs := mt.step(lifecycle.EvConfig{Config: policy, Kind: config.Update})
	run(efs)
	if lv, began := level(); lv != 2 {
		t.Fatalf("after a reload during the sleep (effects %q): record says level %d (began %v); the engine sleeps at level 2", kinds(efs), lv, began)
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
	mt := onDemandReady(t, "a", 1)
	mt.now = mt.now.Add(11 * time.Minute)
	mt.step(lifecycle.EvIdle{})
	mt.now = mt.now.Add(mt.m.Config().Probe.StartupTimeout)
	efs := mt.step(lifecycle.EvTimer{Timer: lifecycle.Deadline})

	sp := scheduletest.New(t)
	a, b, c := scheduletest.Model("a"), scheduletest.Model("b"), scheduletest.Model("c")
	sp.S.Want(a, 1, nil)
	sp.Granted("a")
	sp.S.Ready("a", time.Now())
	sp.S.Want(b, 1, nil)
	sp.Granted("b")
	sp.S.Quiet("a", 1)
	if q := sp.Quiet("a"); q.OK {
		t.Fatalf("quiet for a while b starts: %+v; want a wait", q)
	}
	// a's runner carries out its deadline's effects, in order, as do()
	// does; b's ready and c's want (other goroutines) land right after
	// a's first message to the scheduler.
	others := func() {
		sp.S.Ready("b", time.Now())
		sp.S.Want(c, 1, nil)
	}
	sent := false
	for _, ef := range efs {
		switch ef.(type) {
		case lifecycle.EfUnquiet:
			sp.S.Unquiet("a")
		case lifecycle.EfSleep, lifecycle.EfStop:
			sp.S.Changing("a")
		default:
			continue
		}
		if !sent {
			sent = true
			others()
		}
	}
	if !sent {
		t.Fatalf("deadline effects %q: no message to the scheduler", kinds(efs))
	}
	if p := sp.Next("c"); p.GPUs != nil {
		t.Fatalf("c granted %v while a's sleep begins on its GPU (deadline effects %q); want it to wait for a", p.GPUs, kinds(efs))
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
	for _, tc := range []struct {
		name   string
		record func() (*mdrive, liverestore.InstanceState)
	}{
		{"a sleep in flight (record: a sleep began)", func() (*mdrive, liverestore.InstanceState) {
			mt := onDemandReady(t, "m", 2).toGoingToSleep()
			is := *mt.m.Snapshot().Instance
			is.SleepLevel, is.SleepCause, is.SleepBegan = 2, "idle", mt.now // as EfSleep writes it
			return mt, is
		}},
		{"a wake in flight (wake_up sent)", func() (*mdrive, liverestore.InstanceState) {
			mt := onDemandReady(t, "m", 2).toGoingToSleep()
			mt.step(lifecycle.EvSlept{})
			mt.step(lifecycle.EvDemand{})
			efs := mt.step(lifecycle.EvPlaced{Placement: schedule.Placement{Seq: mt.seq, GPUs: []string{"GPU-a"}}})
			if !slices.ContainsFunc(efs, func(ef lifecycle.Effect) bool { _, ok := ef.(lifecycle.EfWake); return ok }) {
				t.Fatalf("not waking: effects %s", kinds(efs))
			}
			return mt, *mt.m.Snapshot().Instance
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mt, is := tc.record()
			two := mt.m.Config()
			is.Digest = two.SpawnDigest()
			m := lifecycle.New(two, func() time.Time { return mt.now }, func() float64 { return 0.5 }, zap.NewNop())
			efs := m.Restore(liverestore.ModelState{Name: "m", Instance: &is}, &mt.inst.Instance, two.SpawnDigest(), false)

			sp := scheduletest.New(t)
			sp.S.Restoring()
			adopted := false
			for _, ef := range efs {
				if a, ok := ef.(lifecycle.EfAdopt); ok {
					adopted = true
					sp.S.Adopt(scheduletest.Model("a"), []string{scheduletest.GPU}, a.Phase, a.AwakeAt, a.Changing)
				}
			}
			if !adopted {
				t.Fatalf("restore effects %q: no adoption", kinds(efs))
			}
			sp.S.Restored()
			sp.S.Want(scheduletest.Model("b"), 1, nil)
			// Its answers until it names a: never GPUs while a may change.
			for p := sp.Next("b"); !strings.Contains(p.Reason, "a is giving its memory back"); p = sp.Next("b") {
				if p.GPUs != nil {
					t.Fatalf("adopted %s (effects %q): b granted %v while a's engine may still be changing its memory there", m.State(), kinds(efs), p.GPUs)
				}
			}
			// Its bound passed: a no longer counts as changing.
			if got := kinds(m.Step(lifecycle.EvTimer{Timer: lifecycle.Settle})); got != "lifecycle.EfSettled" {
				t.Fatalf("settle timer: effects %q, want settled", got)
			}
			sp.S.Slept("a")
			sp.Granted("b")
		})
	}
}
