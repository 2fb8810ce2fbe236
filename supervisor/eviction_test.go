package supervisor

import (
	"context"
	"slices"
	"testing"
	"time"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/control/api"
)

// The eviction rules of gpu.Decide with real processes on sim GPUs, sleep
// mode on fake-vllm (docs/on-demand.md).

func sleepSite(t *testing.T, gpus int, specs ...modelSpec) *harness {
	t.Helper()
	usage := t.TempDir()
	for i := range specs {
		specs[i].Fake = append(specs[i].Fake, "--fake-usage-dir", usage, "--fake-wake-time-l1", "50ms")
	}
	return newHarnessWith(t, simGPUs("", gpus)+"    usage_dir: "+usage+"\n", specs...).start(Options{})
}

const od = "activation: on_demand\nsleep_level: 1\nidle_after: 1h\n"

func (h *harness) demandReady(names ...string) map[string]Status {
	h.t.Helper()
	out := map[string]Status{}
	for _, n := range names {
		h.sup.Demand(n)
		out[n] = h.waitState(n, Ready, 30*time.Second)
	}
	return out
}

func (h *harness) asleep(name string) bool {
	st := h.status(name)
	return st.State == Sleeping && st.SleepLevel > 0
}

// TestEvictionOrderLowerPriorityFirst: two GPUs, one model awake on each;
// a third needs one GPU: the lower-priority one sleeps, whatever its use.
func TestEvictionOrderLowerPriorityFirst(t *testing.T) {
	h := sleepSite(t, 2,
		modelSpec{Name: "low", YAML: od + "min_awake: 0s\npriority: 1\ngpu_memory_utilization: 0.6"},
		modelSpec{Name: "high", YAML: od + "min_awake: 0s\npriority: 9\ngpu_memory_utilization: 0.6"},
		modelSpec{Name: "new", YAML: od + "min_awake: 0s\npriority: 5\ngpu_memory_utilization: 0.6"},
	)
	h.demandReady("low", "high")
	h.sup.Demand("high") // high was used last: recency would pick low anyway, so make low the recent one
	h.sup.Demand("low")
	h.demandReady("new")
	if !h.asleep("low") || h.status("high").State != Ready {
		t.Errorf("low %s, high %s; want low asleep, high ready", h.status("low").State, h.status("high").State)
	}
}

// TestEvictionTP2FreesBoth: a TP=2 model puts the models on both GPUs to
// sleep, and starts across them.
func TestEvictionTP2FreesBoth(t *testing.T) {
	h := sleepSite(t, 2,
		modelSpec{Name: "a", YAML: od + "min_awake: 0s\ngpu_memory_utilization: 0.6"},
		modelSpec{Name: "b", YAML: od + "min_awake: 0s\ngpu_memory_utilization: 0.6"},
		modelSpec{Name: "big", YAML: od + "min_awake: 0s\ntensor_parallel: 2\ngpu_memory_utilization: 0.8"},
	)
	h.demandReady("a", "b")
	big := h.demandReady("big")["big"]
	if !h.asleep("a") || !h.asleep("b") || len(big.GPUs) != 2 {
		t.Errorf("a asleep %v, b asleep %v, big on %v", h.asleep("a"), h.asleep("b"), big.GPUs)
	}
}

// TestMinAwakeHoldsEviction: a model woken less than min_awake ago is not
// put to sleep for another: the other waits until min_awake has passed.
func TestMinAwakeHoldsEviction(t *testing.T) {
	const minAwake = 2 * time.Second
	h := sleepSite(t, 1,
		modelSpec{Name: "a", YAML: od + "min_awake: 2s\ngpu_memory_utilization: 0.6"},
		modelSpec{Name: "b", YAML: od + "min_awake: 2s\ngpu_memory_utilization: 0.6"},
	)
	a := h.demandReady("a")["a"]
	b := h.demandReady("b")["b"]
	if b.StartedAt.Sub(a.ReadyAt) < minAwake {
		t.Errorf("b started %s after a was ready, within a's min_awake %s", b.StartedAt.Sub(a.ReadyAt), minAwake)
	}
	if !h.asleep("a") {
		t.Errorf("a: %s", h.status("a").State)
	}
}

// TestAlwaysPreemptsLowerOnDemand: an always model added by a reload, of
// higher priority, puts the on-demand model in its way to sleep; the
// on-demand model's next request then waits, the always model keeping its
// GPU.
func TestAlwaysPreemptsLowerOnDemand(t *testing.T) {
	h := sleepSite(t, 1,
		modelSpec{Name: "od", YAML: od + "min_awake: 0s\npriority: 1\ngpu_memory_utilization: 0.6"},
	)
	h.demandReady("od")
	// On the same ledger of GPU memory as the site's models.
	more := newHarnessWith(t, simGPUs("", 1), modelSpec{Name: "always", YAML: "priority: 50\ngpu_memory_utilization: 0.6",
		Fake: []string{"--fake-usage-dir", h.site.Ledger}}).cfg.Models[0]
	next := *h.cfg
	next.Models = append(slices.Clone(h.cfg.Models), more)
	slices.SortFunc(next.Models, func(x, y config.Model) int { return compareNames(x.Name, y.Name) })
	if _, err := h.sup.Apply(context.Background(), &next); err != nil {
		t.Fatal(err)
	}
	h.waitState("always", Ready, 30*time.Second)
	if !h.asleep("od") {
		t.Errorf("od: %s (%s)", h.status("od").State, h.status("od").Reason)
	}
	h.sup.Demand("od")
	h.waitFor(t, 10*time.Second, "od waiting for its memory", func() bool {
		st := h.status("od")
		return st.State == Waking
	})
	if st := h.status("always"); st.State != Ready {
		t.Errorf("always: %s", st.State)
	}
}

func compareNames(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// TestEvictionWeighsWakeCost: the scheduler gets each model's measured
// wakes (gpu.Cost, from its runner): of two models used a moment apart,
// the one that wakes fast is put to sleep, not the one used first (LRU's
// choice), whose wake takes twenty times as long.
func TestEvictionWeighsWakeCost(t *testing.T) {
	usage := t.TempDir()
	spec := func(name, wake string) modelSpec {
		return modelSpec{Name: name, YAML: od + "min_awake: 0s\ngpu_memory_utilization: 0.6",
			Fake: []string{"--fake-usage-dir", usage, "--fake-wake-time-l1", wake}}
	}
	h := newHarnessWith(t, simGPUs("", 2)+"    usage_dir: "+usage+"\n",
		spec("cheap", "50ms"), spec("dear", "1s"), spec("new", "50ms")).start(Options{})
	h.demandReady("cheap", "dear")
	// One wake each, so that their wakes are measured.
	for _, m := range []string{"cheap", "dear"} {
		if res, err := h.sup.Do(context.Background(), api.OpSleep, m); err != nil || res[m] != nil {
			t.Fatalf("sleep %s: %v %v", m, err, res)
		}
		waitFor(t, 10*time.Second, m+" asleep", func() bool { return h.asleep(m) })
		h.demandReady(m)
	}
	// dear used first, cheap a moment later: both within the second that
	// the policy takes for a session in progress, so the wake decides.
	h.sup.Demand("dear")
	h.sup.Demand("cheap")
	h.demandReady("new")
	if !h.asleep("cheap") || h.status("dear").State != Ready {
		t.Errorf("cheap %s, dear %s; want cheap asleep, dear ready", h.status("cheap").State, h.status("dear").State)
	}
}
