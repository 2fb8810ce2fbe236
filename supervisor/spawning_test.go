package supervisor

import (
	"context"
	"errors"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/liverestore"
	"citadel-supervisor/supervisor/proc"
)

// TestMachineAskedDuringSpawn: what is asked while a spawn is in flight
// (the runner goes on taking events meanwhile) is applied once the spawn
// returns: a process it started is stopped first, never lost.
func TestMachineAskedDuringSpawn(t *testing.T) {
	t.Run("stop: its process is stopped, then held", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		mt.expect(evOp{op: OpStop}, "")
		mt.state(Pending)
		if !strings.Contains(mt.m.reason, "spawning; stopped once it returns (held stopped by operator)") {
			t.Fatalf("reason %q", mt.m.reason)
		}
		inst := mt.newInst()
		mt.expect(evSpawned{inst: inst}, "disarm(tick) disarm(deadline) disarm(idle) stop(term)")
		mt.state(Stopping)
		mt.expect(evStopped{inst: inst}, "release")
		mt.state(Stopped)
		if mt.m.reason != "held stopped by operator" {
			t.Fatalf("reason %q", mt.m.reason)
		}
	})
	t.Run("stop, then its spawn fails: held, its want dropped", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		mt.step(evOp{op: OpStop})
		mt.expect(evSpawned{err: errors.New("exec: no such file")}, "disarm(tick) drop")
		mt.state(Stopped)
	})
	t.Run("stop, then start: it starts as spawned", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		mt.step(evOp{op: OpStop})
		mt.expect(evOp{op: OpStart}, "")
		if mt.m.reason != "spawning" {
			t.Fatalf("reason %q", mt.m.reason)
		}
		mt.expect(evSpawned{inst: mt.newInst()}, "record arm(deadline,20m0s) arm(tick,1s)")
		mt.state(Starting)
	})
	t.Run("restart: stopped, then pending with its GPUs kept", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		mt.expect(evOp{op: OpRestart}, "")
		inst := mt.newInst()
		mt.expect(evSpawned{inst: inst}, "disarm(tick) disarm(deadline) disarm(idle) stop(term)")
		mt.expect(evStopped{inst: inst}, "release(keep) disarm(tick) check")
		mt.state(Pending)
	})
	t.Run("reload that changes it, its spawn failing a check: checked again", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		c := testModelCfg()
		c.MaxModelLen = 4096
		mt.expect(evConfig{cfg: c, kind: config.Respawn}, "")
		mt.expect(evSpawned{cause: CausePort, reason: "port 11400 in use"}, "drop disarm(tick) check")
		mt.state(Pending)
	})
	t.Run("shutdown: not done until its spawn returned and its process stopped", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		mt.expect(evShutdown{}, "")
		if mt.m.done() {
			t.Fatal("done with a spawn in flight")
		}
		inst := mt.newInst()
		mt.expect(evSpawned{inst: inst}, "disarm(tick) disarm(deadline) disarm(idle) stop(term)")
		mt.expect(evStopped{inst: inst}, "release")
		mt.state(Stopped)
		if !mt.m.done() {
			t.Fatal("not done after its stop")
		}
	})
	t.Run("removed: done once its spawn returned nothing", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		mt.expect(evRemoved{}, "")
		if mt.m.done() {
			t.Fatal("done with a spawn in flight")
		}
		mt.expect(evSpawned{cause: CauseDaemon, reason: "short"}, "disarm(tick) drop")
		if !mt.m.done() {
			t.Fatalf("not done: %s (%s)", mt.m.state, mt.m.reason)
		}
	})
	t.Run("a spawn that hangs says on what; a tick does not check again", func(t *testing.T) {
		mt := newMTest(t).toSpawning()
		mt.expect(evSpawnSlow{what: "starting /opt/venv/bin/python3", after: spawnWait}, "")
		if want := "spawn hangs: starting /opt/venv/bin/python3 has not returned after 2s"; mt.m.reason != want {
			t.Fatalf("reason %q, want %q", mt.m.reason, want)
		}
		mt.expect(evTimer{tick}, "")
		mt.expect(evOp{op: OpStop}, "")
		if !strings.HasSuffix(mt.m.reason, "has not returned after 2s; stopped once it returns (held stopped by operator)") {
			t.Fatalf("reason %q", mt.m.reason)
		}
		if err := mt.m.restorable(); err == nil {
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
	inst.adopted = true
	digest := mt.m.cfg.SpawnDigest()
	got := describe(mt.m.restore(liverestore.ModelState{Instance: &liverestore.InstanceState{Model: "m", PID: inst.pid, Started: mt.now, ReadyAt: mt.now, Digest: digest}}, inst, digest, false))
	if got != "adopt(starting) ask-sleeping" {
		t.Fatalf("restore: %s", got)
	}
	mt.state(Starting)
	if err := mt.m.restorable(); err == nil || !strings.Contains(err.Error(), "asked whether it sleeps") {
		t.Fatalf("restorable while asking: %v", err)
	}
	mt.expect(evTimer{tick}, "")
	mt.expect(evServing{inst: inst}, "")
	mt.expect(evOp{op: OpStop}, "disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	mt.expect(evEngineSleeps{inst: inst, asleep: true}, "")
	mt.state(Stopping)

	// Not adopted (an upgrade of its own child): nothing to ask.
	mt = newODTest(t)
	inst = mt.newInst()
	if got := describe(mt.m.restore(liverestore.ModelState{State: Ready, Instance: &liverestore.InstanceState{Model: "m", PID: inst.pid, Digest: digest}}, inst, digest, false)); got != "adopt(running) arm(tick,1s) arm(idle,10m0s)" {
		t.Fatalf("restore of a child: %s", got)
	}
}

// blockSpawns makes the fork and exec of model's spawns hang (as an exec
// of a binary on a mount that does not answer would), through the test
// reaper's hook, until release is called; started is signalled at each.
// Cleanup releases them and removes the hook.
type blockSpawns struct {
	model   string
	started chan struct{}
	gate    chan struct{}
	once    sync.Once
}

func newBlockSpawns(t *testing.T, model string) *blockSpawns {
	b := &blockSpawns{model: model, started: make(chan struct{}, 8), gate: make(chan struct{})}
	testReaper.setHook(b.hook)
	t.Cleanup(func() {
		b.release()
		testReaper.setHook(nil)
	})
	return b
}

func (b *blockSpawns) hook(cmd *exec.Cmd) {
	for _, kv := range cmd.Env {
		marker, ok := strings.CutPrefix(kv, proc.MarkerEnv+"=")
		if parts := strings.Split(marker, "/"); ok && len(parts) == 3 && parts[1] == b.model {
			b.started <- struct{}{}
			<-b.gate
		}
	}
}

func (b *blockSpawns) release() { b.once.Do(func() { close(b.gate) }) }

// markedOf lists the live processes that carry a marker of model under
// the supervisor's identity.
func markedOf(t *testing.T, sup *Supervisor, model string) []int {
	t.Helper()
	trees, err := proc.Marked(sup.d.id + "/" + model + "/")
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, tr := range trees {
		for _, pid := range tr.PIDs() {
			if running(pid) {
				pids = append(pids, pid)
			}
		}
	}
	return pids
}

// TestSpawnHangsRunnerAnswers: a spawn whose exec does not return keeps
// its model pending, saying so, while status answers, another model
// starts, an operator's stop is taken and an upgrade's freeze is refused
// at once; once the spawn returns, its process is stopped and the model
// held.
func TestSpawnHangsRunnerAnswers(t *testing.T) {
	block := newBlockSpawns(t, "a")
	h := newHarness(t, modelSpec{Name: "a", YAML: "priority: 10"}, modelSpec{Name: "b"})
	h.start(Options{})
	select {
	case <-block.started:
	case <-time.After(20 * time.Second):
		t.Fatal("a's spawn did not begin within 20s")
	}
	h.waitFor(t, 20*time.Second, "a's reason to say its spawn hangs", func() bool {
		st := h.status("a")
		return st.State == Pending && strings.Contains(st.Reason, "spawn hangs: starting ") && strings.Contains(st.Reason, "has not returned after 2s")
	})
	// b is spawned after a: neither its spawn nor its stop waits for a's.
	h.waitState("b", Ready, 20*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if res, err := h.sup.Do(ctx, OpRestart, "b"); err != nil || res["b"] != nil {
		t.Fatalf("restart b: %v %v", res, err)
	}
	h.waitFor(t, 20*time.Second, "b restarted", func() bool {
		st := h.status("b")
		return st.State == Ready && st.RestartsByReason[ReasonManual] == 1
	})

	// An operator's stop is taken at once, and applied once the spawn
	// returns.
	res, err := h.sup.Do(ctx, OpStop, "a")
	if err != nil || res["a"] != nil {
		t.Fatalf("stop while spawning: %v %v", res, err)
	}
	if st := h.status("a"); !strings.Contains(st.Reason, "stopped once it returns (held stopped by operator)") {
		t.Fatalf("after the stop: %s (%s)", st.State, st.Reason)
	}
	// An upgrade cannot write a spawn in flight down: refused, not hung.
	fctx, fcancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer fcancel()
	began := time.Now()
	if _, _, _, err := h.sup.Freeze(fctx); err == nil || !strings.Contains(err.Error(), "a is being spawned") {
		t.Fatalf("freeze during the spawn: %v", err)
	}
	if took := time.Since(began); took > 3*time.Second {
		t.Errorf("the freeze took %s to be refused", took)
	}

	block.release()
	st := h.waitState("a", Stopped, 20*time.Second)
	if st.Reason != "held stopped by operator" || st.LastExit == "" {
		t.Fatalf("after its spawn returned: %s (%s), last exit %q: want held, its process stopped", st.State, st.Reason, st.LastExit)
	}
	if pids := markedOf(t, h.sup, "a"); len(pids) > 0 {
		t.Fatalf("a's processes %v survive its stop", pids)
	}
	if st := h.status("b"); st.State != Ready {
		t.Fatalf("b: %s (%s)", st.State, st.Reason)
	}
}

// TestSpawnHangsAtShutdown: the shutdown waits for a spawn in flight no
// longer than the model's stop_timeout; the process it starts later is
// stopped by its job.
func TestSpawnHangsAtShutdown(t *testing.T) {
	block := newBlockSpawns(t, "a")
	h := newHarness(t, modelSpec{Name: "a", YAML: "stop_timeout: 500ms"})
	h.start(Options{})
	select {
	case <-block.started:
	case <-time.After(20 * time.Second):
		t.Fatal("a's spawn did not begin within 20s")
	}
	h.cancel()
	h.cancel = nil
	select {
	case <-h.exited:
		if h.runErr != nil {
			t.Fatalf("Run: %v", h.runErr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return within 10s of the shutdown with a spawn hanging")
	}
	block.release()
	waitFor(t, 20*time.Second, "the process spawned after the shutdown to be stopped by its job", func() bool {
		recs, err := h.sup.d.records.All()
		return len(markedOf(t, h.sup, "a")) == 0 && err == nil && len(recs) == 0
	})
}

// TestAdoptEngineSilent: a model adopted after a crash whose engine never
// answers HTTP (asked whether it sleeps) holds neither the daemon's start
// nor its status nor its shutdown: the question is its runner's job,
// bounded by probe.timeout.
func TestAdoptEngineSilent(t *testing.T) {
	h := newHarness(t, modelSpec{Name: "od", YAML: "activation: on_demand\nsleep_level: 1\nprobe: {period: 1m, timeout: 1m, failure_threshold: 3, startup_timeout: 5m}"})
	m, _ := h.cfg.Model("od")
	// The engine: a port that takes connections and never answers.
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(m.Port)))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	// The process a dead daemon left, with its marker and its record.
	marker := Identity(h.cfg.ControlSocket) + "/od/leftover0000000"
	cmd := exec.Command("sleep", "600")
	cmd.Env = []string{proc.MarkerEnv + "=" + marker}
	if err := testReaper.Start(cmd); err != nil {
		t.Fatal(err)
	}
	waited := make(chan struct{})
	go func() { _ = cmd.Wait(); testReaper.Done(cmd.Process.Pid); close(waited) }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-waited })
	var start uint64
	waitFor(t, 10*time.Second, "the leftover to carry its marker", func() bool {
		st, err := proc.ReadStat(cmd.Process.Pid)
		if err != nil {
			return false
		}
		start = st.Start
		v, ok := proc.EnvironValue(cmd.Process.Pid, proc.MarkerEnv)
		return ok && v == marker
	})
	rec := liverestore.InstanceState{Model: "od", PID: cmd.Process.Pid, Start: start, Marker: marker, Started: time.Now(), Digest: m.SpawnDigest(), ReadyAt: time.Now()}
	if err := liverestore.RecordsFor(h.cfg.ControlSocket).Write(rec); err != nil {
		t.Fatal(err)
	}

	h.start(Options{}) // ready within 10s, or it fails
	st := h.status("od")
	if st.State != Starting || !strings.Contains(st.Reason, "asking its engine whether it sleeps") || st.PID != cmd.Process.Pid {
		t.Fatalf("adopted: %s (%s) pid %d", st.State, st.Reason, st.PID)
	}
	began := time.Now()
	h.stop()
	if took := time.Since(began); took > 15*time.Second {
		t.Errorf("the shutdown took %s with the engine silent", took)
	}
	select {
	case <-waited:
	case <-time.After(10 * time.Second):
		t.Fatal("the adopted process was not stopped at the shutdown")
	}
}

// TestReaperLeavesChildOfStartInFlight: while a Start is in flight (its
// fork and exec may hang, and holds no lock), a child younger than it may
// be its own, not recorded yet: the reaper neither reaps it nor kills it
// as a stray, so os/exec's Wait gets its exit status.
func TestReaperLeavesChildOfStartInFlight(t *testing.T) {
	inFlight := &exec.Cmd{}
	testReaper.mu.Lock()
	testReaper.starting[inFlight] = bootTicks()
	testReaper.mu.Unlock()
	cmd := exec.Command("true")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	waitFor(t, 10*time.Second, "the child to exit", func() bool {
		st, err := proc.ReadStat(pid)
		return err != nil || st.State == 'Z' // gone: reaped, which the check below reports
	})
	testReaper.Reap()
	testReaper.sweepStrays()
	if st, err := proc.ReadStat(pid); err != nil || st.State != 'Z' {
		t.Fatalf("the child of a Start in flight was reaped: %v %v", st, err)
	}
	// The Start returns: it records its child, as Start does.
	testReaper.mu.Lock()
	delete(testReaper.starting, inFlight)
	testReaper.managed[pid] = true
	testReaper.mu.Unlock()
	defer testReaper.Done(pid)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("Wait: %v, want its exit status", err)
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
	mt.step(evConfig{cfg: c, kind: config.Respawn})
	mt.step(evOp{op: OpStop})
	mt.step(evOp{op: OpStart})
	inst := mt.newInst()
	mt.expect(evSpawned{inst: inst}, "disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	mt.expect(evStopped{inst: inst}, "release(keep) disarm(tick) check")
	mt.state(Pending)
}

// TestMachineRemovedDuringSpawnStartIgnored: an operator's start that
// reaches a model a reload removed (its Do looked the runner up before
// the reload) does not lift the removal's hold: the process its spawn
// returns is stopped and the runner ends.
func TestMachineRemovedDuringSpawnStartIgnored(t *testing.T) {
	mt := newMTest(t).toSpawning()
	mt.step(evRemoved{})
	mt.step(evOp{op: OpStart})
	inst := mt.newInst()
	mt.expect(evSpawned{inst: inst}, "disarm(tick) disarm(deadline) disarm(idle) stop(term)")
	mt.expect(evStopped{inst: inst}, "release")
	if !mt.m.done() {
		t.Fatalf("a removed model not done after its stop: %s (%s)", mt.m.state, mt.m.reason)
	}
}

// TestReaperReapsDuringHungStart: a Start whose exec hangs (its binary on
// a mount that does not answer) leaves alone only what may be its own
// child, forked as it began: an orphan the daemon inherits later, while it
// still hangs, is reaped as ever, not left a zombie for as long as the
// exec hangs.
func TestReaperReapsDuringHungStart(t *testing.T) {
	began := bootTicks()
	if began < 60*userHZ {
		t.Skip("the host booted less than a minute ago")
	}
	inFlight := &exec.Cmd{}
	testReaper.mu.Lock()
	testReaper.starting[inFlight] = began - 30*userHZ // hangs for 30s now
	testReaper.mu.Unlock()
	defer func() {
		testReaper.mu.Lock()
		delete(testReaper.starting, inFlight)
		testReaper.mu.Unlock()
	}()
	cmd := exec.Command("true") // an orphan inherited now, exited
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	waitFor(t, 10*time.Second, "the orphan to exit", func() bool {
		st, err := proc.ReadStat(pid)
		return err != nil || st.State == 'Z'
	})
	testReaper.Reap()
	if st, err := proc.ReadStat(pid); err == nil && st.State == 'Z' {
		t.Fatal("an orphan inherited while a Start hangs is left a zombie")
	}
}
