//go:build benchdriver

package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/supervisortest"
)

// TestBenchGatewayMemory measures what the gateway's clients cost the
// daemon in memory (docs/gateway.md, "Memory", states the worst case from
// it): RSS per connection holding a half-sent body, and RSS with 40
// bodies of 30 MiB queued. The daemon is the test binary (as in make
// test's suite), so the figures include its larger code.
func TestBenchGatewayMemory(t *testing.T) {
	httpPort, gwPort := supervisortest.FreePort(t), supervisortest.FreePort(t)
	top := fmt.Sprintf("listen: 127.0.0.1:%d\ngateway: {listen: 127.0.0.1:%d, max_wait: 2m}\n", httpPort, gwPort)
	s := &site{Site: supervisortest.NewSite(t, top, testModel{Name: "a", Fake: []string{"--fake-load-time", "1h"},
		YAML: "probe: {period: 50ms, timeout: 1s, failure_threshold: 3, startup_timeout: 1h}"}), t: t}
	d := s.start()
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	supervisortest.WaitGateway(t, d, gw)
	d.waitFor(t, 30*time.Second, "a starting", func() bool { return statusOf(t, s.Socket)["a"].State == api.Starting })
	pid := daemonPID(d)
	var rows [][2]string

	for _, n := range []int{1000, 3000} {
		before := procStatus(t, pid, "VmRSS")
		f := openFlood(t, fmt.Sprintf("127.0.0.1:%d", gwPort), n)
		metricsURL := fmt.Sprintf("http://127.0.0.1:%d/metrics", httpPort)
		d.waitFor(t, 30*time.Second, "every connection accepted", func() bool {
			_, m := scrape(t, metricsURL)
			return value(m["citadel_gateway_connections"]) >= float64(f.len())
		})
		after := procStatus(t, pid, "VmRSS")
		rows = append(rows, [2]string{fmt.Sprintf("RSS per connection holding a half-sent body (%d connections)", f.len()),
			fmt.Sprintf("%.1f KiB", float64(after-before)/float64(f.len()))})
		f.close()
		d.waitFor(t, 30*time.Second, "connections gone", func() bool {
			_, m := scrape(t, metricsURL)
			return value(m["citadel_gateway_connections"]) == 0
		})
	}

	before := procStatus(t, pid, "VmRSS")
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	const n, size = 40, 30 << 20
	start := time.Now()
	for i := range n {
		wg.Go(func() {
			body := io.MultiReader(strings.NewReader(`{"prompt":"`),
				io.LimitReader(repeatReader('a'+byte(i%26)), int64(size-len(`{"prompt":"","model":"a"}`))), strings.NewReader(`","model":"a"}`))
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, gw+"/v1/completions", body)
			req.ContentLength = size
			if resp, err := http.DefaultClient.Do(req); err == nil {
				io.Copy(io.Discard, resp.Body) //nolint:errcheck // cancelled
				resp.Body.Close()
			}
		})
	}
	metricsURL := fmt.Sprintf("http://127.0.0.1:%d/metrics", httpPort)
	var peak int64
	d.waitFor(t, 2*time.Minute, "40 requests queued", func() bool {
		peak = max(peak, procStatus(t, pid, "VmRSS"))
		_, m := scrape(t, metricsURL)
		return value(m["citadel_gateway_queue_depth"], "model=a") == n
	})
	took := time.Since(start)
	peak = max(peak, procStatus(t, pid, "VmRSS"))
	cancel()
	wg.Wait()
	var back time.Duration
	gone := time.Now()
	d.waitFor(t, 30*time.Second, "RSS back", func() bool { return procStatus(t, pid, "VmRSS")-before < 16<<10 })
	back = time.Since(gone)
	rows = append(rows,
		[2]string{"40 bodies of 30 MiB queued (1200 MiB): RSS growth at the peak", fmt.Sprintf("%d MiB", (peak-before)>>10)},
		[2]string{"the same: time to receive all 40 (spooled but two)", fmt.Sprintf("%.1f s", took.Seconds())},
		[2]string{"the same: RSS back within 16 MiB of before, after the clients left", fmt.Sprintf("%d ms", back.Milliseconds())})
	fmt.Println("    | measure | value |")
	fmt.Println("    | --- | --- |")
	for _, r := range rows {
		fmt.Printf("    | %s | %s |\n", r[0], r[1])
	}
}
