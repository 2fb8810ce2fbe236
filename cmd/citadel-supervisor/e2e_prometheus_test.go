//go:build e2e

package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"citadel-supervisor/supervisor/supervisortest"
)

// TestE2EPrometheusScrapes runs a real Prometheus (Debian's package) on
// loopback against a running daemon: it scrapes the daemon, discovers the
// ready models through /sd, scrapes their own /metrics, and answers
// queries for citadel_model_up through its API.
func TestE2EPrometheusScrapes(t *testing.T) {
	prom, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatal("prometheus not installed (apt-get install prometheus): the end-to-end scrape needs it")
	}
	port := supervisortest.FreePort(t)
	s := &site{Site: supervisortest.NewSite(t, oneSimGPU(port),
		testModel{Name: "alpha", YAML: "gpu_memory_utilization: 0.3"},
		testModel{Name: "beta", YAML: "gpu_memory_utilization: 0.3"},
	), t: t}
	d := s.start()
	d.waitFor(t, 30*time.Second, "models healthy", s.healthy)

	dir := t.TempDir()
	promPort := supervisortest.FreePort(t)
	cfg := fmt.Sprintf(`global: {scrape_interval: 1s, evaluation_interval: 1s}
scrape_configs:
  - job_name: citadel-supervisor
    static_configs: [{targets: ['127.0.0.1:%d']}]
  - job_name: vllm
    http_sd_configs: [{url: 'http://127.0.0.1:%d/sd', refresh_interval: 1s}]
`, port, port)
	if err := os.WriteFile(filepath.Join(dir, "prometheus.yml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(prom, "--config.file="+filepath.Join(dir, "prometheus.yml"),
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address=127.0.0.1:"+strconv.Itoa(promPort))
	log, _ := os.Create(filepath.Join(dir, "prometheus.log"))
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill() //nolint:errcheck // best effort
		cmd.Wait()         //nolint:errcheck // killed
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "prometheus.log"))
			t.Logf("prometheus log:\n%s", b)
		}
	})
	api := "http://127.0.0.1:" + strconv.Itoa(promPort)

	query := func(q string) []map[string]any {
		resp, err := http.Get(api + "/api/v1/query?query=" + url.QueryEscape(q))
		if err != nil {
			return nil
		}
		defer resp.Body.Close()
		var out struct {
			Data struct {
				Result []map[string]any `json:"result"`
			} `json:"data"`
		}
		b, _ := io.ReadAll(resp.Body)
		if json.Unmarshal(b, &out) != nil {
			return nil
		}
		return out.Data.Result
	}
	d.waitFor(t, 60*time.Second, "citadel_model_up == 1 for both models in Prometheus", func() bool {
		return len(query(`citadel_model_up == 1`)) == 2
	})
	// The models' own metrics, found through /sd, carry the model label.
	d.waitFor(t, 60*time.Second, "vLLM metrics of both models scraped through /sd", func() bool {
		r := query(`vllm:num_requests_running{job="vllm"}`)
		if len(r) != 2 {
			return false
		}
		for _, s := range r {
			m, _ := s["metric"].(map[string]any)
			if m["model"] != "alpha" && m["model"] != "beta" {
				return false
			}
		}
		return true
	})
	if r := query(`citadel_gpu_up`); len(r) != 1 {
		t.Errorf("citadel_gpu_up: %v", r)
	}
	// The exposition passes Prometheus' own linter.
	body, _ := scrape(t, "http://127.0.0.1:"+strconv.Itoa(port)+"/metrics")
	lint := exec.Command("promtool", "check", "metrics")
	lint.Stdin = strings.NewReader(body)
	if out, err := lint.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
	d.cmd.Process.Signal(os.Interrupt) //nolint:errcheck // checked by wait
	if code := d.wait(t); code != 0 {
		t.Errorf("daemon exit %d", code)
	}
}
