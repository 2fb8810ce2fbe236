//go:build e2e

package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
	"citadel-supervisor/vllm"
)

// TestVLLMVersions runs the daemon against fake-vllm playing the releases
// operators run (vLLM 0.6.3, 0.10.1, 0.20.1, 0.33.0), each learned from its
// interpreter's package metadata: a placed always model starts once and
// answers; two on-demand models that cannot both be awake next to it swap
// and answer every request, at the sleep level the release has (0.6.3
// stops and cold-starts, 0.10.1 sleeps at level 1 for sleep_level 2,
// later ones at level 2). The reference host's --disable-log-stats is on.
func TestVLLMVersions(t *testing.T) {
	for _, tc := range []struct {
		version string
		level   int // the level sleep_level 2 gets
	}{{"0.6.3", 0}, {"0.10.1", 1}, {"0.20.1", 2}, {"0.33.0", 2}} {
		t.Run(tc.version, func(t *testing.T) {
			gwPort, usage := supervisortest.FreePort(t), t.TempDir()
			// listen "" said, or the gateway's "listen:" hides NewSite's
			// default and the daemon takes 127.0.0.1:9400, shared by the host.
			top := fmt.Sprintf(`listen: ""
gpu:
  backend: sim
  sim:
    devices: [{uuid: GPU-00000000-0000-0000-0000-000000000000, name: Sim H100, memory: 80GiB}]
    usage_dir: %s
gateway: {listen: 127.0.0.1:%d, max_wait: 1m}
`, usage, gwPort)
			cmd := fmt.Sprintf("command: [%q, -m, vllm.entrypoints.openai.api_server]", supervisortest.FakeVenv(t, tc.version))
			od := cmd + "\nactivation: on_demand\nsleep_level: 2\nmin_awake: 0s\ngpu_memory_utilization: 0.55"
			fake := []string{"--disable-log-stats", "--fake-usage-dir", usage, "--fake-wake-time-l1", "20ms", "--fake-wake-time-l2", "50ms"}
			s := &site{Site: supervisortest.NewSite(t, top,
				testModel{Name: "resident", YAML: cmd + "\ngpu_memory_utilization: 0.3\nprobe: {period: 50ms, timeout: 1s, startup_timeout: 30s, deep_period: 200ms}", Fake: fake},
				testModel{Name: "a", YAML: od, Fake: fake},
				testModel{Name: "b", YAML: od, Fake: fake},
			), t: t}
			d := s.start()
			gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
			supervisortest.WaitGateway(t, d, gw)
			for round := range 3 {
				for _, m := range []string{"resident", "a", "b"} {
					if code, body := chat(t, gw, m); code != 200 || !strings.Contains(body, `"model":"`+m+`"`) {
						t.Fatalf("round %d, %s: %d %s", round, m, code, body)
					}
				}
			}
			if servers := len(serverPIDs(s.procs("resident"))); servers != 1 {
				t.Errorf("the always model started %d times", servers)
			}
			c := client.New(s.Socket)
			defer c.Close()
			st, err := c.Status(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range st {
				if m.VLLMVersion != tc.version {
					t.Errorf("%s: vllm_version %q from %q", m.Name, m.VLLMVersion, m.VLLMVersionSource)
				}
				if m.Name == "resident" {
					env := procEnviron(t, m.PID)
					if env["CUDA_VISIBLE_DEVICES"] != "0" || env["CUDA_DEVICE_ORDER"] != "PCI_BUS_ID" {
						t.Errorf("resident: CUDA_VISIBLE_DEVICES=%q CUDA_DEVICE_ORDER=%q", env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"])
					}
					// From 0.18 the drain before a stop has vLLM's own as a
					// second line of defence (docs/vllm.md).
					argv, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", m.PID))
					if err != nil {
						t.Fatal(err)
					}
					has := strings.Contains(string(argv), "\x00--shutdown-timeout\x00")
					if want := vllm.MustParse(tc.version).Has(vllm.ShutdownTimeout); has != want {
						t.Errorf("resident on %s: --shutdown-timeout passed %v, want %v", tc.version, has, want)
					}
				}
			}
			var wakes [3]float64
			starts := 0
			for _, m := range []string{"a", "b"} {
				starts += len(serverPIDs(s.procs(m)))
				for _, pid := range serverPIDs(s.procs(m)) {
					if !supervisortest.Running(pid) || tc.level == 0 {
						continue // 0.6.3 has no sleep mode, nor its counters
					}
					stats := supervisortest.FakeStats(t, modelPort(s, m))
					if stats["refused_asleep"] != 0 || stats["refused_sleeps"] != 0 || stats["garbage"] != 0 {
						t.Errorf("%s's fake: %v", m, stats)
					}
					wakes[1] += stats["wakes_l1"]
					wakes[2] += stats["wakes_l2"]
				}
			}
			switch tc.level {
			case 0:
				if starts < 4 || wakes[1]+wakes[2] != 0 {
					t.Errorf("0.6.3: %d starts and %v wakes; want cold starts only", starts, wakes)
				}
			default:
				if wakes[tc.level] == 0 || wakes[3-tc.level] != 0 {
					t.Errorf("%s: wakes by level %v; want level %d only", tc.version, wakes, tc.level)
				}
			}
		})
	}
}

// TestKeyedModelBehindKeyedGateway: a model whose vLLM wants VLLM_API_KEY
// (from an env file) becomes ready, sleeps, wakes and answers through a
// gateway that itself requires keys; clients use their own key and never
// the model's, which is in no log, status, metric or error.
func TestKeyedModelBehindKeyedGateway(t *testing.T) {
	const modelKey = "sk-vllm-model-5e1f0c2d9a8b"
	const clientKey = "sk-client-lab-7c4e2b1a0f93"
	dir := t.TempDir()
	envFile := filepath.Join(dir, "model.env")
	keysFile := filepath.Join(dir, "api-keys")
	os.WriteFile(envFile, []byte("VLLM_API_KEY="+modelKey+"\n"), 0o600)
	os.WriteFile(keysFile, []byte("lab "+clientKey+"\n"), 0o600)
	gwPort, httpPort := supervisortest.FreePort(t), supervisortest.FreePort(t)
	top := fmt.Sprintf("listen: 127.0.0.1:%d\ngateway: {listen: 127.0.0.1:%d, api_keys_file: %s, max_wait: 1m}\n", httpPort, gwPort, keysFile)
	s := &site{Site: supervisortest.NewSite(t, top, testModel{
		Name: "m",
		YAML: fmt.Sprintf("env_files: [%q]\nactivation: on_demand\nsleep_level: 1\nmin_awake: 0s\nidle_after: 1s", envFile),
		Fake: []string{"--fake-wake-time-l1", "20ms"},
	}), t: t}
	d := s.start()
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	d.waitFor(t, 30*time.Second, "the gateway up", func() bool {
		code, _ := keyedChat(gw, "m", clientKey)
		return code == 200
	})
	if code, _ := keyedChat(gw, "m", ""); code != 401 {
		t.Errorf("no client key: %d, want 401", code)
	}
	if code, _ := keyedChat(gw, "m", modelKey); code != 401 {
		t.Errorf("the model's own key at the gateway: %d, want 401 (it is not a client key)", code)
	}
	c := client.New(s.Socket)
	defer c.Close()
	d.waitFor(t, 30*time.Second, "m asleep when idle", func() bool {
		st, err := c.Status(context.Background(), "m")
		return err == nil && st[0].State == api.Sleeping
	})
	if code, body := keyedChat(gw, "m", clientKey); code != 200 {
		t.Fatalf("after its sleep: %d %s", code, body)
	}
	stats := supervisortest.FakeStats(t, modelPort(s, "m"))
	if stats["sleeps"] < 1 || stats["wakes_l1"] < 1 {
		t.Errorf("fake stats %v: want a sleep and a wake", stats)
	}
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/fake/auth", modelPort(s, "m")))
	if err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(b), `"unauthorized":0`) {
			t.Errorf("requests reached the model without its key: %s", b)
		}
	}
	var out bytes.Buffer
	st, _ := c.Status(context.Background())
	fmt.Fprintf(&out, "%+v\n", st)
	for _, u := range []string{fmt.Sprintf("http://127.0.0.1:%d/metrics", httpPort), gw + "/v1/models"} {
		req, _ := http.NewRequest("GET", u, nil)
		req.Header.Set("Authorization", "Bearer "+clientKey)
		if resp, err := http.DefaultClient.Do(req); err == nil {
			io.Copy(&out, resp.Body) //nolint:errcheck // searched below
			resp.Body.Close()
		}
	}
	for _, bad := range []string{"", "nope"} { // error answers
		_, body := keyedChat(gw, "m", bad)
		out.WriteString(body)
	}
	out.WriteString(d.logText())
	if strings.Contains(out.String(), modelKey) {
		t.Error("the model's key is in the daemon's log, status, metrics or an answer")
	}
}

func keyedChat(gw, model, key string) (int, string) {
	req, _ := http.NewRequest("POST", gw+"/v1/chat/completions", strings.NewReader(`{"model":"`+model+`","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`))
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func serverPIDs(procs map[int]string) []int {
	var out []int
	for pid, role := range procs {
		if role == "server" {
			out = append(out, pid)
		}
	}
	return out
}

func modelPort(s *site, name string) int {
	for _, m := range s.Models {
		if m.Name == name {
			return m.Port
		}
	}
	return 0
}
