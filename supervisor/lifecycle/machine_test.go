package lifecycle

import (
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
	"citadel-supervisor/probe"
	"citadel-supervisor/supervisor/liverestore"
	"citadel-supervisor/supervisor/schedule"
	"citadel-supervisor/vllm"
)

var update = flag.Bool("update", false, "rewrite testdata golden files")

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// testModelCfg is a model with the defaults of docs/configuration.md.
func testModelCfg() config.Model {
	return config.Model{
		Name: "m", Port: 11400, Enabled: true, TensorParallel: 1, GPUMemoryUtilization: 0.5,
		StopTimeout: 30 * time.Second,
		Restart: config.Restart{
			Delay: 10 * time.Second, MaxDelay: 5 * time.Minute, ResetAfter: 10 * time.Minute,
			Burst: 5, Interval: 30 * time.Minute, RetryFailedAfter: time.Hour,
		},
		Probe: config.Probe{Path: "/health", Period: 10 * time.Second, Timeout: 5 * time.Second, FailureThreshold: 3, StartupTimeout: 20 * time.Minute},
	}
}

// mtest drives a machine step by step on an injected clock.
type mtest struct {
	t   testing.TB
	m   *Machine
	now time.Time
	pid int
}

func newMTest(t testing.TB) *mtest {
	mt := &mtest{t: t, now: t0, pid: 100}
	mt.m = New(testModelCfg(), func() time.Time { return mt.now }, func() float64 { return 0.5 }, zap.NewNop())
	// Its vLLM known, so the checks lead straight to a want; the lookup
	// before the first spawn is vllm_test.go's.
	mt.m.vllm = VLLM{Version: vllm.Newest, Source: VersionFromServer}
	return mt
}

func (mt *mtest) step(ev Event) []Effect { return mt.m.Step(ev) }

// quietOK answers the machine's quiet request: its GPUs are quiet.
func (mt *mtest) quietOK() []Effect { return mt.step(EvQuiet{Seq: mt.m.quietSeq, OK: true}) }

// quiet expects a quiet request after ev, then answers it and expects want.
func (mt *mtest) quiet(ev Event, want string) {
	mt.t.Helper()
	if got := describe(mt.step(ev)); !strings.Contains(got, fmt.Sprintf("quiet(%d) arm(deadline,", mt.m.quietSeq)) {
		mt.t.Fatalf("after %s in %s: effects %q, want a quiet request", describeEvent(ev), mt.m.state, got)
	}
	if got := describe(mt.quietOK()); got != want {
		mt.t.Fatalf("once quiet, in %s: effects %q, want %q", mt.m.state, got, want)
	}
}

// expect steps ev and checks the effects, written as describe does.
func (mt *mtest) expect(ev Event, want string) {
	mt.t.Helper()
	if got := describe(mt.step(ev)); got != want {
		mt.t.Fatalf("after %s in %s: effects %q, want %q", describeEvent(ev), mt.m.state, got, want)
	}
}

func (mt *mtest) state(want State) {
	mt.t.Helper()
	if mt.m.state != want {
		mt.t.Fatalf("state %s (%s), want %s", mt.m.state, mt.m.reason, want)
	}
}

// newInst is a process as the runner would report it, without a process.
func (mt *mtest) newInst() *Instance {
	mt.pid++
	return &Instance{PID: mt.pid, Started: mt.now, GPUs: []string{"GPU-a"}, SleepMode: mt.m.cfg.Sleeps()}
}

// The paths to each state, from the start.
func (mt *mtest) toAwaiting() *mtest {
	mt.m.Begin()
	mt.step(EvChecked{})
	return mt
}

// toSpawning places it: its spawn is in flight.
func (mt *mtest) toSpawning() *mtest {
	mt.toAwaiting()
	mt.step(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}})
	return mt
}

// toAsking restores it from a crash's record that says it was ready: its
// engine is asked whether it sleeps.
func (mt *mtest) toAsking() *mtest {
	inst := mt.newInst()
	inst.Adopted = true
	digest := mt.m.cfg.SpawnDigest()
	mt.m.Restore(liverestore.ModelState{Instance: &liverestore.InstanceState{Model: "m", PID: inst.PID, Started: mt.now, ReadyAt: mt.now, Digest: digest}}, inst, digest, false)
	return mt
}

func (mt *mtest) toStarting() *mtest {
	mt.toAwaiting()
	mt.step(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}})
	mt.step(EvSpawned{Inst: mt.newInst()})
	return mt
}

func (mt *mtest) toReady() *mtest {
	mt.toStarting()
	mt.step(EvTimer{Tick})
	mt.now = mt.now.Add(time.Second)
	mt.step(EvProbed{Inst: mt.m.inst})
	return mt
}

func (mt *mtest) toUnhealthy() *mtest {
	mt.toReady()
	mt.step(EvTimer{Tick})
	mt.step(EvProbed{Inst: mt.m.inst, Err: errors.New("timeout")})
	return mt
}

func (mt *mtest) toStoppingFailure() *mtest {
	mt.toReady()
	mt.step(EvExited{Inst: mt.m.inst, Exit: Exit{Code: 1, Desc: "exit code 1"}})
	return mt
}

func (mt *mtest) toStoppingHeld() *mtest {
	mt.toReady()
	mt.step(EvOp{Op: OpStop})
	return mt
}

func (mt *mtest) toBackoff() *mtest {
	mt.toStoppingFailure()
	mt.step(EvStopped{Inst: mt.m.inst})
	return mt
}

func (mt *mtest) toFailed() *mtest {
	mt.toAwaiting()
	mt.step(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}})
	mt.step(EvSpawned{Err: errors.New("exec: no such file")})
	return mt
}

func (mt *mtest) toStopped() *mtest {
	mt.m.Begin()
	mt.step(EvOp{Op: OpStop})
	return mt
}

func (mt *mtest) toBlocked() *mtest {
	mt.m.Begin()
	mt.step(EvChecked{Cause: CauseStorage, Reason: "storage: /m: no such file or directory"})
	return mt
}

// onDemandCfg is testModelCfg as an on-demand model sleeping at level 1.
func onDemandCfg() config.Model {
	c := testModelCfg()
	c.Activation, c.SleepLevel, c.IdleAfter, c.MinAwake = config.ActivationOnDemand, 1, 10*time.Minute, time.Minute
	return c
}

func newODTest(t testing.TB) *mtest {
	mt := newMTest(t)
	mt.m.cfg = onDemandCfg()
	return mt
}

func (mt *mtest) toIdleStopped() *mtest {
	mt.m.Begin()
	return mt
}

func (mt *mtest) toODReady() *mtest {
	mt.m.Begin()
	mt.step(EvDemand{})
	mt.step(EvChecked{})
	mt.step(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}})
	mt.step(EvSpawned{Inst: mt.newInst()})
	mt.step(EvTimer{Tick})
	mt.step(EvProbed{Inst: mt.m.inst})
	return mt
}

func (mt *mtest) toGoingToSleep() *mtest {
	mt.toODReady()
	mt.now = mt.now.Add(11 * time.Minute)
	mt.step(EvIdle{})
	mt.step(EvQuiet{Seq: mt.m.quietSeq, OK: true})
	return mt
}

func (mt *mtest) toAsleep() *mtest {
	mt.toGoingToSleep()
	mt.step(EvSlept{})
	return mt
}

func (mt *mtest) toWakingAwaiting() *mtest {
	mt.toAsleep()
	mt.step(EvDemand{})
	return mt
}

func (mt *mtest) toWaking() *mtest {
	mt.toWakingAwaiting()
	mt.step(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}})
	return mt
}

// describe writes effects compactly, for tables and golden files.
func describe(efs []Effect) string {
	var out []string
	for _, ef := range efs {
		switch ef := ef.(type) {
		case EfCheck:
			out = append(out, "check")
		case EfWant:
			out = append(out, fmt.Sprintf("want(%d)", ef.Seq))
		case EfDrop:
			out = append(out, "drop")
		case EfSpawn:
			out = append(out, "spawn"+fmt.Sprint(ef.GPUs))
		case EfReady:
			out = append(out, "ready")
		case EfProbe:
			out = append(out, map[bool]string{true: "probe(live)", false: "probe"}[ef.Live])
		case EfObserve:
			out = append(out, "observe")
		case EfStop:
			out = append(out, map[bool]string{true: "stop(term)", false: "stop(rest)"}[ef.MainAlive])
		case EfRelease:
			out = append(out, map[bool]string{true: "release(keep)", false: "release"}[ef.Keep])
		case EfArm:
			out = append(out, fmt.Sprintf("arm(%s,%s)", timerName(ef.Timer), ef.After))
		case EfDisarm:
			out = append(out, "disarm("+timerName(ef.Timer)+")")
		case EfSleep:
			out = append(out, fmt.Sprintf("sleep(%d,%s)", ef.Level, ef.Cause))
		case EfSlept:
			out = append(out, fmt.Sprintf("slept(%d,%s)", ef.Level, ef.Cause))
		case EfWake:
			out = append(out, fmt.Sprintf("wake(%d,%s)", ef.Level, ef.Timeout))
		case EfRedigest:
			out = append(out, "redigest")
		case EfRecord:
			out = append(out, "record")
		case EfQuiet:
			out = append(out, fmt.Sprintf("quiet(%d)", ef.Seq))
		case EfUnquiet:
			out = append(out, "unquiet")
		case EfCanary:
			out = append(out, "canary")
		case EfWakeFailed:
			out = append(out, "wake-failed("+ef.Why+")")
		case EfWoke:
			out = append(out, fmt.Sprintf("woke(%d)", ef.Level))
		case EfDecline:
			out = append(out, "decline")
		case EfWithdraw:
			out = append(out, "withdraw")
		case EfAdopt:
			if ef.Changing {
				out = append(out, fmt.Sprintf("adopt(%v,changing)", ef.Phase))
			} else {
				out = append(out, fmt.Sprintf("adopt(%v)", ef.Phase))
			}
		case EfSettled:
			out = append(out, "settled")
		case EfLearn:
			out = append(out, fmt.Sprintf("learn(%d)", ef.Seq))
		case EfAskSleeping:
			out = append(out, "ask-sleeping")
		default:
			out = append(out, fmt.Sprintf("%T", ef))
		}
	}
	return strings.Join(out, " ")
}

func timerName(t Timer) string { return [...]string{"tick", "deadline", "idle", "settle"}[t] }

func describeEvent(ev Event) string {
	switch ev := ev.(type) {
	case EvChecked:
		if ev.Cause == "" {
			return "checked ok"
		}
		return "checked " + ev.Cause
	case EvPlaced:
		if ev.Placement.GPUs == nil {
			return "placed wait"
		}
		return "placed"
	case EvSpawned:
		switch {
		case ev.Err != nil:
			return "spawn failed"
		case ev.Cause != "":
			return "spawn check " + ev.Cause
		}
		return "spawned"
	case EvExited:
		return "exited"
	case EvProbed:
		switch {
		case ev.Err == nil:
			return "probe ok"
		case probe.Fatal(ev.Err):
			return "probe 5xx"
		}
		return "probe failed"
	case EvTimer:
		return timerName(ev.Timer)
	case EvOp:
		return "op " + string(ev.Op)
	case EvConfig:
		if !ev.Config.Enabled {
			return "config disabled"
		}
		return "config " + ev.Kind.String()
	case EvStopped:
		if ev.Err != nil {
			return "stop failed"
		}
		return "stopped"
	case EvShutdown:
		return "shutdown"
	case EvRemoved:
		return "removed"
	case EvDemand:
		return "demand"
	case EvUnwanted:
		return "unwanted"
	case EvEvict:
		return "evict"
	case EvIdle:
		if ev.InFlight > 0 {
			return "idle check (busy)"
		}
		return "idle check"
	case EvSlept:
		switch {
		case ev.Aborted:
			return "sleep aborted"
		case ev.Err != nil:
			return "sleep failed"
		}
		return "slept"
	case EvQuiet:
		if ev.OK {
			return "quiet"
		}
		return "not quiet"
	case EvCanary:
		return "canary recorded"
	case EvWoke:
		if ev.Err != nil {
			return "wake failed"
		}
		return "woke"
	case EvServing:
		return "serving"
	case EvSpawnSlow:
		return "spawn slow"
	case EvEngineSleeps:
		switch {
		case ev.Err != nil:
			return "engine silent"
		case ev.Asleep:
			return "engine asleep"
		}
		return "engine awake"
	}
	return fmt.Sprintf("%T", ev)
}

// TestMachineTransitions steps every state through every event and keeps
// the outcome in testdata/transitions.txt, the lifecycle's table that
// docs/architecture.md shows: a change to any transition shows in review
// as a change to that file (go test ./supervisor/lifecycle/ -run TestMachineTransitions -update).
func TestMachineTransitions(t *testing.T) {
	states := []struct {
		name  string
		setup func(*mtest) *mtest
	}{
		{"pending (checks failing)", (*mtest).toBlocked},
		{"pending (awaiting GPUs)", (*mtest).toAwaiting},
		{"pending (spawning)", (*mtest).toSpawning},
		{"starting", (*mtest).toStarting},
		{"ready", (*mtest).toReady},
		{"unhealthy", (*mtest).toUnhealthy},
		{"stopping (after a failure)", (*mtest).toStoppingFailure},
		{"stopping (held)", (*mtest).toStoppingHeld},
		{"backoff", (*mtest).toBackoff},
		{"failed", (*mtest).toFailed},
		{"stopped", (*mtest).toStopped},
		{"on demand: stopped (idle)", func(mt *mtest) *mtest { mt.m.cfg = onDemandCfg(); return mt.toIdleStopped() }},
		{"on demand: ready (within min_awake)", func(mt *mtest) *mtest { mt.m.cfg = onDemandCfg(); return mt.toODReady() }},
		{"on demand: ready", func(mt *mtest) *mtest {
			mt.m.cfg = onDemandCfg()
			mt.toODReady()
			mt.now = mt.now.Add(2 * time.Minute)
			return mt
		}},
		{"on demand: ready, its sleep waiting for quiet GPUs", func(mt *mtest) *mtest {
			mt.m.cfg = onDemandCfg()
			mt.toODReady()
			mt.now = mt.now.Add(11 * time.Minute)
			mt.step(EvIdle{})
			return mt
		}},
		{"on demand: going to sleep", func(mt *mtest) *mtest { mt.m.cfg = onDemandCfg(); return mt.toGoingToSleep() }},
		{"on demand: asleep", func(mt *mtest) *mtest { mt.m.cfg = onDemandCfg(); return mt.toAsleep() }},
		{"on demand: started by a request (awaiting GPUs)", func(mt *mtest) *mtest {
			mt.m.cfg = onDemandCfg()
			mt.toIdleStopped()
			mt.step(EvDemand{})
			mt.step(EvChecked{})
			return mt
		}},
		{"on demand: waking (awaiting GPUs)", func(mt *mtest) *mtest { mt.m.cfg = onDemandCfg(); return mt.toWakingAwaiting() }},
		{"on demand: waking", func(mt *mtest) *mtest { mt.m.cfg = onDemandCfg(); return mt.toWaking() }},
		{"on demand: adopted after a crash, asking its engine", func(mt *mtest) *mtest { mt.m.cfg = onDemandCfg(); return mt.toAsking() }},
	}
	respawn := testModelCfg()
	respawn.MaxModelLen = 4096
	disabled := testModelCfg()
	disabled.Enabled = false
	events := []func(mt *mtest) Event{
		func(*mtest) Event { return EvChecked{} },
		func(*mtest) Event { return EvChecked{Cause: CausePort, Reason: "port 11400 in use"} },
		func(mt *mtest) Event { return EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-b"}}} },
		func(mt *mtest) Event {
			return EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, Reason: "needs 41.0 GiB on 1 GPU; free 8.0 GiB (GPU0)"}}
		},
		func(mt *mtest) Event { return EvSpawned{Inst: mt.newInst()} },
		func(*mtest) Event { return EvSpawned{Err: errors.New("exec: no such file")} },
		func(mt *mtest) Event {
			return EvExited{Inst: mt.m.inst, Exit: Exit{Code: 137, Desc: "killed by SIGKILL"}}
		},
		func(mt *mtest) Event { return EvProbed{Inst: mt.m.inst} },
		func(mt *mtest) Event { return EvProbed{Inst: mt.m.inst, Err: errors.New("connection refused")} },
		func(mt *mtest) Event { return EvProbed{Inst: mt.m.inst, Err: &probe.StatusError{Code: 503}} },
		func(mt *mtest) Event { return EvServing{Inst: mt.m.inst} },
		func(*mtest) Event { return EvTimer{Tick} },
		func(*mtest) Event { return EvTimer{Deadline} },
		func(*mtest) Event { return EvOp{Op: OpStart} },
		func(*mtest) Event { return EvOp{Op: OpStop} },
		func(*mtest) Event { return EvOp{Op: OpRestart} },
		func(*mtest) Event { return EvOp{Op: OpReset} },
		func(*mtest) Event { return EvConfig{Config: respawn, Kind: config.Respawn} },
		func(*mtest) Event { return EvConfig{Config: testModelCfg(), Kind: config.Update} },
		func(*mtest) Event { return EvConfig{Config: disabled, Kind: config.Respawn} },
		func(mt *mtest) Event { return EvStopped{Inst: mt.m.inst} },
		func(mt *mtest) Event {
			return EvStopped{Inst: mt.m.inst, Err: errors.New("processes survived SIGKILL: 7 (x, state D)")}
		},
		func(*mtest) Event { return EvShutdown{} },
		func(*mtest) Event { return EvRemoved{} },
		func(*mtest) Event { return EvDemand{} },
		func(*mtest) Event { return EvUnwanted{} },
		func(*mtest) Event { return EvEvict{ForModel: "other"} },
		func(*mtest) Event { return EvIdle{Last: t0} },
		func(*mtest) Event { return EvIdle{Last: t0, InFlight: 1} },
		func(*mtest) Event { return EvSlept{} },
		func(*mtest) Event { return EvSlept{Aborted: true} },
		func(*mtest) Event { return EvSlept{Err: errors.New("HTTP 500")} },
		func(mt *mtest) Event { return EvWoke{Inst: mt.m.inst} },
		func(mt *mtest) Event { return EvWoke{Inst: mt.m.inst, Err: errors.New("canary: HTTP 500")} },
		func(*mtest) Event { return EvOp{Op: OpSleep} },
		func(*mtest) Event { return EvOp{Op: OpWake} },
		func(mt *mtest) Event { return EvQuiet{Seq: mt.m.quietSeq, OK: true} },
		func(mt *mtest) Event {
			return EvQuiet{Seq: mt.m.quietSeq, Reason: "b, which is starting or waking on GPU0"}
		},
		func(*mtest) Event { return EvSpawnSlow{What: "starting python3", After: spawnWait} },
		func(mt *mtest) Event { return EvEngineSleeps{Inst: mt.m.inst, Asleep: true} },
		func(mt *mtest) Event { return EvEngineSleeps{Inst: mt.m.inst} },
		func(mt *mtest) Event {
			return EvEngineSleeps{Inst: mt.m.inst, Err: errors.New("context deadline exceeded")}
		},
	}
	var b strings.Builder
	b.WriteString("# state × event → state: effects. Generated by TestMachineTransitions.\n")
	b.WriteString("# Effects: check (storage, env files, port), want(seq)/drop/ready/release(keep) (the scheduler),\n")
	b.WriteString("# spawn[GPUs], probe(live), observe (probe metrics), stop(term|rest), arm/disarm(timer,d),\n")
	b.WriteString("# sleep(level,cause)/slept (drain, /sleep; tell the scheduler), wake(level,bound)/woke (wake_up, canary), decline,\n")
	b.WriteString("# quiet(seq)/unquiet (ask the scheduler for quiet GPUs before a planned sleep or stop), canary (record the known answer).\n")
	for _, s := range states {
		fmt.Fprintf(&b, "\n%s\n", s.name)
		for _, mkEv := range events {
			mt := s.setup(newMTest(t))
			ev := mkEv(mt)
			before := mt.m.state
			efs := mt.step(ev)
			after := string(mt.m.state)
			if mt.m.state == before && len(efs) == 0 {
				after = "-"
			}
			line := fmt.Sprintf("  %-18s → %s", describeEvent(ev), after)
			if len(efs) > 0 {
				line += ": " + describe(efs)
			}
			b.WriteString(strings.TrimRight(line, " ") + "\n")
		}
	}
	golden := filepath.Join("testdata", "transitions.txt")
	if *update {
		if err := os.WriteFile(golden, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got := b.String(); got != string(want) {
		t.Errorf("transitions changed; if intended, run go test ./supervisor/lifecycle/ -run TestMachineTransitions -update and review the diff\n%s", diffLines(string(want), got))
	}
}

// diffLines shows the lines that differ.
func diffLines(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	var out []string
	for i := range max(len(w), len(g)) {
		var a, b string
		if i < len(w) {
			a = w[i]
		}
		if i < len(g) {
			b = g[i]
		}
		if a != b {
			out = append(out, fmt.Sprintf("line %d:\n  want %s\n  got  %s", i+1, a, b))
		}
	}
	return strings.Join(out, "\n")
}

// TestMachineStartToReady walks the happy path.
func TestMachineStartToReady(t *testing.T) {
	mt := newMTest(t)
	if got := describe(mt.m.Begin()); got != "disarm(tick) check" {
		t.Fatalf("begin: %s", got)
	}
	mt.state(Pending)
	mt.expect(EvChecked{}, "want(1)")
	mt.expect(EvPlaced{schedule.Placement{Seq: 1, Reason: "waiting for GPU0: a is starting"}}, "")
	if mt.m.reason != "waiting for GPU0: a is starting" || mt.m.cause != CauseGPU {
		t.Errorf("pending reason %q cause %q", mt.m.reason, mt.m.cause)
	}
	mt.expect(EvPlaced{schedule.Placement{Seq: 1, GPUs: []string{"GPU-a"}}}, "spawn[GPU-a]")
	inst := mt.newInst()
	mt.expect(EvSpawned{Inst: inst}, "record arm(deadline,20m0s) arm(tick,1s)")
	mt.state(Starting)
	mt.expect(EvTimer{Tick}, "probe")
	mt.expect(EvProbed{Inst: inst, Err: errors.New("connection refused")}, "arm(tick,1s)")
	mt.state(Starting)
	mt.expect(EvTimer{Tick}, "probe")
	mt.now = mt.now.Add(42 * time.Second)
	mt.expect(EvProbed{Inst: inst}, "disarm(deadline) ready arm(tick,10s)")
	mt.state(Ready)
	if st := mt.m.Status(); st.StartupDuration != 42*time.Second || st.PID != inst.PID || !slices.Equal(st.GPUs, []string{"GPU-a"}) {
		t.Errorf("status %+v", st)
	}
}

// TestMachineIgnoresStaleAnswers: a placement for a withdrawn want and a
// probe result about an earlier process change nothing.
func TestMachineIgnoresStaleAnswers(t *testing.T) {
	mt := newMTest(t).toAwaiting()
	mt.expect(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq - 1, GPUs: []string{"GPU-a"}}}, "")
	old := newMTest(t).toReady().m.inst
	mt = newMTest(t).toReady()
	mt.expect(EvProbed{Inst: old, Err: errors.New("refused")}, "")
	mt.expect(EvExited{Inst: old}, "")
	mt.expect(EvStopped{Inst: old}, "")
	mt.state(Ready)
}

// TestMachineProbeThreshold: failures after ready count up to the
// threshold, a success clears them, a 5xx restarts at once.
func TestMachineProbeThreshold(t *testing.T) {
	mt := newMTest(t).toReady()
	fail := func() {
		mt.step(EvTimer{Tick})
		mt.step(EvProbed{Inst: mt.m.inst, Err: errors.New("timeout")})
	}
	fail()
	fail()
	mt.state(Unhealthy)
	mt.step(EvTimer{Tick})
	mt.expect(EvProbed{Inst: mt.m.inst}, "observe")
	mt.state(Ready)
	fail()
	fail()
	mt.step(EvTimer{Tick})
	mt.expect(EvProbed{Inst: mt.m.inst, Err: errors.New("timeout")}, "observe disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	mt.state(Stopping)
	if mt.m.restarts[ReasonProbe] != 1 {
		t.Errorf("restarts %v", mt.m.restarts)
	}

	mt = newMTest(t).toReady()
	mt.step(EvTimer{Tick})
	mt.expect(EvProbed{Inst: mt.m.inst, Err: &probe.StatusError{Code: 500}}, "observe disarm(tick) disarm(deadline) disarm(idle) stop(term)")
}

// TestMachineLocalProbeFailureIsNoVerdict: a probe the daemon could not
// make (its own EMFILE) counts neither for nor against the model, however
// many there are, in starting, ready or unhealthy: no failure counted, no
// restart, the next probe at the usual period.
func TestMachineLocalProbeFailureIsNoVerdict(t *testing.T) {
	local := fmt.Errorf("%w: %w", ErrNoVerdict, &net.OpError{Op: "dial", Err: os.NewSyscallError("socket", syscall.EMFILE)})
	mt := newMTest(t).toReady()
	for range 10 {
		mt.step(EvTimer{Tick})
		mt.expect(EvProbed{Inst: mt.m.inst, Err: local}, "arm(tick,10s)")
	}
	mt.state(Ready)
	if mt.m.probeFails != 0 || len(mt.m.restarts) != 0 {
		t.Errorf("probeFails %d, restarts %v", mt.m.probeFails, mt.m.restarts)
	}

	mt = newMTest(t).toUnhealthy()
	mt.step(EvTimer{Tick})
	mt.expect(EvProbed{Inst: mt.m.inst, Err: local}, "arm(tick,10s)")
	mt.state(Unhealthy)

	mt = newMTest(t).toStarting()
	mt.expect(EvProbed{Inst: mt.m.inst, Err: local}, "arm(tick,1s)")
	mt.state(Starting)
}

// TestMachineProbeInFlightSkipsTick: a tick while a probe is in flight
// re-arms without a second probe (no pile-up on a slow model).
func TestMachineProbeInFlightSkipsTick(t *testing.T) {
	mt := newMTest(t).toReady()
	mt.expect(EvTimer{Tick}, "arm(tick,10s) probe(live)")
	mt.expect(EvTimer{Tick}, "arm(tick,10s)")
}

// TestMachineBackoffAndStartLimit: each failure backs off twice as long,
// and the burst-th start within the interval fails the model.
func TestMachineBackoffAndStartLimit(t *testing.T) {
	mt := newMTest(t).toStarting()
	var delays []string
	for i := range 5 {
		mt.step(EvExited{Inst: mt.m.inst, Exit: Exit{Code: 1, Desc: "exit code 1"}})
		efs := mt.step(EvStopped{Inst: mt.m.inst})
		if i == 4 {
			mt.state(Failed)
			if !strings.HasPrefix(mt.m.reason, "start limit: 5 starts within 30m0s; last: exited (exit code 1)") {
				t.Errorf("reason %q", mt.m.reason)
			}
			if got := describe(efs); got != "release arm(tick,1h0m0s)" {
				t.Errorf("failed effects %s", got)
			}
			break
		}
		mt.state(Backoff)
		delays = append(delays, describe(efs))
		mt.now = mt.now.Add(time.Minute)
		mt.step(EvTimer{Tick})
		mt.step(EvChecked{})
		mt.step(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}})
		mt.step(EvSpawned{Inst: mt.newInst()})
	}
	want := []string{
		"release(keep) arm(tick,10s)", "release(keep) arm(tick,20s)",
		"release(keep) arm(tick,40s)", "release(keep) arm(tick,1m20s)",
	}
	if !slices.Equal(delays, want) {
		t.Errorf("backoff %q\nwant %q", delays, want)
	}
	if mt.m.restarts[ReasonExit] != 5 {
		t.Errorf("restarts %v", mt.m.restarts)
	}
	// retry_failed_after: the limit is forgotten and it starts again.
	mt.expect(EvTimer{Tick}, "disarm(tick) check")
	mt.state(Pending)
}

// TestMachineStartDuringFailureStopKeepsTheFailure is the regression for
// an operator's start arriving while a crashed model's remains are being
// stopped: the crash must still count (citadel_model_restarts_total
// {reason="exit"} feeds the flapping alert), and the start wins over the
// backoff.
func TestMachineStartDuringFailureStopKeepsTheFailure(t *testing.T) {
	mt := newMTest(t).toStoppingFailure()
	mt.expect(EvOp{Op: OpStart}, "")
	if mt.m.restarts[ReasonExit] != 1 {
		t.Fatalf("restarts %v", mt.m.restarts)
	}
	mt.expect(EvStopped{Inst: mt.m.inst}, "release(keep) disarm(tick) check")
	mt.state(Pending)
	if mt.m.reason != "started by operator" || mt.m.restarts[ReasonExit] != 1 {
		t.Errorf("%s %q %v", mt.m.state, mt.m.reason, mt.m.restarts)
	}
}

// TestMachineStopDuringFailureStopHolds: held wins over the backoff.
func TestMachineStopDuringFailureStopHolds(t *testing.T) {
	mt := newMTest(t).toStoppingFailure()
	mt.expect(EvOp{Op: OpStop}, "")
	mt.expect(EvStopped{Inst: mt.m.inst}, "release")
	mt.state(Stopped)
	if mt.m.reason != "held stopped by operator" {
		t.Errorf("reason %q", mt.m.reason)
	}
}

// TestMachineRespawnKeepsGPUs: a restart and a reload respawn release the
// GPUs with keep, so the scheduler reserves them for the model instead of
// giving them to whoever waits.
func TestMachineRespawnKeepsGPUs(t *testing.T) {
	mt := newMTest(t).toReady()
	cfg := testModelCfg()
	cfg.MaxModelLen = 8192
	mt.quiet(EvConfig{Config: cfg, Kind: config.Respawn}, "disarm(deadline) disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	mt.expect(EvStopped{Inst: mt.m.inst}, "release(keep) disarm(tick) check")
	if mt.m.reason != "configuration changed" || mt.m.restarts[ReasonReload] != 1 {
		t.Errorf("%q %v", mt.m.reason, mt.m.restarts)
	}
	mt.expect(EvChecked{}, "want(2)")

	mt = newMTest(t).toReady()
	mt.quiet(EvOp{Op: OpRestart}, "disarm(deadline) disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	mt.expect(EvStopped{Inst: mt.m.inst}, "release(keep) disarm(tick) check")
	if mt.m.restarts[ReasonManual] != 1 {
		t.Errorf("%v", mt.m.restarts)
	}
}

// TestMachineShutdown: live models stop and end stopped; the machine is
// done once nothing runs; operations after it change nothing.
func TestMachineShutdown(t *testing.T) {
	mt := newMTest(t).toReady()
	mt.expect(EvShutdown{}, "disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	if mt.m.Done() {
		t.Fatal("done with a process running")
	}
	mt.expect(EvOp{Op: OpStart}, "")
	mt.expect(EvStopped{Inst: mt.m.inst}, "release")
	mt.state(Stopped)
	if !mt.m.Done() {
		t.Fatal("not done after the stop")
	}

	mt = newMTest(t).toAwaiting()
	mt.expect(EvShutdown{}, "disarm(tick) disarm(deadline) drop")
	if !mt.m.Done() {
		t.Fatal("a pending model is done at once")
	}
}

// TestMachineStartupTimeout: a model that never answers is restarted
// after startup_timeout, counted as startup.
func TestMachineStartupTimeout(t *testing.T) {
	mt := newMTest(t).toStarting()
	mt.expect(EvTimer{Deadline}, "disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	if mt.m.restarts[ReasonStartup] != 1 || !strings.Contains(mt.m.reason, "startup_timeout 20m0s") {
		t.Errorf("%q %v", mt.m.reason, mt.m.restarts)
	}
}

// TestMachineDisabledStartsStopped: enabled: false is held stopped, and
// enabling it starts it.
func TestMachineDisabledStartsStopped(t *testing.T) {
	mt := newMTest(t)
	cfg := testModelCfg()
	cfg.Enabled = false
	mt.m.cfg = cfg
	if efs := mt.m.Begin(); len(efs) != 0 {
		t.Fatalf("begin: %s", describe(efs))
	}
	mt.state(Stopped)
	mt.expect(EvConfig{Config: testModelCfg(), Kind: config.Respawn}, "disarm(tick) check")
	if mt.m.restarts[ReasonReload] != 0 {
		t.Errorf("enabling a model is not a restart: %v", mt.m.restarts)
	}
}

// TestMachineOnDemandCycle: idle → started by a request → ready → idle
// for idle_after → asleep → woken by a request → ready again.
func TestMachineOnDemandCycle(t *testing.T) {
	mt := newODTest(t)
	if efs := mt.m.Begin(); len(efs) != 0 || mt.m.state != Stopped || mt.m.Status().Held {
		t.Fatalf("begin: %s %s held=%v", describe(efs), mt.m.state, mt.m.Status().Held)
	}
	if !mt.m.Status().Serving() {
		t.Error("an idle on-demand model is serving (startable)")
	}
	mt.expect(EvDemand{}, "disarm(tick) check")
	mt.expect(EvChecked{}, "want(1)")
	mt.expect(EvPlaced{schedule.Placement{Seq: 1, GPUs: []string{"GPU-a"}}}, "spawn[GPU-a]")
	inst := mt.newInst()
	mt.step(EvSpawned{Inst: inst})
	mt.step(EvTimer{Tick})
	mt.expect(EvProbed{Inst: inst}, "disarm(deadline) ready arm(tick,10s) arm(idle,10m0s) canary")

	// A request 4 minutes in: the idle check 10 minutes after waking
	// re-arms for the 4 minutes left.
	mt.now = mt.now.Add(10 * time.Minute)
	mt.expect(EvIdle{Last: t0.Add(4 * time.Minute)}, "arm(idle,4m0s)")
	mt.now = mt.now.Add(4 * time.Minute)
	mt.expect(EvIdle{Last: t0.Add(4 * time.Minute), InFlight: 2}, "arm(idle,10m0s)")
	mt.now = mt.now.Add(10 * time.Minute)
	mt.quiet(EvIdle{Last: t0.Add(4 * time.Minute)}, "disarm(deadline) disarm(tick) disarm(idle) sleep(1,idle)")
	mt.state(Sleeping)
	// A request during the sleep: woken once asleep.
	mt.expect(EvDemand{}, "")
	mt.expect(EvSlept{}, "slept(1,idle) want(2)")
	mt.state(Waking)
	if st := mt.m.Status(); !st.Serving() {
		t.Error("a waking on-demand model is serving")
	}
	mt.expect(EvPlaced{schedule.Placement{Seq: 2, Reason: "to wake: needs 41.0 GiB on GPU0; free 8.0 GiB"}}, "")
	if !strings.Contains(mt.m.reason, "to wake: needs") {
		t.Errorf("reason %q", mt.m.reason)
	}
	mt.expect(EvPlaced{schedule.Placement{Seq: 2, GPUs: []string{"GPU-a"}}}, "wake(1,2m0s) arm(deadline,2m0s) arm(tick,10s)")
	mt.now = mt.now.Add(3 * time.Second)
	mt.expect(EvWoke{Inst: inst}, "disarm(deadline) ready woke(1) arm(tick,10s) arm(idle,10m0s)")
	mt.state(Ready)
	if mt.m.inst != inst {
		t.Error("the wake changed the process")
	}
}

// TestMachineSleepLevelZeroStops: sleep_level 0 gives the GPUs back by
// stopping; the model is idle-stopped (not held) and starts at the next
// request.
func TestMachineSleepLevelZeroStops(t *testing.T) {
	mt := newODTest(t)
	cfg := onDemandCfg()
	cfg.SleepLevel = 0
	mt.m.cfg = cfg
	mt.toODReady()
	mt.now = mt.now.Add(time.Hour)
	mt.quiet(EvIdle{}, "disarm(deadline) disarm(tick) disarm(deadline) disarm(idle) stop(term) slept(0,idle)")
	mt.expect(EvStopped{Inst: mt.m.inst}, "release")
	mt.state(Stopped)
	if st := mt.m.Status(); st.Held || !st.Serving() {
		t.Errorf("held=%v serving=%v", st.Held, st.Serving())
	}
	mt.expect(EvDemand{}, "disarm(tick) check")
}

// TestMachineSleepAbortedStaysAwake: a drain that does not complete keeps
// the model awake; an eviction that cannot happen is declined.
func TestMachineSleepAbortedStaysAwake(t *testing.T) {
	mt := newODTest(t).toODReady()
	mt.now = mt.now.Add(2 * time.Minute) // past min_awake
	mt.quiet(EvEvict{ForModel: "big"}, "disarm(deadline) disarm(tick) disarm(idle) sleep(1,evicted)")
	mt.expect(EvSlept{Aborted: true}, "record unquiet arm(tick,10s) arm(idle,10m0s) decline")
	mt.state(Ready)
}

// TestMachineSleepOnlyOnDemand: an always model refuses sleep and wake by
// hand, with a reason.
func TestMachineSleepOnlyOnDemand(t *testing.T) {
	mt := newMTest(t).toReady()
	mt.expect(EvOp{Op: OpSleep}, "")
	if mt.m.opErr == nil || !strings.Contains(mt.m.opErr.Error(), "not on demand") {
		t.Errorf("opErr %v", mt.m.opErr)
	}
	mt.state(Ready)
}

// TestMachineRestartReplacesIdleStop: a restart asked while an on-demand
// model's idle stop (sleep_level 0) waits for quiet GPUs replaces what
// follows that stop; an operator's stop, then start, leaves the restart
// undone, not the idle stop it replaced.
func TestMachineRestartReplacesIdleStop(t *testing.T) {
	cfg := onDemandCfg()
	cfg.SleepLevel = 0
	mt := newMTest(t)
	mt.m.cfg = cfg
	mt.toODReady()
	mt.now = mt.now.Add(11 * time.Minute)
	mt.step(EvIdle{})
	mt.step(EvOp{Op: OpRestart})
	mt.step(EvOp{Op: OpStop})
	mt.step(EvOp{Op: OpStart})
	mt.quietOK()
	mt.state(Stopping)
	mt.step(EvStopped{Inst: mt.m.inst})
	mt.state(Pending)
}

// TestMachineUnwantedAbandons: when every request waiting for an on-demand
// model leaves, a start or wake they asked for that has not begun is
// abandoned; one an operator asked for, or one under way, goes on.
func TestMachineUnwantedAbandons(t *testing.T) {
	t.Run("wake awaiting its memory", func(t *testing.T) {
		mt := newODTest(t).toWakingAwaiting()
		seq := mt.m.wantSeq
		mt.expect(EvUnwanted{}, "withdraw")
		mt.state(Sleeping)
		if st := mt.m.Status(); st.SleepLevel != 1 || !st.Serving() {
			t.Errorf("asleep again: level %d serving %v", st.SleepLevel, st.Serving())
		}
		// The scheduler's answer to the withdrawn want changes nothing.
		mt.expect(EvPlaced{schedule.Placement{Seq: seq, GPUs: []string{"GPU-a"}}}, "")
		mt.state(Sleeping)
		mt.expect(EvDemand{}, "want(4)") // the next request wakes it
		mt.state(Waking)
	})
	t.Run("start awaiting GPUs", func(t *testing.T) {
		mt := newODTest(t).toIdleStopped()
		mt.expect(EvDemand{}, "disarm(tick) check")
		mt.expect(EvChecked{}, "want(1)")
		mt.expect(EvUnwanted{}, "disarm(tick) drop")
		mt.state(Stopped)
		if st := mt.m.Status(); st.Held || !st.Serving() {
			t.Errorf("startable again: held %v serving %v", st.Held, st.Serving())
		}
		mt.expect(EvPlaced{schedule.Placement{Seq: 1, GPUs: []string{"GPU-a"}}}, "")
		mt.expect(EvDemand{}, "disarm(tick) check")
	})
	t.Run("wake after a sleep in flight", func(t *testing.T) {
		mt := newODTest(t).toGoingToSleep()
		mt.expect(EvDemand{}, "")
		mt.expect(EvUnwanted{}, "")
		mt.expect(EvSlept{}, "slept(1,idle)") // no want(2): nobody waits
		mt.state(Sleeping)
	})
	t.Run("a wake under way goes on", func(t *testing.T) {
		mt := newODTest(t).toWaking()
		mt.expect(EvUnwanted{}, "")
		mt.state(Waking)
		mt.expect(EvWoke{Inst: mt.m.inst}, "disarm(deadline) ready woke(1) arm(tick,10s) arm(idle,10m0s)")
	})
	t.Run("a spawned start goes on", func(t *testing.T) {
		mt := newODTest(t).toIdleStopped()
		mt.step(EvDemand{})
		mt.step(EvChecked{})
		mt.step(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}})
		mt.step(EvSpawned{Inst: mt.newInst()})
		mt.expect(EvUnwanted{}, "")
		mt.state(Starting)
	})
	t.Run("an operator's start during an idle stop goes on", func(t *testing.T) {
		mt := newODTest(t).toAsleep()
		mt.step(EvEvict{ForModel: "other"})
		mt.quietOK()
		mt.state(Stopping)
		mt.step(EvOp{Op: OpStart})
		mt.expect(EvDemand{}, "") // a request joins the operator's start
		mt.step(EvStopped{Inst: mt.m.inst})
		mt.state(Pending)
		mt.step(EvChecked{})
		mt.expect(EvUnwanted{}, "")
		mt.state(Pending)
	})
	t.Run("an operator's wake goes on", func(t *testing.T) {
		mt := newODTest(t).toAsleep()
		mt.expect(EvOp{Op: OpWake}, "want(2)")
		mt.expect(EvDemand{}, "") // a request joins the operator's wake
		mt.expect(EvUnwanted{}, "")
		mt.state(Waking)
	})
}

// TestMachineLoadEstimates: the status carries the median of the recent
// starts and wakes, and when the one in progress began, for the gateway's
// Retry-After.
func TestMachineLoadEstimates(t *testing.T) {
	mt := newODTest(t).toIdleStopped()
	for i, took := range []time.Duration{40, 10, 12, 11, 90, 13} {
		asked := mt.now
		mt.step(EvDemand{})
		mt.now = mt.now.Add(time.Second) // placement takes its time: counted
		took--
		mt.step(EvChecked{})
		mt.step(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}})
		inst := mt.newInst()
		mt.step(EvSpawned{Inst: inst})
		if st := mt.m.Status(); !st.LoadBegan.Equal(asked) {
			t.Fatalf("start %d: began %v, want when it was asked for %v", i, st.LoadBegan, asked)
		}
		mt.now = mt.now.Add(took * time.Second)
		mt.step(EvProbed{Inst: inst})
		mt.state(Ready)
		mt.now = mt.now.Add(time.Hour)
		mt.step(EvIdle{})
		mt.quietOK()
		mt.step(EvSlept{})
		mt.state(Sleeping)
		mt.step(EvDemand{})
		mt.step(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}})
		if st := mt.m.Status(); st.State != Waking || !st.LoadBegan.Equal(mt.now) || st.WakeLevel != 1 {
			t.Fatalf("wake %d: %s began %v level %d", i, st.State, st.LoadBegan, st.WakeLevel)
		}
		mt.now = mt.now.Add(took * time.Second / 10)
		mt.step(EvWoke{Inst: mt.m.inst})
		// Back to stopped for the next start (the sleep and the stop each
		// wait for quiet GPUs).
		mt.now = mt.now.Add(time.Hour)
		mt.step(EvIdle{})
		mt.quietOK()
		mt.step(EvSlept{})
		mt.step(EvEvict{ForModel: "other"})
		mt.quietOK()
		mt.step(EvStopped{Inst: mt.m.inst})
		mt.state(Stopped)
	}
	// The last five starts: 10 12 11 90 13 → 12; wakes a tenth of each
	// less the placement second: .9 1.1 1 8.9 1.2 → 1.1.
	st := mt.m.Status()
	if st.TypicalStartup != 12*time.Second {
		t.Errorf("typical startup %v, want 12s (the median of the last five)", st.TypicalStartup)
	}
	if got := gpu.Typical(mt.m.wakes[1]); got != 1100*time.Millisecond {
		t.Errorf("typical wake %v, want 1.1s", got)
	}
	mt.step(EvDemand{})
	if st := mt.m.Status(); st.TypicalStartup != 12*time.Second || !st.LoadBegan.Equal(mt.now) {
		t.Errorf("pending: %v began %v, want now", st.TypicalStartup, st.LoadBegan)
	}
}

// TestMachineServing: a starting model that says it serves is probed at
// once, then every burstPoll, then every fastPoll until it answers (for
// fastFor); a line from an
// earlier process, or from a model not starting, changes nothing.
func TestMachineServing(t *testing.T) {
	mt := newMTest(t).toStarting()
	inst := mt.m.inst
	mt.expect(EvServing{Inst: &Instance{}}, "")
	mt.expect(EvServing{Inst: inst}, "probe")
	mt.expect(EvServing{Inst: inst}, "") // the probe in flight answers
	mt.expect(EvProbed{Inst: inst, Err: errors.New("connection refused")}, "arm(tick,5ms)")
	mt.now = mt.now.Add(burstFor)
	mt.expect(EvTimer{Tick}, "probe")
	mt.expect(EvProbed{Inst: inst, Err: errors.New("connection refused")}, "arm(tick,50ms)")
	mt.now = mt.now.Add(fastFor)
	mt.expect(EvTimer{Tick}, "probe")
	mt.expect(EvProbed{Inst: inst, Err: errors.New("connection refused")}, "arm(tick,1s)")
	mt.expect(EvServing{Inst: inst}, "probe")
	mt.expect(EvProbed{Inst: inst}, "disarm(deadline) ready arm(tick,10s)")
	mt.state(Ready)
	mt.expect(EvServing{Inst: inst}, "")
}

// TestMachineStartupPollWindow: once a start's spawn-to-ready time is
// known, the next start is probed every fastPoll from a fifth before that
// time to half of it after (a second at least either side), and at the
// startup poll outside, never sleeping past the window's start.
func TestMachineStartupPollWindow(t *testing.T) {
	mt := newMTest(t).toStarting()
	mt.now = mt.now.Add(30 * time.Second)
	mt.expect(EvTimer{Tick}, "probe")
	mt.expect(EvProbed{Inst: mt.m.inst}, "disarm(deadline) ready arm(tick,10s)")
	mt.step(EvOp{Op: OpRestart})
	mt.quietOK()
	mt.step(EvStopped{Inst: mt.m.inst})
	mt.step(EvChecked{})
	mt.step(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}})
	if got := describe(mt.step(EvSpawned{Inst: mt.newInst()})); got != "record arm(deadline,20m0s) arm(tick,1s)" {
		t.Fatalf("spawned: %s", got)
	}
	refused := func(after time.Duration, want string) {
		t.Helper()
		mt.now = mt.m.inst.Started.Add(after)
		mt.step(EvTimer{Tick})
		mt.expect(EvProbed{Inst: mt.m.inst, Err: errors.New("connection refused")}, want)
	}
	refused(10*time.Second, "arm(tick,1s)")
	refused(23500*time.Millisecond, "arm(tick,500ms)") // wakes at the window's start, 24s
	refused(24*time.Second, "arm(tick,50ms)")
	refused(44*time.Second, "arm(tick,50ms)")
	refused(46*time.Second, "arm(tick,1s)")
}
