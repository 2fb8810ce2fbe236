package supervisor

import (
	"context"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest"
	"go.uber.org/zap/zaptest/observer"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/liverestore"
	"citadel-supervisor/supervisor/proc"
)

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
	if st := h.status("a"); st.PendingCause != CauseSpawn {
		t.Errorf("a pending for %q while its spawn hangs, want %q (not gpu: it has its GPUs)", st.PendingCause, CauseSpawn)
	}
	// b is spawned after a: neither its spawn nor its stop waits for a's.
	h.waitState("b", Ready, 20*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if res, err := h.sup.Do(ctx, api.OpRestart, "b"); err != nil || res["b"] != nil {
		t.Fatalf("restart b: %v %v", res, err)
	}
	h.waitFor(t, 20*time.Second, "b restarted", func() bool {
		st := h.status("b")
		return st.State == Ready && st.RestartsByReason[ReasonManual] == 1
	})

	// An operator's stop is taken at once, and applied once the spawn
	// returns.
	res, err := h.sup.Do(ctx, api.OpStop, "a")
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
	core, logs := observer.New(zap.WarnLevel)
	h.start(Options{Logger: zap.New(zapcore.NewTee(core, zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel)).Core()))})
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
	// The spawn returns after the release, in its own time: until the job
	// says it has the process, no process and no record prove nothing.
	waitFor(t, 20*time.Second, "the spawn to return to its job", func() bool {
		return logs.FilterMessageSnippet("its spawn returned after the runner ended").Len() > 0
	})
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
