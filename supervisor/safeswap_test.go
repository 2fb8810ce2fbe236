package supervisor

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
)

// Sleep and wake as real vLLM needs them (docs/vllm.md, "Sleep mode"):
// each test plays one of vLLM's known failures on fake-vllm and fails
// without the safeguard against it.

func (h *harness) sleepNow(name string) Status {
	h.t.Helper()
	if res, err := h.sup.Do(context.Background(), api.OpSleep, name); err != nil || res[name] != nil {
		h.t.Fatalf("sleep %s: %v %v", name, res, err)
	}
	var st Status
	waitFor(h.t, 20*time.Second, name+" asleep", func() bool {
		st = h.status(name)
		return st.State == Sleeping && st.SleepLevel > 0
	})
	return st
}

// TestNotDeterministicModelIsSaidSo: a model whose two greedy answers
// after its start differ cannot be proven by a known answer: its status
// says so, and its wakes are proven by any answer.
func TestNotDeterministicModelIsSaidSo(t *testing.T) {
	h := sleepSite(t, 1, modelSpec{Name: "m", YAML: od + "gpu_memory_utilization: 0.5", Fake: []string{"--fake-nondeterministic"}})
	m := h.demandReady("m")["m"]
	h.waitFor(t, 10*time.Second, "the canary recorded", func() bool { return strings.HasPrefix(h.status("m").Canary, "not deterministic") })
	h.sleepNow("m")
	h.sup.Demand("m")
	if st := h.waitState("m", Ready, 20*time.Second); st.PID != m.PID || st.WakeFailures != 0 {
		t.Errorf("woke as pid %d with %d failed wakes; want pid %d, none", st.PID, st.WakeFailures, m.PID)
	}
}

// TestEmbeddingModelCanary: an embedding-only model (it refuses
// completions) is proven by its embedding of the canary's prompt: a wake
// into a broken engine (a vector of nonsense) fails and the model starts
// cold; a good wake keeps the process.
func TestEmbeddingModelCanary(t *testing.T) {
	h := sleepSite(t, 1,
		modelSpec{Name: "good", YAML: od + "gpu_memory_utilization: 0.3", Fake: []string{"--fake-embedding-only"}},
		modelSpec{Name: "broken", YAML: od + "gpu_memory_utilization: 0.3", Fake: []string{"--fake-embedding-only", "--fake-break-on-wake"}},
	)
	before := h.demandReady("good", "broken")
	for _, m := range []string{"good", "broken"} {
		h.waitFor(t, 10*time.Second, m+"'s known answer", func() bool { return h.status(m).Canary == "known answer" })
		h.sleepNow(m)
		h.sup.Demand(m)
	}
	if st := h.waitState("good", Ready, 20*time.Second); st.PID != before["good"].PID || st.WakeFailures != 0 {
		t.Errorf("good: pid %d, %d failed wakes; want pid %d, none", st.PID, st.WakeFailures, before["good"].PID)
	}
	var st Status
	h.waitFor(t, 30*time.Second, "broken started cold", func() bool {
		st = h.status("broken")
		return st.State == Ready && st.PID != before["broken"].PID
	})
	if st.WakeFailures != 1 || st.RestartsByReason[ReasonWake] != 1 {
		t.Errorf("broken: %d failed wakes, restarts %v; want one failed wake", st.WakeFailures, st.RestartsByReason)
	}
}

// TestQuietGPUDuringANeighboursLoad: an idle model's sleep, an operator's
// stop and a reload's restart of a model on a GPU where another model
// loads wait until that one is ready (vLLM aborts a start whose GPU
// memory changes while it profiles, vllm#56830: here b's fake exits with
// "Error in memory profiling", which fails the test). An operator's stop
// of the loading model itself is not delayed.
func TestQuietGPUDuringANeighboursLoad(t *testing.T) {
	h := sleepSite(t, 1,
		modelSpec{Name: "a", YAML: "activation: on_demand\nsleep_level: 1\nidle_after: 1s\ngpu_memory_utilization: 0.3\nmin_awake: 0s"},
		modelSpec{Name: "b", YAML: od + "gpu_memory_utilization: 0.3\nmin_awake: 0s", Fake: []string{"--fake-load-time", "3s"}},
		modelSpec{Name: "c", YAML: od + "gpu_memory_utilization: 0.3\nmin_awake: 0s"},
	)
	h.demandReady("a", "c")
	h.sup.Demand("b") // loads for 3 s; a falls idle 1 s into it
	h.waitFor(t, 10*time.Second, "b loading", func() bool { return h.status("b").State == Starting })
	if res, err := h.sup.Do(context.Background(), api.OpStop, "c"); err != nil || res["c"] != nil {
		t.Fatalf("stop c: %v %v", res, err)
	}
	h.waitFor(t, 5*time.Second, "c's stop waiting for b's load", func() bool {
		st := h.status("c")
		return st.State == Ready && strings.Contains(st.Reason, "b, which is starting") && strings.Contains(st.Reason, "before it stops")
	})
	h.waitState("b", Ready, 30*time.Second)
	h.waitState("c", Stopped, 20*time.Second)
	h.waitFor(t, 20*time.Second, "a asleep", func() bool { return h.asleep("a") })
	var serving, aSleeps time.Time
	for _, e := range h.site.ReadEvents(t) {
		switch {
		case e.Model == "b" && e.Ev == "serving":
			serving = time.Unix(0, e.T)
		case e.Model == "a" && e.Ev == "sleep_begin":
			aSleeps = time.Unix(0, e.T)
		}
	}
	if aSleeps.Before(serving) {
		t.Errorf("a went to sleep %s before b was ready", serving.Sub(aSleeps))
	}
	// The loading model's own stop is not delayed.
	if res, err := h.sup.Do(context.Background(), api.OpRestart, "b"); err != nil || res["b"] != nil {
		t.Fatalf("restart b: %v %v", res, err)
	}
	h.waitFor(t, 10*time.Second, "b loading again", func() bool { return h.status("b").State == Starting })
	if res, err := h.sup.Do(context.Background(), api.OpStop, "b"); err != nil || res["b"] != nil {
		t.Fatalf("stop b: %v %v", res, err)
	}
	h.waitFor(t, 5*time.Second, "b stopped at once", func() bool { return h.status("b").State == Stopped })
}

// TestWakeAsksForWhatItHeld: with sleep mode, vLLM can size its KV cache
// above gpu_memory_utilization × total (vllm#40256): a's engine holds its
// 40 GiB share and 6 GiB more. Its wake asks for the 46 GiB it held
// before it slept, so b (36 GiB) is put to sleep first; asked for its
// share alone, it was woken next to b and ran out of memory.
func TestWakeAsksForWhatItHeld(t *testing.T) {
	h := sleepSite(t, 1,
		modelSpec{Name: "a", YAML: od + "gpu_memory_utilization: 0.5\nmin_awake: 0s", Fake: []string{"--fake-extra-gpu-memory", "6GiB"}},
		modelSpec{Name: "b", YAML: od + "gpu_memory_utilization: 0.45\nmin_awake: 0s"},
	)
	a := h.demandReady("a")["a"]
	h.sleepNow("a")
	h.demandReady("b")
	h.sup.Demand("a")
	h.waitFor(t, 30*time.Second, "a awake on its process, b asleep", func() bool {
		st := h.status("a")
		return st.State == Ready && st.PID == a.PID && h.asleep("b")
	})
}

// TestPinnedHostMemoryCountsUntilTheProcessEnds: vLLM keeps a level-1
// sleeper's pinned host memory after it wakes (vllm#16663) and reuses it:
// a model whose weights take 96 MiB is counted 96 MiB after its first,
// second and tenth sleep, and while awake in between (it was counted 0
// after its second: the resident memory no longer grew across the sleep).
func TestPinnedHostMemoryCountsUntilTheProcessEnds(t *testing.T) {
	h := sleepSite(t, 1, modelSpec{Name: "m", YAML: od + "gpu_memory_utilization: 0.5", Fake: []string{"--fake-model-bytes", "96MiB"}})
	m := h.demandReady("m")["m"]
	var r *runner
	for _, x := range *h.sup.runners.Load() {
		if x.name == "m" {
			r = x
		}
	}
	// Measured as the resident memory grown across the first sleep: about
	// 96 MiB (more under the race detector, whose shadow memory grows with
	// it); never less afterwards, and never counted twice.
	var first uint64
	counted := func(when string) {
		t.Helper()
		held := r.status.Load().SleepHostMemory
		if first == 0 {
			first = held
		}
		if first == held && when == "asleep, sleep 1" {
			t.Logf("host memory counted after the first sleep: %d MiB", held>>20)
		}
		if held < 80<<20 || held != first {
			t.Fatalf("%s: host memory counted %d MiB, want about 96 (%d MiB after the first sleep)", when, held>>20, first>>20)
		}
	}
	for i := 1; i <= 10; i++ {
		h.sleepNow("m")
		counted(fmt.Sprintf("asleep, sleep %d", i))
		h.sup.Demand("m")
		if st := h.waitState("m", Ready, 20*time.Second); st.PID != m.PID {
			t.Fatalf("woke as another process")
		}
		counted("awake after a sleep")
	}
}

// TestSleepWaitsForTheDaemonsOwnRequests: a deep probe (a completion) in
// flight when the model is told to sleep is waited for, as the gateway's
// requests are: vLLM must never be told to sleep with a request in flight.
func TestSleepWaitsForTheDaemonsOwnRequests(t *testing.T) {
	h := sleepSite(t, 1, modelSpec{Name: "m",
		YAML: od + "gpu_memory_utilization: 0.5\nstop_timeout: 30s\nprobe: {period: 50ms, timeout: 2s, failure_threshold: 3, startup_timeout: 30s, deep_period: 10ms, deep_timeout: 5s}",
		Fake: []string{"--fake-token-delay", "100ms"}})
	h.demandReady("m")
	for range 3 {
		h.waitFor(t, 10*time.Second, "a deep probe in flight", func() bool {
			n, _ := h.sup.d.prober.Running(context.Background(), baseURL(h.cfg.Models[0]))
			return n > 0
		})
		h.sleepNow("m")
		h.sup.Demand("m")
		h.waitState("m", Ready, 20*time.Second)
	}
}
