//go:build e2e

package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
)

// The hostile-client suite: a daemon and its gateway attacked as an
// outsider would (hostile children have theirs in hostile_test.go). Each
// test names the bound it holds; TestSoakHostileClients (soak_clients_test.go)
// runs them mixed, at random, for as long as asked.

// quickly runs f with a deadline of one second and says how it went.
func quickly(f func(ctx context.Context) error) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	start := time.Now()
	err := f(ctx)
	return time.Since(start), err
}

func statusWithin(socket string) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		c := client.New(socket)
		defer c.Close()
		_, err := c.Status(ctx)
		return err
	}
}

func getWithin(url string) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body) //nolint:errcheck // the status is the answer
		if resp.StatusCode != 200 {
			return fmt.Errorf("%s", resp.Status)
		}
		return nil
	}
}

// TestSilentClientLetsItsModelSleep: a client that names an on-demand model
// and goes silent mid-body holds nothing: the model is put to sleep when
// idle_after says, and the client gets 408 after body_timeout. Before, the
// silent request held the model's slot for as long as its connection
// stayed open: the drain before the sleep never ended and the model never
// gave its GPU back.
func TestSilentClientLetsItsModelSleep(t *testing.T) {
	gwPort := supervisortest.FreePort(t)
	top := fmt.Sprintf("gateway: {listen: 127.0.0.1:%d}\n", gwPort)
	s := &site{Site: supervisortest.NewSite(t, top, testModel{Name: "a", YAML: "activation: on_demand\nsleep_level: 1\nidle_after: 2s\nmin_awake: 0s"}), t: t}
	d := s.start()
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	supervisortest.WaitGateway(t, d, gw)
	if code, body := chat(t, gw, "a"); code != 200 {
		t.Fatalf("a: %d %s", code, body)
	}
	silent, err := halfSent(fmt.Sprintf("127.0.0.1:%d", gwPort), "a")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	sent := time.Now()
	d.waitFor(t, 2*time.Second+8*time.Second, "a asleep, idle but for the silent client", func() bool {
		return statusOf(t, s.Socket)["a"].State == api.Sleeping
	})
	silent.SetReadDeadline(time.Now().Add(20 * time.Second)) //nolint:errcheck // seen by the read
	resp, err := http.ReadResponse(bufio.NewReader(silent), nil)
	if err != nil {
		t.Fatalf("the silent client got no answer: %v", err)
	}
	if resp.StatusCode != http.StatusRequestTimeout || time.Since(sent) > 15*time.Second {
		t.Errorf("the silent client: %s after %s", resp.Status, time.Since(sent))
	}
}

// TestDescriptorFloodSparesTheControlPlane: a daemon with 1024 descriptors,
// and 2000 requests sent half-way to its gateway. The gateway's cap leaves
// the descriptors the daemon needs: citadelctl and /metrics answer within
// a second throughout, the models stay ready (their probes are made), and
// a model that crashes during the flood is restarted during it. Before,
// the gateway took every descriptor: citadelctl, /metrics and probes
// failed, and a model that crashed ended failed.
func TestDescriptorFloodSparesTheControlPlane(t *testing.T) {
	if _, err := exec.LookPath("prlimit"); err != nil {
		t.Fatal("prlimit (util-linux) is needed to lower the daemon's descriptor limit")
	}
	httpPort, gwPort := supervisortest.FreePort(t), supervisortest.FreePort(t)
	top := fmt.Sprintf("listen: 127.0.0.1:%d\ngateway: {listen: 127.0.0.1:%d}\n", httpPort, gwPort)
	s := &site{Site: supervisortest.NewSite(t, top, testModel{Name: "a"}, testModel{Name: "b"}), t: t}
	d := s.startWrapped([]string{"prlimit", "--nofile=1024:1024", "--"})
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	supervisortest.WaitGateway(t, d, gw)
	d.waitFor(t, 30*time.Second, "both ready", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["b"].State == api.Ready
	})
	metricsURL := fmt.Sprintf("http://127.0.0.1:%d/metrics", httpPort)

	flood := openFlood(t, fmt.Sprintf("127.0.0.1:%d", gwPort), 2000)
	defer flood.close()
	t.Logf("flood: %d connections held", flood.len())
	if flood.len() < 1500 {
		t.Fatalf("only %d connections: the attack did not happen", flood.len())
	}

	// b crashes in the middle of the flood.
	var killed bool
	end := time.Now().Add(8 * time.Second)
	for time.Now().Before(end) {
		if took, err := quickly(statusWithin(s.Socket)); err != nil {
			t.Fatalf("citadelctl status during the flood: %v (after %s)", err, took)
		}
		if took, err := quickly(getWithin(metricsURL)); err != nil {
			t.Fatalf("/metrics during the flood: %v (after %s)", err, took)
		}
		st := statusOf(t, s.Socket)
		if a := st["a"]; a.State != api.Ready || a.Restarts != 0 {
			t.Fatalf("a during the flood: %s (%s), %d restarts", a.State, a.Reason, a.Restarts)
		}
		if !killed && time.Until(end) < 6*time.Second {
			for pid, role := range s.procs("b") {
				if role == "server" && supervisortest.Running(pid) {
					syscall.Kill(pid, syscall.SIGKILL) //nolint:errcheck // its restart is the check
				}
			}
			killed = true
		}
		<-time.After(200 * time.Millisecond)
	}
	d.waitFor(t, 20*time.Second, "b restarted during the flood", func() bool {
		b := statusOf(t, s.Socket)["b"]
		return b.State == api.Ready && b.Restarts == 1
	})
	_, m := scrape(t, metricsURL)
	open, max := value(m["citadel_gateway_connections"]), value(m["citadel_gateway_connections_max"])
	if open > max || max == 0 {
		t.Errorf("gateway connections %v over its cap %v", open, max)
	}
	if fds := countFDs(t, daemonPID(d)); fds >= 1024 {
		t.Errorf("the daemon holds %d descriptors of 1024", fds)
	}
}

// TestSpawnShortOfDescriptorsIsTheDaemonsProblem: an operator who sets
// gateway.max_connections past what the descriptors allow lets a flood
// exhaust them; a model that crashes then cannot be spawned (pipe2:
// EMFILE). That is the daemon's trouble: the model waits (pending, cause
// daemon) and starts once the flood is gone, never failed, its crash
// counted once. Before, it ended failed: spawn: … too many open files,
// for retry_failed_after.
func TestSpawnShortOfDescriptorsIsTheDaemonsProblem(t *testing.T) {
	if _, err := exec.LookPath("prlimit"); err != nil {
		t.Fatal("prlimit (util-linux) is needed to lower the daemon's descriptor limit")
	}
	gwPort := supervisortest.FreePort(t)
	top := fmt.Sprintf("gateway: {listen: 127.0.0.1:%d, max_connections: 5000}\n", gwPort)
	s := &site{Site: supervisortest.NewSite(t, top, testModel{Name: "a"}), t: t}
	d := s.startWrapped([]string{"prlimit", "--nofile=256:256", "--"})
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	supervisortest.WaitGateway(t, d, gw)
	d.waitFor(t, 30*time.Second, "a ready", func() bool { return statusOf(t, s.Socket)["a"].State == api.Ready })

	flood := openFlood(t, fmt.Sprintf("127.0.0.1:%d", gwPort), 600)
	d.waitFor(t, 10*time.Second, "the daemon out of descriptors", func() bool {
		return strings.Contains(d.logText(), "out of file descriptors")
	})
	for pid, role := range s.procs("a") {
		if role == "server" && supervisortest.Running(pid) {
			syscall.Kill(pid, syscall.SIGKILL) //nolint:errcheck // its restart is the check
		}
	}
	d.waitFor(t, 20*time.Second, "a's crash seen during the flood", func() bool {
		return strings.Contains(d.logText(), `"msg":"restarting model","model":"a","reason":"exit"`)
	})
	// Its restart is tried, and tried again, while the flood lasts.
	d.waitFor(t, 20*time.Second, "a pending for the daemon's want of descriptors, or failed", func() bool {
		return strings.Contains(d.logText(), `"reason":"the daemon is short of resources`) || strings.Contains(d.logText(), `"state":"failed"`)
	})
	<-time.After(2 * time.Second) // the flood goes on a while: more tries
	flood.close()
	d.waitFor(t, 30*time.Second, "a ready again once the flood is gone", func() bool {
		return statusOf(t, s.Socket)["a"].State == api.Ready
	})
	if a := statusOf(t, s.Socket)["a"]; a.Restarts != 1 {
		t.Errorf("a: %d restarts, want its one crash", a.Restarts)
	}
	if strings.Contains(d.logText(), `"state":"failed"`) || strings.Contains(d.logText(), "start limit") {
		t.Errorf("a was failed for the daemon's want of descriptors:\n%s", grepLines(d.logText(), "failed"))
	}
}

// TestQueuedBodiesStayWithinTheirBudget: 40 requests of 30 MiB each wait in
// the queue of a model that is still loading: 1200 MiB of bodies. The
// daemon's RSS grows by less than 256 MiB (gateway.body_memory, 64 MiB by
// default, in memory; the rest in temporary files), and comes back down
// once they are answered. Before, every queued body was held whole in
// memory (40 such bodies: 2.17 GB of RSS, not given back).
func TestQueuedBodiesStayWithinTheirBudget(t *testing.T) {
	httpPort, gwPort := supervisortest.FreePort(t), supervisortest.FreePort(t)
	top := fmt.Sprintf("listen: 127.0.0.1:%d\ngateway: {listen: 127.0.0.1:%d, max_wait: 2m}\n", httpPort, gwPort)
	s := &site{Site: supervisortest.NewSite(t, top, testModel{Name: "a", Fake: []string{"--fake-load-time", "1h"},
		YAML: "probe: {period: 50ms, timeout: 1s, failure_threshold: 3, startup_timeout: 1h}"}), t: t}
	d := s.start()
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	supervisortest.WaitGateway(t, d, gw)
	d.waitFor(t, 30*time.Second, "a starting", func() bool { return statusOf(t, s.Socket)["a"].State == api.Starting })
	pid := daemonPID(d)
	before := procStatus(t, pid, "VmRSS")

	const n, size = 40, 30 << 20
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			// "model" last, as the OpenAI SDKs put it: the whole body comes
			// before the gateway knows its model.
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
	peak = max(peak, procStatus(t, pid, "VmRSS"))
	_, m := scrape(t, metricsURL)
	t.Logf("RSS before %d MiB, peak %d MiB; bodies in memory %.0f MiB, in files %.0f MiB", before>>10, peak>>10,
		value(m["citadel_gateway_body_bytes"], "store=memory")/(1<<20), value(m["citadel_gateway_body_bytes"], "store=spool")/(1<<20))
	if grew := (peak - before) >> 10; grew > 256 {
		t.Errorf("RSS grew by %d MiB with %d MiB of bodies queued, over 256 MiB", grew, n*size>>20)
	}
	cancel() // the clients give up: their bodies are let go
	wg.Wait()
	d.waitFor(t, 30*time.Second, "RSS back down and every body let go", func() bool {
		_, m := scrape(t, metricsURL)
		return procStatus(t, pid, "VmRSS")-before < 64<<10 &&
			value(m["citadel_gateway_body_bytes"], "store=memory") == 0 && value(m["citadel_gateway_body_bytes"], "store=spool") == 0
	})
}

func countFDs(t testing.TB, pid int) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}
