package supervisor

import (
	"citadel-supervisor/config"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

const (
	uuid0 = "GPU-00000000-0000-0000-0000-000000000000"
	uuid1 = "GPU-11111111-1111-1111-1111-111111111111"
)

func simGPUs(stateFile string, n int) string {
	s := "gpu:\n  backend: sim\n  headroom: 1GiB\n  release_timeout: 5s\n"
	if stateFile != "" {
		s += "  sim:\n    state_file: " + stateFile + "\n"
	} else {
		s += "  sim:\n"
	}
	s += "    devices:\n"
	for _, u := range []string{uuid0, uuid1}[:n] {
		s += "      - {uuid: " + u + ", name: Sim H100, memory: 80GiB}\n"
	}
	return s
}

// TestStartsOnOneGPUNeverOverlap: three models that all fit on one GPU load
// one after another, never together (vLLM's profiling breaks under
// concurrent starts).
func TestStartsOnOneGPUNeverOverlap(t *testing.T) {
	slow := []string{"--fake-load-time", "300ms"}
	h := newHarnessWith(t, simGPUs("", 1),
		modelSpec{Name: "a", YAML: "gpu_memory_utilization: 0.2", Fake: slow},
		modelSpec{Name: "b", YAML: "gpu_memory_utilization: 0.2", Fake: slow},
		modelSpec{Name: "c", YAML: "gpu_memory_utilization: 0.2", Fake: slow},
	).start(Options{})
	var st []Status
	for _, n := range []string{"a", "b", "c"} {
		st = append(st, h.waitState(n, Ready, 30*time.Second))
	}
	slices.SortFunc(st, func(x, y Status) int { return x.StartedAt.Compare(y.StartedAt) })
	for i := 1; i < len(st); i++ {
		if st[i].StartedAt.Before(st[i-1].ReadyAt) {
			t.Errorf("%s started at %s, before %s was ready at %s", st[i].Name, st[i].StartedAt.Format(time.StampMilli), st[i-1].Name, st[i-1].ReadyAt.Format(time.StampMilli))
		}
	}
	for _, s := range st {
		if !slices.Equal(s.GPUs, []string{uuid0}) {
			t.Errorf("%s on %v", s.Name, s.GPUs)
		}
	}
}

// TestPendingModelTakesTheGPUARemovedModelGaveBack: two GPUs full, a third
// model waits with the numbers; a reload removes one of the others and the
// waiting model starts on the GPU it gave back.
func TestPendingModelTakesTheGPUARemovedModelGaveBack(t *testing.T) {
	h := newHarnessWith(t, simGPUs("", 2),
		modelSpec{Name: "big0", YAML: "gpu_memory_utilization: 0.9\npriority: 10\ngpus: [0]"},
		modelSpec{Name: "big1", YAML: "gpu_memory_utilization: 0.9\npriority: 10\ngpus: [1]"},
		modelSpec{Name: "waiter", YAML: "gpu_memory_utilization: 0.5"},
	).start(Options{})
	h.waitState("big0", Ready, 30*time.Second)
	big1 := h.waitState("big1", Ready, 30*time.Second)
	h.waitFor(t, 10*time.Second, "waiter pending with the numbers", func() bool {
		st := h.status("waiter")
		return st.State == Pending && st.PendingCause == CauseGPU && st.Reason == "needs 41.0 GiB on 1 GPU; free 8.0 GiB (GPU0), 8.0 GiB (GPU1)"
	})
	big1Procs := h.procs("big1")

	next := *h.cfg
	next.Models = slices.DeleteFunc(slices.Clone(h.cfg.Models), func(m config.Model) bool { return m.Name == "big1" })
	if _, err := h.sup.Apply(context.Background(), &next); err != nil {
		t.Fatal(err)
	}
	st := h.waitState("waiter", Ready, 30*time.Second)
	if !slices.Equal(st.GPUs, []string{uuid1}) {
		t.Errorf("waiter on %v, want the GPU big1 gave back (%s)", st.GPUs, uuid1)
	}
	if live := liveOf(big1Procs, ""); len(live) != 0 {
		t.Errorf("big1 (pid %d) still has processes: %v", big1.PID, live)
	}
	if st.StartedAt.Before(time.Now().Add(-time.Minute)) {
		t.Error("waiter started before big1 was removed")
	}
	views, err := h.sup.GPUs(context.Background())
	if err != nil || len(views) != 2 || !slices.Equal(views[1].Models, []string{"waiter"}) || !slices.Equal(views[0].Models, []string{"big0"}) {
		t.Errorf("GPU views: %+v, %v", views, err)
	}
}

// TestPendingUntilMemoryFrees: someone else holds GPU memory (the sim state
// file); the model waits, and starts once it is released — nothing running
// is restarted for it.
func TestPendingUntilMemoryFrees(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "gpus.json")
	if err := os.WriteFile(state, []byte(`{"used": {"`+uuid0+`": "70GiB"}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	h := newHarnessWith(t, simGPUs(state, 1),
		modelSpec{Name: "small", YAML: "gpu_memory_utilization: 0.05"},
		modelSpec{Name: "m", YAML: "gpu_memory_utilization: 0.5"},
	).start(Options{})
	small := h.waitState("small", Ready, 30*time.Second)
	h.waitFor(t, 10*time.Second, "m pending for memory", func() bool {
		st := h.status("m")
		return st.State == Pending && st.Reason == "needs 41.0 GiB on 1 GPU; free 6.0 GiB (GPU0)"
	})
	if err := os.WriteFile(state, []byte(`{"used": {}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	h.waitState("m", Ready, 30*time.Second)
	if got := h.status("small"); got.PID != small.PID || got.Restarts != 0 {
		t.Errorf("small disturbed: pid %d → %d", small.PID, got.PID)
	}

	// A GPU that goes down gets nothing new.
	if err := os.WriteFile(state, []byte(fmt.Sprintf(`{"down": [%q]}`, uuid0)), 0o644); err != nil {
		t.Fatal(err)
	}
	h.sup.Do(context.Background(), "restart", "small") //nolint:errcheck // checked below
	h.waitFor(t, 10*time.Second, "small pending: GPU down", func() bool {
		st := h.status("small")
		return st.State == Pending && st.Reason == "needs 1 GPUs; the host has 0 usable (GPU0 down)"
	})
}
