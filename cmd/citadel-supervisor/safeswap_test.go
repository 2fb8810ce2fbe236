//go:build e2e

package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
)

// Sleep, wake and planned stops as real vLLM needs them, through the
// gateway: what a client receives.

// safeSite is one 80 GiB sim GPU, HTTP (for /metrics) and the gateway,
// with the given models.
func safeSite(t *testing.T, models ...testModel) (*site, string, string) {
	t.Helper()
	gwPort, listenPort := supervisortest.FreePort(t), supervisortest.FreePort(t)
	top := fmt.Sprintf(`listen: 127.0.0.1:%d
log: {level: debug}
gpu:
  backend: sim
  sim:
    devices: [{uuid: GPU-00000000-0000-0000-0000-000000000000, name: Sim H100, memory: 80GiB}]
gateway: {listen: 127.0.0.1:%d, max_wait: 1m}
`, listenPort, gwPort)
	return &site{Site: supervisortest.NewSite(t, top, models...), t: t},
		fmt.Sprintf("http://127.0.0.1:%d", gwPort), fmt.Sprintf("http://127.0.0.1:%d", listenPort)
}

const safeOD = "activation: on_demand\nsleep_level: 1\nidle_after: 1h\nmin_awake: 0s\ngpu_memory_utilization: 0.5"

func opSleep(t *testing.T, s *site, d *daemon, model string) {
	t.Helper()
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Op(ctx, api.OpSleep, model); err != nil {
		t.Fatal(err)
	}
	d.waitFor(t, 30*time.Second, model+" asleep", func() bool {
		st := statusOf(t, s.Socket)[model]
		return st.State == api.Sleeping && strings.HasPrefix(st.Reason, "asleep")
	})
}

// rightAnswer reports whether a chat answer is the fake's real one (its
// tokens " tok0 tok1"), not a broken engine's nonsense nor a stale cache's.
func rightAnswer(body string) bool { return strings.Contains(body, `"content":" tok0 tok1"`) }

// TestBrokenWakeNeverReachesAClient: a wake that leaves the engine
// answering nonsense (vllm#25800, #29341, #54235; --fake-break-on-wake)
// passes a one-token canary. The known-answer canary fails it: the model
// is started cold, the request waits for that, and the client gets a real
// answer; the failed wake is counted.
func TestBrokenWakeNeverReachesAClient(t *testing.T) {
	s, gw, web := safeSite(t, testModel{Name: "m", YAML: safeOD, Fake: []string{"--fake-break-on-wake"}})
	d := s.start()
	supervisortest.WaitGateway(t, d, gw)
	if code, body := chat(t, gw, "m"); code != 200 || !rightAnswer(body) {
		t.Fatalf("before the sleep: %d %s", code, body)
	}
	before := statusOf(t, s.Socket)["m"]
	d.waitFor(t, 10*time.Second, "the known answer recorded", func() bool { return statusOf(t, s.Socket)["m"].Canary == "known answer" })
	opSleep(t, s, d, "m")
	if code, body := chat(t, gw, "m"); code != 200 || !rightAnswer(body) {
		t.Errorf("after the wake: %d %s; want the model's real answer", code, body)
	}
	st := statusOf(t, s.Socket)["m"]
	if st.PID == before.PID || st.WakeFailures != 1 || st.RestartsByReason["wake"] != 1 {
		t.Errorf("after the wake: pid %d (was %d), %d failed wakes, restarts %v; want started cold after one failed wake",
			st.PID, before.PID, st.WakeFailures, st.RestartsByReason)
	}
	_, fams := scrape(t, web+"/metrics")
	if v := value(fams["citadel_model_wake_failures_total"], "model=m", "reason=canary"); v != 1 {
		t.Errorf(`citadel_model_wake_failures_total{model="m",reason="canary"} = %v, want 1`, v)
	}
}

// TestStalePrefixCacheNeverReachesAClient: vLLM 0.8.0 to 0.10.1 keeps a
// stale prefix cache after a level-1 wake (vllm#16234, #17103; fixed by PR
// #22726): the daemon resets it after every wake, and the client gets the
// model's real answer.
func TestStalePrefixCacheNeverReachesAClient(t *testing.T) {
	s, gw, _ := safeSite(t, testModel{Name: "m", YAML: safeOD, Fake: []string{"--fake-vllm-version", "0.9.2"}})
	d := s.start()
	supervisortest.WaitGateway(t, d, gw)
	if code, body := chat(t, gw, "m"); code != 200 || !rightAnswer(body) {
		t.Fatalf("before the sleep: %d %s", code, body)
	}
	before := statusOf(t, s.Socket)["m"]
	opSleep(t, s, d, "m")
	if code, body := chat(t, gw, "m"); code != 200 || !rightAnswer(body) {
		t.Errorf("after the wake: %d %s; want the model's real answer", code, body)
	}
	if st := statusOf(t, s.Socket)["m"]; st.PID != before.PID || st.WakeFailures != 0 {
		t.Errorf("after the wake: pid %d (was %d), %d failed wakes; want the same process", st.PID, before.PID, st.WakeFailures)
	}
}

// TestRestartDrainsAStream: a 3 s stream in flight when an operator
// restarts its model completes whole before the SIGTERM (vLLM aborts the
// requests in flight at SIGTERM: it was cut after a few events).
func TestRestartDrainsAStream(t *testing.T) {
	s, gw, _ := safeSite(t, testModel{Name: "m", YAML: "gpu_memory_utilization: 0.5\nstop_timeout: 20s", Fake: []string{"--fake-token-delay", "75ms"}})
	d := s.start()
	supervisortest.WaitGateway(t, d, gw)
	if code, body := chat(t, gw, "m"); code != 200 {
		t.Fatalf("m: %d %s", code, body)
	}
	before := statusOf(t, s.Socket)["m"]
	stream := startStream(t, gw, "m") // 40 tokens of 75 ms: 3 s
	d.waitFor(t, 5*time.Second, "the stream under way", func() bool {
		for _, e := range s.ReadEvents(t) {
			if e.Model == "m" && e.Ev == "req" {
				return true
			}
		}
		return false
	})
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Op(ctx, api.OpRestart, "m"); err != nil {
		t.Fatal(err)
	}
	if got := <-stream; !wholeStream(got) {
		t.Errorf("the stream was cut by the restart: %d events\n%s", strings.Count(got, "data: "), got)
	}
	d.waitFor(t, 30*time.Second, "m restarted", func() bool {
		st := statusOf(t, s.Socket)["m"]
		return st.State == api.Ready && st.PID != before.PID
	})
	for _, e := range s.ReadEvents(t) {
		if e.Ev == "sigterm_in_flight" {
			t.Errorf("SIGTERM reached %s's engine with requests in flight: %v", e.Model, e.More)
		}
	}
}

// TestSleepWaitsForTheEngineAfterAHangUp: a client hangs up mid-stream:
// the gateway counts the request finished at once, but the engine lets go
// only when it notices (its next token, here a second later). A sleep
// ordered then waits for the engine (vllm:num_requests_running 0); it
// reached the engine still generating (which has crashed TP>1 engines).
func TestSleepWaitsForTheEngineAfterAHangUp(t *testing.T) {
	s, gw, _ := safeSite(t, testModel{Name: "m", YAML: safeOD, Fake: []string{"--fake-token-delay", "100ms", "--fake-abort-delay", "1s"}})
	d := s.start()
	supervisortest.WaitGateway(t, d, gw)
	if code, body := chat(t, gw, "m"); code != 200 {
		t.Fatalf("m: %d %s", code, body)
	}
	ctx, hangUp := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, gw+"/v1/completions",
		strings.NewReader(`{"model":"m","prompt":"hi","max_tokens":40,"stream":true}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	if _, err := io.ReadAtLeast(resp.Body, buf, 10); err != nil {
		t.Fatal(err)
	}
	hangUp()
	resp.Body.Close()
	opSleep(t, s, d, "m") // the site's cleanup fails the test on a sleep with a request in flight
}

// TestHostMemoryCountedAcrossAnUpgrade: a level-1 sleeper's pinned host
// memory (96 MiB) is still counted after an upgrade in place, asleep and
// once awake again.
func TestHostMemoryCountedAcrossAnUpgrade(t *testing.T) {
	s, gw, web := safeSite(t, testModel{Name: "m", YAML: safeOD, Fake: []string{"--fake-model-bytes", "96MiB"}})
	in := newInstalled(t)
	d := in.start(s)
	supervisortest.WaitGateway(t, d, gw)
	if code, body := chat(t, gw, "m"); code != 200 {
		t.Fatalf("m: %d %s", code, body)
	}
	opSleep(t, s, d, "m")
	held := hostHeldOf(t, web, "m")
	held("asleep")
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	in.install(t, "v2")
	if _, err := c.Upgrade(ctx); err != nil {
		t.Fatal(err)
	}
	d.waitFor(t, 30*time.Second, "v2 answering", func() bool {
		dv, err := c.Daemon(ctx)
		return err == nil && dv.Version == "v2"
	})
	held("asleep, after the upgrade")
	if code, body := chat(t, gw, "m"); code != 200 {
		t.Fatalf("m after the upgrade: %d %s", code, body)
	}
	held("awake again")
}

// TestHostMemoryCountedAfterADaemonSIGKILL: a level-1 sleeper's pinned host
// memory is still counted once a daemon SIGKILLed while it slept is
// restarted and adopts it (the crash record carried it too), asleep and
// once awake again.
func TestHostMemoryCountedAfterADaemonSIGKILL(t *testing.T) {
	s, gw, web := safeSite(t, testModel{Name: "m", YAML: safeOD, Fake: []string{"--fake-model-bytes", "96MiB"}})
	d := s.start()
	supervisortest.WaitGateway(t, d, gw)
	if code, body := chat(t, gw, "m"); code != 200 {
		t.Fatalf("m: %d %s", code, body)
	}
	opSleep(t, s, d, "m")
	held := hostHeldOf(t, web, "m")
	held("asleep")
	pid := statusOf(t, s.Socket)["m"].PID
	d.cmd.Process.Signal(syscall.SIGKILL) //nolint:errcheck // checked by wait
	d.wait(t)
	d = s.start()
	d.waitFor(t, 30*time.Second, "m adopted asleep", func() bool {
		st := statusOf(t, s.Socket)
		return st != nil && st["m"].PID == pid && st["m"].State == api.Sleeping
	})
	held("asleep, adopted after a SIGKILL")
	if code, body := chat(t, gw, "m"); code != 200 {
		t.Fatalf("m after the restart: %d %s", code, body)
	}
	held("awake again")
}

// hostHeldOf returns a check of model's citadel_model_sleep_host_memory_bytes
// on web's /metrics: about 96 MiB (more under the race detector, whose
// shadow memory grows with the fake's), and the same at every check as at
// the first.
func hostHeldOf(t *testing.T, web, model string) func(when string) {
	var first float64
	return func(when string) {
		t.Helper()
		_, fams := scrape(t, web+"/metrics")
		v := value(fams["citadel_model_sleep_host_memory_bytes"], "model="+model)
		if first == 0 {
			first = v
		}
		if v < 80<<20 || v != first {
			t.Errorf("%s: citadel_model_sleep_host_memory_bytes = %.0f MiB, want about 96 (%.0f MiB at first)", when, v/(1<<20), first/(1<<20))
		}
	}
}
