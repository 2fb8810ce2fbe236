//go:build e2e

package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"citadel-supervisor/supervisor/supervisortest"
)

// onDemandSite is the reference host in miniature: two 80 GiB sim GPUs and
// seven on-demand models whose memory (two TP=2 models at 0.85, five at
// 0.6-0.8) is far more than the GPUs hold, behind the gateway.
func onDemandSite(t *testing.T, od string, fake ...string) (*site, string) {
	t.Helper()
	gwPort := supervisortest.FreePort(t)
	usage := t.TempDir()
	top := fmt.Sprintf(`gpu:
  backend: sim
  headroom: 1GiB
  release_timeout: 10s
  sim:
    devices:
      - {uuid: GPU-00000000-0000-0000-0000-000000000000, name: Sim H100, memory: 80GiB}
      - {uuid: GPU-11111111-1111-1111-1111-111111111111, name: Sim H100, memory: 80GiB}
    usage_dir: %s
gateway: {listen: 127.0.0.1:%d, max_wait: 1m}
`, usage, gwPort)
	fake = append(fake, "--fake-usage-dir", usage)
	models := []testModel{
		{Name: "mixtral", YAML: od + "\npriority: 100\ntensor_parallel: 2\ngpu_memory_utilization: 0.85"},
		{Name: "hermes", YAML: od + "\npriority: 10\ntensor_parallel: 2\ngpu_memory_utilization: 0.85"},
		{Name: "openchat", YAML: od + "\npriority: 20\ngpu_memory_utilization: 0.7"},
		{Name: "phi3", YAML: od + "\npriority: 30\ngpu_memory_utilization: 0.6"},
		{Name: "yi34b", YAML: od + "\npriority: 5\ntensor_parallel: 2\ngpu_memory_utilization: 0.8"},
		{Name: "coder", YAML: od + "\npriority: 40\ngpu_memory_utilization: 0.8"},
		{Name: "vision", YAML: od + "\npriority: 15\ngpu_memory_utilization: 0.7"},
	}
	for i := range models {
		models[i].Fake = fake
	}
	return &site{Site: supervisortest.NewSite(t, top, models...), t: t}, fmt.Sprintf("http://127.0.0.1:%d", gwPort)
}

// TestSevenModelsOnTwoGPUs: a request to each of the seven models in turn,
// twice round, succeeds through the one gateway on two GPUs: each starts
// on demand, putting the idle ones out of its way (here sleep_level 0,
// they stop).
func TestSevenModelsOnTwoGPUs(t *testing.T) {
	s, gw := onDemandSite(t, "activation: on_demand\nsleep_level: 0\nmin_awake: 0s")
	d := s.start()
	names := []string{"mixtral", "hermes", "openchat", "phi3", "yi34b", "coder", "vision"}
	supervisortest.WaitGateway(t, d, gw)
	for round := range 2 {
		for _, m := range names {
			if code, body := chat(t, gw, m); code != 200 || !strings.Contains(body, `"model":"`+m+`"`) {
				t.Fatalf("round %d, %s: %d %s", round, m, code, body)
			}
		}
	}
}

// TestSevenModelsAsleepInTurn: the same round-robin with vLLM's sleep mode:
// every request succeeds, and no model was ever sent a request while
// asleep nor told to sleep with one in flight.
func TestSevenModelsAsleepInTurn(t *testing.T) {
	s, gw := onDemandSite(t, "activation: on_demand\nsleep_level: 1\nmin_awake: 0s", "--fake-wake-time-l1", "50ms")
	d := s.start()
	supervisortest.WaitGateway(t, d, gw)
	for round := range 3 {
		for _, m := range []string{"mixtral", "hermes", "openchat", "phi3", "yi34b", "coder", "vision"} {
			if code, body := chat(t, gw, m); code != 200 {
				t.Fatalf("round %d, %s: %d %s", round, m, code, body)
			}
		}
	}
	for _, m := range s.Models {
		r, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/fake/stats", m.Port))
		if err != nil {
			continue // stopped for its residue: it started cold since, or is idle
		}
		st := map[string]float64{}
		json.NewDecoder(r.Body).Decode(&st) //nolint:errcheck // checked below
		r.Body.Close()
		if st["refused_asleep"] != 0 || st["refused_sleeps"] != 0 {
			t.Errorf("%s's fake: %v", m.Name, st)
		}
	}
}

// TestTwoThatFitNeverSwap: a steady workload over two on-demand models
// that fit together causes no sleep and no restart: each keeps its process.
func TestTwoThatFitNeverSwap(t *testing.T) {
	s, gw := onDemandSite(t, "activation: on_demand\nsleep_level: 0\nmin_awake: 0s")
	d := s.start()
	supervisortest.WaitGateway(t, d, gw)
	// phi3 (0.6) and coder (0.8) fit on the two GPUs, one each.
	for i := range 20 {
		for _, m := range []string{"phi3", "coder"} {
			if code, body := chat(t, gw, m); code != 200 {
				t.Fatalf("request %d to %s: %d %s", i, m, code, body)
			}
		}
	}
	for _, m := range []string{"phi3", "coder"} {
		procs := s.procs(m) // every process it ever started
		if alive := live(procs, "server"); len(procs) != 1 || len(alive) != 1 {
			t.Errorf("%s: %d processes started, %d alive; want its one server, still running", m, len(procs), len(alive))
		}
	}
}

// TestEvictionDrainsAStreamFirst: a stream in flight on model a when a
// request for b needs a's GPU: a is put to sleep only once the stream has
// ended, whole; b's request waits for that; the fake never saw a sleep with
// a request in flight, nor a request while asleep.
func TestEvictionDrainsAStreamFirst(t *testing.T) {
	gwPort := supervisortest.FreePort(t)
	usage := t.TempDir()
	top := fmt.Sprintf(`gpu:
  backend: sim
  sim:
    devices: [{uuid: GPU-00000000-0000-0000-0000-000000000000, name: Sim H100, memory: 80GiB}]
    usage_dir: %s
gateway: {listen: 127.0.0.1:%d, max_wait: 1m}
`, usage, gwPort)
	od := "activation: on_demand\nsleep_level: 1\nmin_awake: 0s\ngpu_memory_utilization: 0.6"
	fake := []string{"--fake-usage-dir", usage, "--fake-token-delay", "50ms", "--fake-wake-time-l1", "100ms"}
	s := &site{Site: supervisortest.NewSite(t, top, testModel{Name: "a", YAML: od, Fake: fake}, testModel{Name: "b", YAML: od, Fake: fake}), t: t}
	d := s.start()
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	supervisortest.WaitGateway(t, d, gw)
	if code, body := chat(t, gw, "a"); code != 200 {
		t.Fatalf("a: %d %s", code, body)
	}
	// A 40-token stream on a: 2 s.
	stream := startStream(t, gw, "a")
	code, body := chat(t, gw, "b") // waits for a's stream, a's sleep, b's start
	streamed := <-stream
	if code != 200 {
		t.Fatalf("b: %d %s", code, body)
	}
	if !wholeStream(streamed) {
		t.Errorf("a's stream was cut: %d events\n%s", strings.Count(streamed, "data: "), streamed)
	}
	for _, m := range s.Models {
		if st := supervisortest.FakeStats(t, m.Port); st["refused_sleeps"] != 0 || st["refused_asleep"] != 0 {
			t.Errorf("%s's fake: %v", m.Name, st)
		}
	}
}
