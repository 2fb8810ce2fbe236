package lifecycle

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/schedule"
	"citadel-supervisor/vllm"
)

// The swap core's transitions, step by step on an injected clock.

// TestMachineEvictWithinMinAwakeDeclined: an eviction that reaches a model
// within min_awake of becoming ready (by its own clock) is declined; past
// it, the model goes to sleep.
func TestMachineEvictWithinMinAwakeDeclined(t *testing.T) {
	mt := newODTest(t).toODReady()
	mt.now = mt.now.Add(59 * time.Second)
	mt.expect(EvEvict{ForModel: "b"}, "decline")
	mt.state(Ready)
	mt.now = mt.now.Add(time.Second)
	mt.quiet(EvEvict{ForModel: "b"}, "disarm(deadline) disarm(tick) disarm(idle) sleep(1,evicted)")
}

// TestMachineReadyCarriesItsInstant: the scheduler is told when the model
// became ready, with the ready itself.
func TestMachineReadyCarriesItsInstant(t *testing.T) {
	mt := newODTest(t).toWaking()
	mt.now = mt.now.Add(3 * time.Second)
	for _, ef := range mt.step(EvWoke{Inst: mt.m.inst}) {
		if r, ok := ef.(EfReady); ok {
			if !r.At.Equal(mt.now) {
				t.Errorf("ready at %s, want %s", r.At, mt.now)
			}
			return
		}
	}
	t.Error("no ready effect")
}

// TestMachineSleeperExitStaysStopped: a sleeper's process that exits is
// cleaned up and the model stays stopped (idle, not held) until a request;
// its exit is counted and kept. One that exits while waking (a request
// wants it) starts again.
func TestMachineSleeperExitStaysStopped(t *testing.T) {
	mt := newODTest(t).toAsleep()
	inst := mt.m.inst
	mt.expect(EvExited{Inst: inst, Exit: Exit{Code: 137, Desc: "killed by SIGKILL"}}, "disarm(tick) disarm(deadline) disarm(idle) stop(rest)")
	mt.expect(EvStopped{Inst: inst}, "release")
	mt.state(Stopped)
	if st := mt.m.Status(); st.Held || !strings.Contains(st.Reason, "exited while asleep (killed by SIGKILL)") || st.RestartsByReason[ReasonExit] != 1 {
		t.Errorf("after: held=%v reason %q restarts %v", st.Held, st.Reason, st.RestartsByReason)
	}
	mt.expect(EvDemand{}, "disarm(tick) check")

	// Waking: requests wait for it, so it restarts.
	mt = newODTest(t).toWakingAwaiting()
	mt.expect(EvExited{Inst: mt.m.inst, Exit: Exit{Code: 1, Desc: "exit code 1"}}, "disarm(tick) disarm(deadline) disarm(idle) stop(rest)")
	mt.expect(EvStopped{Inst: mt.m.inst}, "release(keep) arm(tick,10s)")
	mt.state(Backoff)
}

// TestMachineSleptWithWaitersWakesAgain: a model that falls asleep while
// requests wait in its queue (nothing else would ask for it) is woken at
// once; one stopped (sleep_level 0) with waiters starts again.
func TestMachineSleptWithWaitersWakesAgain(t *testing.T) {
	mt := newODTest(t).toGoingToSleep()
	mt.expect(EvSlept{Waiting: 2}, "slept(1,idle) want(2)")
	mt.state(Waking)

	mt = newODTest(t)
	cfg := onDemandCfg()
	cfg.SleepLevel = 0
	mt.m.cfg = cfg
	mt.toODReady()
	mt.now = mt.now.Add(time.Hour)
	mt.step(EvIdle{})
	mt.quietOK()
	mt.expect(EvStopped{Inst: mt.m.inst, Waiting: 1}, "release(keep) disarm(tick) check")
	mt.state(Pending)
}

// TestMachineSleepLevelIsPolicy: sleep_level is read at each sleep: a
// change between 1 and 2 applies at the next; a process started without
// sleep mode (sleep_level 0 then) is stopped instead, whatever the level
// now; an update re-digests the running process.
func TestMachineSleepLevelIsPolicy(t *testing.T) {
	mt := newODTest(t).toODReady()
	two := onDemandCfg()
	two.SleepLevel = 2
	mt.expect(EvConfig{Config: two, Kind: config.Update}, "redigest")
	mt.now = mt.now.Add(time.Hour)
	mt.quiet(EvIdle{}, "disarm(deadline) disarm(tick) disarm(idle) sleep(2,idle)")

	mt = newODTest(t)
	zero := onDemandCfg()
	zero.SleepLevel = 0
	mt.m.cfg = zero
	mt.toODReady() // started without sleep mode
	mt.step(EvConfig{Config: onDemandCfg(), Kind: config.Update})
	mt.now = mt.now.Add(time.Hour)
	mt.quiet(EvIdle{}, "disarm(deadline) disarm(tick) disarm(deadline) disarm(idle) stop(term) slept(0,idle)")
}

// TestMachineReloadOfASleeperStopsIt: a reload that changes a sleeping
// on-demand model stops it; it starts at its next request, not now.
func TestMachineReloadOfASleeperStopsIt(t *testing.T) {
	mt := newODTest(t).toAsleep()
	changed := onDemandCfg()
	changed.MaxModelLen = 4096
	mt.quiet(EvConfig{Config: changed, Kind: config.Respawn}, "disarm(deadline) disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	mt.expect(EvStopped{Inst: mt.m.inst}, "release")
	mt.state(Stopped)
	if st := mt.m.Status(); st.Held || st.RestartsByReason[ReasonReload] != 1 {
		t.Errorf("held=%v restarts %v", st.Held, st.RestartsByReason)
	}
}

// TestMachineWakeBound: a wake's bound is wake_timeout when set; else 2
// minutes before any wake, then four times the slowest recent wake (at
// least 30 s), never more than half of startup_timeout. A wake past it,
// or whose engine stops answering probes, fails: the model starts cold.
func TestMachineWakeBound(t *testing.T) {
	mt := newODTest(t).toWakingAwaiting()
	mt.expect(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}}, "wake(1,2m0s) arm(deadline,2m0s) arm(tick,10s)")
	mt.now = mt.now.Add(20 * time.Second)
	mt.step(EvWoke{Inst: mt.m.inst})
	if got := mt.m.wakeBound(1); got != 80*time.Second {
		t.Errorf("after a 20 s wake: bound %s, want 1m20s", got)
	}
	mt.m.noteWake(1, time.Second)
	if got := mt.m.wakeBound(1); got != 80*time.Second {
		t.Errorf("the slowest recent wake counts: %s", got)
	}
	if got := mt.m.wakeBound(2); got != 2*time.Minute {
		t.Errorf("level 2, no wake yet: %s", got)
	}
	for range wakeHistory {
		mt.m.noteWake(1, time.Second)
	}
	if got := mt.m.wakeBound(1); got != wakeTimeoutFloor {
		t.Errorf("fast wakes: %s, want the floor %s", got, wakeTimeoutFloor)
	}
	mt.m.cfg.Probe.StartupTimeout = 40 * time.Second
	if got := mt.m.wakeBound(2); got != 20*time.Second {
		t.Errorf("startup_timeout 40s: %s, want 20s", got)
	}
	mt.m.cfg.WakeTimeout = 7 * time.Second
	if got := mt.m.wakeBound(1); got != 7*time.Second {
		t.Errorf("wake_timeout 7s: %s", got)
	}

	// Past its bound: started cold, counted.
	mt = newODTest(t).toWaking()
	mt.now = mt.now.Add(2 * time.Minute)
	mt.expect(EvTimer{Deadline}, "wake-failed(timeout) disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	if st := mt.m.Status(); !strings.Contains(st.Reason, "wake failed: not awake within 2m0s") || st.RestartsByReason[ReasonWake] != 1 {
		t.Errorf("reason %q restarts %v", st.Reason, st.RestartsByReason)
	}
	mt.expect(EvStopped{Inst: mt.m.inst}, "release(keep) disarm(tick) check")
	mt.state(Pending)

	// Probed while it wakes: failure_threshold failures fail the wake.
	mt = newODTest(t).toWaking()
	inst := mt.m.inst
	mt.expect(EvTimer{Tick}, "arm(tick,10s) probe")
	mt.expect(EvProbed{Inst: inst, Err: errors.New("timeout")}, "observe")
	mt.step(EvTimer{Tick})
	mt.expect(EvProbed{Inst: inst}, "observe")
	for range 2 {
		mt.step(EvTimer{Tick})
		mt.expect(EvProbed{Inst: inst, Err: errors.New("timeout")}, "observe")
	}
	mt.step(EvTimer{Tick})
	mt.expect(EvProbed{Inst: inst, Err: errors.New("timeout")}, "observe wake-failed(probe) disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	if !strings.Contains(mt.m.reason, "probe failed 3/3 while waking") {
		t.Errorf("reason %q", mt.m.reason)
	}
	// The wake's own answer, late, changes nothing.
	mt.expect(EvWoke{Inst: inst}, "")
	mt.state(Stopping)
}

// TestMachineWakingIsRecordedAsleep: a sleeper waiting for memory to
// wake, or waking, still sleeps at its level until the wake is proven:
// its record says so, and a successor (an upgrade, or a crash and
// adoption) wakes it the way it slept. Before, the record said awake from
// the demand on; a successor found the engine asleep and woke a level-2
// sleeper at level 1 (the sleep_level a reload had set meanwhile),
// without reloading the weights it had discarded.
func TestMachineWakingIsRecordedAsleep(t *testing.T) {
	two := onDemandCfg()
	two.SleepLevel = 2
	for _, tc := range []struct {
		name string
		to   func(*mtest) *mtest
	}{
		{"waiting for memory", (*mtest).toWakingAwaiting},
		{"waking", (*mtest).toWaking},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mt := newODTest(t)
			mt.m.cfg = two
			tc.to(mt)
			mt.state(Waking)
			st := mt.m.Snapshot()
			if st.Instance == nil || st.Instance.SleepLevel != 2 {
				t.Fatalf("recorded %+v; want asleep at level 2", st.Instance)
			}
			one := onDemandCfg() // a reload set sleep_level 1 meanwhile
			m := New(one, func() time.Time { return mt.now }, func() float64 { return 0.5 }, zap.NewNop())
			st.Instance.Digest = one.SpawnDigest()
			m.Restore(st, mt.m.inst, one.SpawnDigest(), false)
			if m.state != Sleeping || m.sleepLevel != 2 {
				t.Errorf("restored %s at level %d; want sleeping at level 2", m.state, m.sleepLevel)
			}
		})
	}
}

// TestMachineHostMemoryHeldUntilTheProcessEnds: the pinned host memory of
// a level-1 sleep is the machine's: counted from the first sleep (the
// second adds nothing: vLLM reuses it, vllm#16663), written in the record
// a successor reads, and gone with the process.
func TestMachineHostMemoryHeldUntilTheProcessEnds(t *testing.T) {
	mt := newODTest(t).toGoingToSleep()
	mt.step(EvSlept{Grown: 96 << 20})
	for range 2 {
		mt.step(EvDemand{})
		mt.step(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}})
		mt.step(EvWoke{Inst: mt.m.inst})
		mt.state(Ready)
		mt.now = mt.now.Add(time.Hour)
		mt.step(EvIdle{})
		mt.quietOK()
		mt.step(EvSlept{Grown: 0})
		mt.state(Sleeping)
	}
	if st := mt.m.Status(); st.SleepHostMemory != 96<<20 || mt.m.Snapshot().Instance.HostHeld != 96<<20 {
		t.Fatalf("after three sleeps: status %d, record %d; want 96 MiB both", st.SleepHostMemory, mt.m.Snapshot().Instance.HostHeld)
	}
	mt.step(EvOp{Op: OpStop})
	mt.quietOK()
	mt.step(EvStopped{Inst: mt.m.inst})
	if st := mt.m.Status(); st.SleepHostMemory != 0 {
		t.Errorf("stopped: %d bytes counted; want none", st.SleepHostMemory)
	}
}

// TestMachineSleepLevelForHostMemory: the machine chooses the level of a
// sleep from the host as the runner reads it when the sleep begins
// (SleepBegins): a level-1 sleep goes to level 2 once the other models'
// level-1 sleeps hold sleep_host_memory, where its vLLM has a level 2. The
// record says so from then on, and the model says why once asleep.
func TestMachineSleepLevelForHostMemory(t *testing.T) {
	const gib = 1 << 30
	for _, tc := range []struct {
		name    string
		version string
		host    HostMemory
		want    int
	}{
		{"no bound", "0.10.2", HostMemory{Budget: 0, OthersHeld: 8 * gib}, 1},
		{"within the bound", "0.10.2", HostMemory{Budget: 4 * gib, OthersHeld: 3 * gib}, 1},
		{"at the bound", "0.10.2", HostMemory{Budget: 4 * gib, OthersHeld: 4 * gib}, 2},
		{"past the bound", "0.10.2", HostMemory{Budget: 4 * gib, OthersHeld: 6 * gib}, 2},
		{"past the bound, no level 2 in its vLLM", "0.10.1", HostMemory{Budget: 4 * gib, OthersHeld: 6 * gib}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mt := newODTest(t)
			mt.m.vllm = VLLM{Version: vllm.MustParse(tc.version), Source: VersionFromServer}
			mt.toGoingToSleep()
			if got := mt.m.SleepBegins(1, tc.host, mt.now); got != tc.want {
				t.Fatalf("sleep begins at level %d; want %d", got, tc.want)
			}
			if is := mt.m.Snapshot().Instance; is.SleepLevel != tc.want || !is.SleepBegan.Equal(mt.now) {
				t.Errorf("record: level %d, began %v; want level %d, began %v", is.SleepLevel, is.SleepBegan, tc.want, mt.now)
			}
			mt.expect(EvSlept{}, fmt.Sprintf("slept(%d,idle)", tc.want))
			deepened := strings.Contains(mt.m.reason, "level 2, not 1: level-1 sleepers hold ") && strings.Contains(mt.m.reason, " of sleep_host_memory 4.0 GiB")
			if deepened != (tc.want == 2) {
				t.Errorf("asleep reason %q", mt.m.reason)
			}
			if st := mt.m.Status(); st.SleepLevel != tc.want {
				t.Errorf("status sleep level %d; want %d", st.SleepLevel, tc.want)
			}
			// Its wake asks at the level it slept at.
			mt.expect(EvDemand{}, "want(2)")
			if got := describe(mt.step(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}})); !strings.HasPrefix(got, fmt.Sprintf("wake(%d,", tc.want)) {
				t.Errorf("wake effects %q; want a wake from level %d", got, tc.want)
			}
		})
	}
	// A sleep no longer in flight is not changed by a late word.
	mt := newODTest(t).toAsleep()
	mt.m.SleepBegins(1, HostMemory{Budget: 1, OthersHeld: 2}, mt.now)
	if st := mt.m.Status(); st.SleepLevel != 1 {
		t.Errorf("asleep at level 1, then told a sleep begins: level %d", st.SleepLevel)
	}
}
