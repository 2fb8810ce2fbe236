package lifecycle

import (
	"errors"
	"strings"
	"testing"
	"time"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/liverestore"
)

// spawnWait is how long the runner lets a spawn run before it reports
// EvSpawnSlow (supervisor/spawning.go).
const spawnWait = 2 * time.Second

// TestMachineAskedDuringSpawn: what is asked while a spawn is in flight
// (the runner goes on taking events meanwhile) is applied once the spawn
// returns: a process it started is stopped first, never lost.
func TestMachineAskedDuringSpawn(t *testing.T) {
	t.Run("stop: its process is stopped, then held", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		mt.expect(EvOp{Op: OpStop}, "")
		mt.state(Pending)
		if !strings.Contains(mt.m.reason, "spawning; stopped once it returns (held stopped by operator)") {
			t.Fatalf("reason %q", mt.m.reason)
		}
		inst := mt.newInst()
		mt.expect(EvSpawned{Inst: inst}, "disarm(tick) disarm(deadline) disarm(idle) stop(term)")
		mt.state(Stopping)
		mt.expect(EvStopped{Inst: inst}, "release")
		mt.state(Stopped)
		if mt.m.reason != "held stopped by operator" {
			t.Fatalf("reason %q", mt.m.reason)
		}
	})
	t.Run("stop, then its spawn fails: held, its want dropped", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		mt.step(EvOp{Op: OpStop})
		mt.expect(EvSpawned{Err: errors.New("exec: no such file")}, "disarm(tick) drop")
		mt.state(Stopped)
	})
	t.Run("stop, then start: it starts as spawned", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		mt.step(EvOp{Op: OpStop})
		mt.expect(EvOp{Op: OpStart}, "")
		if mt.m.reason != "spawning" {
			t.Fatalf("reason %q", mt.m.reason)
		}
		mt.expect(EvSpawned{Inst: mt.newInst()}, "record arm(deadline,20m0s) arm(tick,1s)")
		mt.state(Starting)
	})
	t.Run("restart: stopped, then pending with its GPUs kept", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		mt.expect(EvOp{Op: OpRestart}, "")
		inst := mt.newInst()
		mt.expect(EvSpawned{Inst: inst}, "disarm(tick) disarm(deadline) disarm(idle) stop(term)")
		mt.expect(EvStopped{Inst: inst}, "release(keep) disarm(tick) check")
		mt.state(Pending)
	})
	t.Run("reload that changes it, its spawn failing a check: checked again", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		c := testModelCfg()
		c.MaxModelLen = 4096
		mt.expect(EvConfig{Config: c, Kind: config.Respawn}, "")
		mt.expect(EvSpawned{Cause: CausePort, Reason: "port 11400 in use"}, "drop disarm(tick) check")
		mt.state(Pending)
	})
	t.Run("shutdown: not done until its spawn returned and its process stopped", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		mt.expect(EvShutdown{}, "")
		if mt.m.Done() {
			t.Fatal("done with a spawn in flight")
		}
		inst := mt.newInst()
		mt.expect(EvSpawned{Inst: inst}, "disarm(tick) disarm(deadline) disarm(idle) stop(term)")
		mt.expect(EvStopped{Inst: inst}, "release")
		mt.state(Stopped)
		if !mt.m.Done() {
			t.Fatal("not done after its stop")
		}
	})
	t.Run("removed: done once its spawn returned nothing", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		mt.expect(EvRemoved{}, "")
		if mt.m.Done() {
			t.Fatal("done with a spawn in flight")
		}
		mt.expect(EvSpawned{Cause: CauseDaemon, Reason: "short"}, "disarm(tick) drop")
		if !mt.m.Done() {
			t.Fatalf("not done: %s (%s)", mt.m.state, mt.m.reason)
		}
	})
	t.Run("a spawn that hangs says on what; a tick does not check again", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		mt.expect(EvSpawnSlow{What: "starting /opt/venv/bin/python3", After: spawnWait}, "")
		if want := "spawn hangs: starting /opt/venv/bin/python3 has not returned after 2s"; mt.m.reason != want {
			t.Fatalf("reason %q, want %q", mt.m.reason, want)
		}
		mt.expect(EvTimer{Tick}, "")
		mt.expect(EvOp{Op: OpStop}, "")
		if !strings.HasSuffix(mt.m.reason, "has not returned after 2s; stopped once it returns (held stopped by operator)") {
			t.Fatalf("reason %q", mt.m.reason)
		}
		if err := mt.m.Restorable(); err == nil {
			t.Fatal("restorable with a spawn in flight")
		}
	})
}

// TestMachineAdoptedAsksWhetherItSleeps: an on-demand process adopted
// after a crash, whose record says awake, counts as loading (no request
// goes to it) until its engine says whether it sleeps; a stop meanwhile
// makes the answer moot.
func TestMachineAdoptedAsksWhetherItSleeps(t *testing.T) {
	mt := newODTest(t)
	inst := mt.newInst()
	inst.Adopted = true
	digest := mt.m.cfg.SpawnDigest()
	got := describe(mt.m.Restore(liverestore.ModelState{Instance: &liverestore.InstanceState{Model: "m", PID: inst.PID, Started: mt.now, ReadyAt: mt.now, Digest: digest}}, inst, digest, false))
	if got != "adopt(starting) ask-sleeping" {
		t.Fatalf("restore: %s", got)
	}
	mt.state(Starting)
	if err := mt.m.Restorable(); err == nil || !strings.Contains(err.Error(), "asked whether it sleeps") {
		t.Fatalf("restorable while asking: %v", err)
	}
	mt.expect(EvTimer{Tick}, "")
	mt.expect(EvServing{Inst: inst}, "")
	mt.expect(EvOp{Op: OpStop}, "disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	mt.expect(EvEngineSleeps{Inst: inst, Asleep: true}, "")
	mt.state(Stopping)

	// Not adopted (an upgrade of its own child): nothing to ask.
	mt = newODTest(t)
	inst = mt.newInst()
	if got := describe(mt.m.Restore(liverestore.ModelState{State: Ready, Instance: &liverestore.InstanceState{Model: "m", PID: inst.PID, Digest: digest}}, inst, digest, false)); got != "adopt(running) arm(tick,1s) arm(idle,10m0s)" {
		t.Fatalf("restore of a child: %s", got)
	}
}

// TestMachineSpawnRespawnThenStopStart: a reload that changes the model
// while its spawn is in flight, then an operator's stop and start, still
// has the process the spawn returns (started with the old configuration)
// stopped and started again: the start lifts the hold, not the restart the
// reload asked for. (As it does for a model that runs: stopped, then
// started with the new configuration.)
func TestMachineSpawnRespawnThenStopStart(t *testing.T) {
	mt := newMTest(t).toSpawning()
	c := testModelCfg()
	c.MaxModelLen = 4096
	mt.step(EvConfig{Config: c, Kind: config.Respawn})
	mt.step(EvOp{Op: OpStop})
	mt.step(EvOp{Op: OpStart})
	inst := mt.newInst()
	mt.expect(EvSpawned{Inst: inst}, "disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	mt.expect(EvStopped{Inst: inst}, "release(keep) disarm(tick) check")
	mt.state(Pending)
}

// TestMachineRemovedDuringSpawnStartIgnored: an operator's start that
// reaches a model a reload removed (its Do looked the runner up before
// the reload) does not lift the removal's hold: the process its spawn
// returns is stopped and the runner ends.
func TestMachineRemovedDuringSpawnStartIgnored(t *testing.T) {
	mt := newMTest(t).toSpawning()
	mt.step(EvRemoved{})
	mt.step(EvOp{Op: OpStart})
	inst := mt.newInst()
	mt.expect(EvSpawned{Inst: inst}, "disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	mt.expect(EvStopped{Inst: inst}, "release")
	if !mt.m.Done() {
		t.Fatalf("a removed model not done after its stop: %s (%s)", mt.m.state, mt.m.reason)
	}
}
