package supervisor

import (
	"context"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/control/api"
)

// stubbornArgs make a fake model whose server and worker ignore SIGTERM:
// its stop takes the whole stop_timeout.
var stubbornArgs = []string{"--fake-ignore-sigterm", "--fake-workers", "1", "--fake-worker-ignore-sigterm"}

// TestReloadRemovingASlowModelKeepsTheLoopAlive is the regression for a
// main loop that waited for removed models inside the select that beats
// the heartbeat: a reload removing a model that takes its stop_timeout to
// stop left Alive false for that long, and systemd's watchdog would have
// killed the daemon and every model with it.
func TestReloadRemovingASlowModelKeepsTheLoopAlive(t *testing.T) {
	h := newHarness(t,
		modelSpec{Name: "keep"},
		modelSpec{Name: "slow", YAML: "stop_timeout: 2s", Fake: stubbornArgs},
	).start(Options{Heartbeat: 20 * time.Millisecond})
	h.waitState("keep", Ready, 20*time.Second)
	h.waitState("slow", Ready, 20*time.Second)

	next := *h.cfg
	next.Models = slices.DeleteFunc(slices.Clone(h.cfg.Models), func(m config.Model) bool { return m.Name == "slow" })
	done := make(chan error, 1)
	started := time.Now()
	go func() {
		_, err := h.sup.Apply(context.Background(), &next)
		done <- err
	}()
	stalls := 0
	deadline := time.After(30 * time.Second)
	for {
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
			if took := time.Since(started); took < 2*time.Second {
				t.Fatalf("Apply returned after %s, before the removed model's stop_timeout: the test proves nothing", took)
			}
			if stalls > 0 {
				t.Errorf("main loop not alive within 500ms %d times during the reload", stalls)
			}
			if _, err := h.sup.Status("slow"); err == nil {
				t.Error("removed model still listed")
			}
			return
		case <-time.After(50 * time.Millisecond):
			if !h.sup.Alive(500 * time.Millisecond) {
				stalls++
			}
			if _, err := h.sup.Status(); err != nil {
				t.Fatal(err)
			}
		case <-deadline:
			t.Fatal("Apply did not return within 30s")
		}
	}
}

// TestReloadRemovesAModelAtOnce is the regression for a removed model that
// kept running for its startup_timeout: its stop waits for quiet GPUs, and
// the scheduler's answer went to the listed runners only, which a reload
// had just taken it out of; it stopped when the wait gave up.
func TestReloadRemovesAModelAtOnce(t *testing.T) {
	h := newHarness(t,
		modelSpec{Name: "keep"},
		modelSpec{Name: "gone", YAML: "probe: {startup_timeout: 10m}"},
	).start(Options{})
	h.waitState("keep", Ready, 20*time.Second)
	h.waitState("gone", Ready, 20*time.Second)
	procs := h.procs("gone")

	next := *h.cfg
	next.Models = slices.DeleteFunc(slices.Clone(h.cfg.Models), func(m config.Model) bool { return m.Name == "gone" })
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := h.sup.Apply(ctx, &next); err != nil {
		t.Fatalf("Apply: %v (a removed model's stop must not wait for its startup_timeout)", err)
	}
	if live := liveOf(procs, ""); len(live) != 0 {
		t.Errorf("removed model's processes still alive: %v", live)
	}
}

// removingSlowly runs "keep" and "slow" (whose stop takes its 3 s
// stop_timeout), then has a reload remove slow: it returns once slow is
// unlisted and still stopping, with the reload's outcome to come on done.
func removingSlowly(t *testing.T) (*harness, <-chan error) {
	t.Helper()
	h := newHarness(t,
		modelSpec{Name: "keep"},
		modelSpec{Name: "slow", YAML: "stop_timeout: 3s", Fake: stubbornArgs},
	).start(Options{})
	h.waitState("keep", Ready, 20*time.Second)
	h.waitState("slow", Ready, 20*time.Second)

	without := *h.cfg
	without.Models = slices.DeleteFunc(slices.Clone(h.cfg.Models), func(m config.Model) bool { return m.Name == "slow" })
	done := make(chan error, 1)
	go func() {
		_, err := h.sup.Apply(context.Background(), &without)
		done <- err
	}()
	waitFor(t, 10*time.Second, "slow unlisted", func() bool {
		_, err := h.sup.Status("slow")
		return err != nil
	})
	return h, done
}

// TestUpgradeWaitsForARemovedModelsStop: a model a reload removed is no
// longer listed, so an upgrade could not hand it over; the freeze says so
// and waits until its stop has ended.
func TestUpgradeWaitsForARemovedModelsStop(t *testing.T) {
	h, done := removingSlowly(t)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if _, _, thaw, err := h.sup.Freeze(ctx); err == nil {
		thaw()
		t.Fatal("froze while a removed model was still stopping")
	} else if !strings.Contains(err.Error(), "slow (removed by a reload) still stopping") {
		t.Errorf("freeze: %v", err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Apply did not return")
	}
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hand, _, thaw, err := h.sup.Freeze(ctx)
	if err != nil {
		t.Fatalf("freeze after the stop: %v", err)
	}
	thaw()
	if len(hand.Models) != 1 || hand.Models[0].Name != "keep" {
		t.Errorf("handed over %+v", hand.Models)
	}
}

// TestReloadOfTheTopModelKeepsItsGPUs is the regression for a reload that
// changed the top-priority model (say max_model_len): its GPUs went to the
// lower-priority models waiting in the same millisecond, and it stayed
// pending behind them. A respawn for settings that need the same GPUs
// keeps them, as a restart does.
func TestReloadOfTheTopModelKeepsItsGPUs(t *testing.T) {
	h := newHarnessWith(t, simGPUs("", 2),
		modelSpec{Name: "big", YAML: "priority: 100\ntensor_parallel: 2\ngpu_memory_utilization: 0.9"},
		modelSpec{Name: "small", YAML: "priority: 10\ngpu_memory_utilization: 0.5"},
	).start(Options{})
	before := h.waitState("big", Ready, 20*time.Second)
	if st := h.status("small"); st.State != Pending || st.PendingCause != CauseGPU {
		t.Fatalf("small: %s (%s), want pending on GPUs", st.State, st.Reason)
	}

	next := *h.cfg
	next.Models = slices.Clone(h.cfg.Models)
	for i := range next.Models {
		if next.Models[i].Name == "big" {
			next.Models[i].MaxModelLen = 4096
		}
	}
	if _, err := h.sup.Apply(context.Background(), &next); err != nil {
		t.Fatal(err)
	}
	var after Status
	h.waitFor(t, 20*time.Second, "big restarted and ready", func() bool {
		after = h.status("big")
		return after.State == Ready && after.PID != before.PID
	})
	if !slices.Equal(after.GPUs, before.GPUs) {
		t.Errorf("big moved from %v to %v", before.GPUs, after.GPUs)
	}
	if st := h.status("small"); st.State != Pending {
		t.Errorf("small took the GPUs: %s (%s)", st.State, st.Reason)
	}
}

// TestStartDuringAFailureStopKeepsTheCrash is the regression for an
// operator's start that arrived while a crashed model's remains were being
// stopped: the crash never reached citadel_model_restarts_total
// {reason="exit"}, which the flapping alert relies on.
func TestStartDuringAFailureStopKeepsTheCrash(t *testing.T) {
	h := newHarness(t, modelSpec{Name: "m", YAML: "stop_timeout: 1s\nrestart: {delay: 1m, max_delay: 1m}", Fake: stubbornArgs}).start(Options{})
	first := h.waitState("m", Ready, 20*time.Second)
	if err := syscall.Kill(first.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// Its worker ignores SIGTERM: the stop of what is left takes 1s.
	h.waitState("m", Stopping, 10*time.Second)
	res, err := h.sup.Do(context.Background(), api.OpStart, "m")
	if err != nil || res["m"] != nil {
		t.Fatalf("start: %v %v", res, err)
	}
	var st Status
	h.waitFor(t, 20*time.Second, "m ready again", func() bool {
		st = h.status("m")
		return st.State == Ready && st.PID != first.PID
	})
	if st.RestartsByReason[ReasonExit] != 1 {
		t.Errorf("restarts %v, want exit:1", st.RestartsByReason)
	}
	// The operator's start skipped the 1m backoff.
	if st.StartedAt.Sub(first.StartedAt) > 30*time.Second {
		t.Errorf("restarted after %s", st.StartedAt.Sub(first.StartedAt))
	}
}

// TestReloadAddingBackALeavingModel: a model a reload removed and the next
// reload adds back while its stop is still under way would have two
// runners under one name, and the scheduler keys wants, claims and quiet
// requests by name: the old runner's release would take the new one's
// want or claim, and its answers would go to the new one. The reload is
// refused until the stop has ended, then the model comes back.
func TestReloadAddingBackALeavingModel(t *testing.T) {
	h, done := removingSlowly(t)
	with := *h.cfg
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := h.sup.Apply(ctx, &with); err == nil || !strings.Contains(err.Error(), "slow (removed by a reload) still stopping") {
		t.Fatalf("adding slow back while its removal stops: %v, want it refused", err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the removal did not end")
	}
	if _, err := h.sup.Apply(ctx, &with); err != nil {
		t.Fatalf("adding slow back once stopped: %v", err)
	}
	h.waitState("slow", Ready, 20*time.Second)
}

// TestRemovedModelLeavesNoProbeSeries: a model a reload removed is probed
// until its stop begins (it waits for quiet GPUs first, still ready) and a
// probe in flight at the removal still answers; a probe observed after the
// removal must not leave its series behind once the model has stopped.
func TestRemovedModelLeavesNoProbeSeries(t *testing.T) {
	h, done := removingSlowly(t)
	// What the runner's EfObserve does for a probe that answers now.
	h.sup.d.metrics.observe("slow", time.Millisecond, nil)
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the removal did not end")
	}
	for _, r := range h.sup.d.metrics.probes.read() {
		if r.name == "slow" {
			t.Errorf("a removed model's probe series after its stop: %+v", r)
		}
	}
}

// TestObserveSeesLeavingModels: a model a reload removed keeps its claim
// until its processes are gone, and the scheduler's answers still reach
// its runner (reachable); its processes are still its own in what the
// scheduler reads (a claim without them counts its share on top of the
// memory they hold) and in what the reaper asks of an orphan (accounts).
func TestObserveSeesLeavingModels(t *testing.T) {
	s := &Supervisor{d: &deps{}, leaving: map[string]*runner{}}
	s.cfg.Store(&config.Config{})
	listed, gone := &runner{name: "a"}, &runner{name: "b"}
	pa, pb := []int{11}, []int{22}
	listed.pids.Store(&pa)
	gone.pids.Store(&pb)
	s.runners.Store(&[]*runner{listed})
	s.leaving["b"] = gone
	obs := s.observe([]string{"a", "b"})
	if obs.PIDs[11] != "a" || obs.PIDs[22] != "b" {
		t.Fatalf("observed processes %v, want 11 of a and 22 of b (removed, still stopping)", obs.PIDs)
	}
}
