//go:build e2e

package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
)

// openaiNode is the OpenAI Node SDK the test installs (npm, pinned).
const openaiNode = "6.49.0"

// sdkRun is what deploy/sdk/openai-node-load.mjs prints.
type sdkRun struct {
	SDK       string         `json:"sdk"`
	Requests  int            `json:"requests"`
	Succeeded int            `json:"succeeded"`
	Attempts  int            `json:"attempts"`
	Statuses  map[string]int `json:"statuses"`
	P50       int            `json:"p50_ms"`
	P90       int            `json:"p90_ms"`
	Max       int            `json:"max_ms"`
	Errors    map[string]int `json:"errors"`
}

// TestE2EOpenAINodeSDK: the official OpenAI Node SDK, default retries, 100
// concurrent requests to an on-demand model that takes 4 s to start
// (max_queue 64, so 36 are refused at first): every request succeeds,
// by the queue or by retries timed with Retry-After. Three runs: the
// model's first start (no history: "as long again as so far"), a stream
// run, and a start timed on the last ones. npm installs the SDK; CI has
// npm (.ci/run installs Node and npm where missing).
func TestE2EOpenAINodeSDK(t *testing.T) {
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatal("node not installed (apt-get install nodejs npm): the SDK test needs it")
	}
	npm, err := exec.LookPath("npm")
	if err != nil {
		t.Fatal("npm not installed (apt-get install npm): the SDK test installs the OpenAI SDK with it")
	}
	dir := t.TempDir()
	script, err := os.ReadFile("../../deploy/sdk/openai-node-load.mjs")
	if err != nil {
		t.Fatal(err)
	}
	pkg := fmt.Sprintf(`{"private": true, "type": "module", "dependencies": {"openai": %q}}`, openaiNode)
	for name, b := range map[string][]byte{"load.mjs": script, "package.json": []byte(pkg)} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	install := exec.Command(npm, "install", "--no-audit", "--no-fund", "--loglevel=error")
	install.Dir = dir
	if out, err := install.CombinedOutput(); err != nil {
		t.Fatalf("npm install openai@%s: %v\n%s", openaiNode, err, out)
	}

	gwPort := supervisortest.FreePort(t)
	top := fmt.Sprintf("gpu: {backend: none}\ngateway: {listen: 127.0.0.1:%d}\n", gwPort)
	s := &site{Site: supervisortest.NewSite(t, top, testModel{Name: "alpha",
		// Probed every 10 s as shipped: readiness is seen at a 1 s poll.
		YAML: "activation: on_demand\nsleep_level: 0\nprobe: {period: 10s, startup_timeout: 2m}",
		Fake: []string{"--fake-load-time", "4s"},
	}), t: t}
	d := s.start()
	c := client.New(s.Socket)
	defer c.Close()
	d.waitFor(t, 30*time.Second, "alpha stopped, startable", func() bool {
		st, err := c.Status(t.Context(), "alpha")
		return err == nil && st[0].State == api.Stopped
	})

	for _, run := range []struct {
		name   string
		stream bool
	}{{"first start, no history", false}, {"streams, timed on one start", true}, {"timed on two starts", false}} {
		cmd := exec.Command(node, "load.mjs")
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), fmt.Sprintf("BASE_URL=http://127.0.0.1:%d/v1", gwPort), "MODEL=alpha", "N=100")
		if run.stream {
			cmd.Env = append(cmd.Env, "STREAM=1")
		}
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s: %v\n%s", run.name, err, out)
		}
		var r sdkRun
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatalf("%s: %v: %s", run.name, err, out)
		}
		t.Logf("%s: %s", run.name, strings.TrimSpace(string(out)))
		if r.SDK != openaiNode || r.Succeeded != r.Requests || r.Requests != 100 {
			t.Errorf("%s: %d of %d succeeded (SDK %s): %v", run.name, r.Succeeded, r.Requests, r.SDK, r.Errors)
		}
		// Put it back to stopped: the next run starts it again.
		if _, err := c.Op(t.Context(), api.OpSleep, "alpha"); err != nil {
			t.Fatal(err)
		}
		d.waitFor(t, 30*time.Second, "alpha stopped again", func() bool {
			st, err := c.Status(t.Context(), "alpha")
			return err == nil && st[0].State == api.Stopped
		})
	}
}
