package supervisor

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/supervisortest"
	"citadel-supervisor/vllm"
)

// venvCommand is a model's command running the fake virtualenv of version.
func venvCommand(t *testing.T, version string) string {
	return fmt.Sprintf("command: [%q, -m, vllm.entrypoints.openai.api_server]", supervisortest.FakeVenv(t, version))
}

// procEnv reads a live process's environment.
func procEnv(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for _, kv := range bytes.Split(b, []byte{0}) {
		if k, v, ok := strings.Cut(string(kv), "="); ok {
			env[k] = v
		}
	}
	return env
}

// TestVersionLearnedBeforeSpawnConfirmedAfter: the model's version comes
// from its interpreter's package metadata before it starts, and from its
// GET /version once ready.
func TestVersionLearnedBeforeSpawnConfirmedAfter(t *testing.T) {
	reg := prometheus.NewRegistry()
	h := newHarness(t, modelSpec{Name: "m", YAML: venvCommand(t, "0.10.1")}).start(Options{Registerer: reg})
	var sources []string
	h.waitFor(t, 30*time.Second, "m ready with its version confirmed", func() bool {
		st := h.status("m")
		if st.VLLMVersionSource != "" && (len(sources) == 0 || sources[len(sources)-1] != st.VLLMVersionSource) {
			sources = append(sources, st.VLLMVersionSource)
		}
		return st.State == Ready && st.VLLMVersionSource == VersionFromServer
	})
	st := h.status("m")
	if st.VLLMVersion != "0.10.1" || sources[0] != VersionFromPackage {
		t.Errorf("version %q, sources seen %v; want 0.10.1 from the package first", st.VLLMVersion, sources)
	}
	want := `
# HELP citadel_model_vllm_info 1, labelled with the model's vLLM release (learned from its interpreter's package metadata before it starts, confirmed by its GET /version; docs/vllm.md). Absent while unknown.
# TYPE citadel_model_vllm_info gauge
citadel_model_vllm_info{model="m",version="0.10.1"} 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "citadel_model_vllm_info"); err != nil {
		t.Error(err)
	}
}

// TestVersionLookupIsAJob: an interpreter that never answers keeps its own
// model pending, nothing else: another model starts, operations answer at
// once, and shutdown kills the lookup and returns.
func TestVersionLookupIsAJob(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(dir, "lookup.pid")
	hang := filepath.Join(dir, "bin", "python3")
	os.MkdirAll(filepath.Dir(hang), 0o755)
	if err := os.WriteFile(hang, []byte("#!/bin/sh\necho $$ > "+pidFile+"\nexec sleep 600\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t,
		modelSpec{Name: "hung", YAML: fmt.Sprintf("command: [%q, -m, vllm.entrypoints.openai.api_server]", hang)},
		modelSpec{Name: "other"},
	).start(Options{})
	h.waitFor(t, 30*time.Second, "hung's lookup running", func() bool {
		st := h.status("hung")
		_, err := os.Stat(pidFile)
		return err == nil && st.State == Pending && strings.Contains(st.Reason, "learning its vLLM version")
	})
	h.waitState("other", Ready, 30*time.Second)
	b, _ := os.ReadFile(pidFile)
	lookup, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	if _, err := h.sup.Do(ctx, api.OpStop, "hung"); err != nil {
		t.Fatalf("stop while the lookup hangs: %v", err)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("an operation waited %s on the lookup", took)
	}
	h.waitState("hung", Stopped, 10*time.Second)
	h.stop()
	waitFor(t, 10*time.Second, "the hung lookup killed at shutdown", func() bool { return !running(lookup) })
}

// TestVersionCacheSharesLookups: models with one command and env share one
// interpreter run, also when they ask at the same moment.
func TestVersionCacheSharesLookups(t *testing.T) {
	python := supervisortest.FakeVenv(t, "0.8.5")
	m := config.Model{Name: "a", Command: []string{python, "-m", "vllm.entrypoints.openai.api_server"}, Env: map[string]string{selfEnv: "1"}}
	var runs atomic.Int32
	// Through the reaper, as the runner starts it: this test binary is a
	// subreaper whose Reaper takes the exit status of any child it was not
	// told of ("waitid: no child processes").
	start := func(cmd *exec.Cmd) error { runs.Add(1); return testReaper.Start(cmd) }
	c := &versionCache{}
	done := make(chan vllm.Version, 4)
	for range 4 {
		go func() {
			v, err := c.learn(context.Background(), m, os.Environ(), start)
			if err != nil {
				t.Error(err)
			}
			done <- v
		}()
	}
	for range 4 {
		if v := <-done; v.String() != "0.8.5" {
			t.Errorf("learned %q", v)
		}
	}
	b := m
	b.Name, b.Port = "b", 1234 // another model, same interpreter and env
	if v, _ := c.learn(context.Background(), b, os.Environ(), start); v.String() != "0.8.5" || runs.Load() != 1 {
		t.Errorf("%q after %d interpreter runs, want 0.8.5 after 1", v, runs.Load())
	}
	other := m
	other.Env = map[string]string{selfEnv: "1", "PYTHONPATH": "/elsewhere"}
	c.learn(context.Background(), other, os.Environ(), start) //nolint:errcheck // counted
	if runs.Load() != 2 {
		t.Errorf("another env shared the lookup: %d runs", runs.Load())
	}
}

// TestModelKeyOnEveryCall: a model whose vLLM wants VLLM_API_KEY (from an
// env file) becomes ready, sleeps and wakes: every probe, canary and sleep
// call carries the key. The key is in no status nor log line.
func TestModelKeyOnEveryCall(t *testing.T) {
	const secret = "sk-model-0c8d7e5f4a3b2a19"
	envFile := filepath.Join(t.TempDir(), "m.env")
	if err := os.WriteFile(envFile, []byte("VLLM_API_KEY="+secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, modelSpec{
		Name: "m",
		YAML: fmt.Sprintf("env_files: [%q]\nactivation: on_demand\nsleep_level: 1\nmin_awake: 0s\nprobe: {period: 50ms, timeout: 1s, failure_threshold: 3, startup_timeout: 30s, deep_period: 100ms}", envFile),
		Fake: []string{"--fake-wake-time-l1", "20ms"},
	})
	core, logs := observer.New(zap.DebugLevel)
	h.start(Options{Logger: zap.New(core)})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	h.sup.Demand("m")
	st := h.waitState("m", Ready, 30*time.Second)
	port := h.site.Models[0].Port
	// A deep probe or two, then a sleep and a wake (with its canary).
	h.waitFor(t, 10*time.Second, "a deep probe", func() bool { return supervisortest.FakeStats(t, port)["served"] >= 1 })
	if _, err := h.sup.Do(ctx, api.OpSleep, "m"); err != nil {
		t.Fatal(err)
	}
	h.waitState("m", Sleeping, 10*time.Second)
	if _, err := h.sup.Do(ctx, api.OpWake, "m"); err != nil {
		t.Fatal(err)
	}
	st = h.waitState("m", Ready, 10*time.Second)
	stats := supervisortest.FakeStats(t, port)
	if stats["sleeps"] != 1 || stats["wakes_l1"] != 1 {
		t.Errorf("fake stats %v: want one sleep and one wake", stats)
	}
	var auth map[string]float64
	getJSON(t, fmt.Sprintf("http://127.0.0.1:%d/fake/auth", port), &auth)
	if auth["unauthorized"] != 0 {
		t.Errorf("%v calls reached /v1 without the key", auth["unauthorized"])
	}
	all, _ := json.Marshal(st)
	if strings.Contains(string(all), secret) {
		t.Error("the key is in the status")
	}
	for _, e := range logs.All() {
		if strings.Contains(fmt.Sprintf("%s %v", e.Message, e.ContextMap()), secret) {
			t.Errorf("the key is in a log line: %s %v", e.Message, e.ContextMap())
		}
	}
}

// TestOldVLLMSleepsByStopping: an on-demand model whose vLLM (0.6.3) has no
// sleep mode is started without --enable-sleep-mode (it would exit on the
// unknown flag) and, put to sleep, is stopped instead, saying why.
func TestOldVLLMSleepsByStopping(t *testing.T) {
	h := newHarness(t, modelSpec{Name: "m", YAML: venvCommand(t, "0.6.3") + "\nactivation: on_demand\nsleep_level: 1\nmin_awake: 0s"}).start(Options{})
	h.sup.Demand("m")
	st := h.waitState("m", Ready, 30*time.Second)
	if st.Restarts != 0 || !strings.Contains(st.VLLMNote, "has no sleep mode") {
		t.Errorf("ready after %d restarts, note %q", st.Restarts, st.VLLMNote)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := h.sup.Do(ctx, api.OpSleep, "m"); err != nil {
		t.Fatal(err)
	}
	st = h.waitState("m", Stopped, 20*time.Second)
	if !strings.Contains(st.Reason, "sleep_level 1 needs vLLM 0.7.3") {
		t.Errorf("stopped: %q", st.Reason)
	}
	h.sup.Demand("m")
	h.waitState("m", Ready, 30*time.Second) // cold start at the next request
}

// TestPlacedGPUsByIndex: children name their placed GPUs by NVML index with
// PCI_BUS_ID order (vLLM before 0.24 dies on a UUID), and get a cache
// directory of their own; gpu.visible_devices: uuid passes UUIDs to a vLLM
// that takes them, indices to one that does not.
func TestPlacedGPUsByIndex(t *testing.T) {
	for _, tc := range []struct {
		visible, version string
		uuid             bool
	}{
		{"index", "0.20.1", false},
		{"index", "0.33.0", false},
		{"uuid", "0.24.0", true},
		{"uuid", "0.20.1", false},
	} {
		t.Run(tc.visible+"/"+tc.version, func(t *testing.T) {
			cache := t.TempDir()
			top := fmt.Sprintf(`cache_dir: %s
gpu:
  backend: sim
  visible_devices: %s
  sim:
    devices:
      - {uuid: GPU-00000000-0000-0000-0000-000000000000, memory: 80GiB}
      - {uuid: GPU-11111111-1111-1111-1111-111111111111, memory: 80GiB}
`, cache, tc.visible)
			h := newHarnessWith(t, top,
				modelSpec{Name: "a", YAML: venvCommand(t, tc.version) + "\ngpu_memory_utilization: 0.6"},
				modelSpec{Name: "b", YAML: venvCommand(t, tc.version) + "\ngpu_memory_utilization: 0.6"},
			).start(Options{})
			seen := map[string]bool{}
			for _, m := range []string{"a", "b"} {
				st := h.waitState(m, Ready, 30*time.Second)
				if st.Restarts != 0 {
					t.Errorf("%s restarted %d times", m, st.Restarts)
				}
				env := procEnv(t, st.PID)
				want := map[string]bool{"GPU-00000000-0000-0000-0000-000000000000": tc.uuid, "GPU-11111111-1111-1111-1111-111111111111": tc.uuid, "0": !tc.uuid, "1": !tc.uuid}
				if !want[env["CUDA_VISIBLE_DEVICES"]] || env["CUDA_DEVICE_ORDER"] != "PCI_BUS_ID" {
					t.Errorf("%s: CUDA_VISIBLE_DEVICES=%q CUDA_DEVICE_ORDER=%q", m, env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"])
				}
				seen[env["CUDA_VISIBLE_DEVICES"]] = true
				if got := env["VLLM_CACHE_ROOT"]; got != filepath.Join(cache, "vllm", m) {
					t.Errorf("%s: VLLM_CACHE_ROOT=%q", m, got)
				}
			}
			if len(seen) != 2 {
				t.Errorf("both models name the same GPU: %v", seen)
			}
		})
	}
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	resp, err := http.Get(url) //nolint:noctx // a test against a local fake

	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatal(err)
	}
}
