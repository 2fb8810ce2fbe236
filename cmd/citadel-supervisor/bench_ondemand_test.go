//go:build benchdriver

package main

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
)

// TestBenchOnDemand is `make bench`'s on-demand part: the supervisor's own
// share of a wake (a request's round trip through the gateway to a
// sleeping model, less the fake's configured wake time), of an eviction
// plus a wake, a round-robin over the seven reference models on two sim
// GPUs (errors, requests the fake saw while asleep), and a steady
// two-model workload (sleeps). It prints a table.
func TestBenchOnDemand(t *testing.T) {
	const wake = 100 * time.Millisecond
	usage := t.TempDir()
	gwPort := supervisortest.FreePort(t)
	top := fmt.Sprintf(`gpu:
  backend: sim
  sim:
    devices: [{uuid: GPU-00000000-0000-0000-0000-000000000000, name: Sim H100, memory: 80GiB}]
    usage_dir: %s
gateway: {listen: 127.0.0.1:%d, max_wait: 1m}
`, usage, gwPort)
	od := "activation: on_demand\nsleep_level: 1\nidle_after: 1h\nmin_awake: 0s\ngpu_memory_utilization: 0.6\nprobe: {period: 10s, timeout: 2s, startup_timeout: 30s}"
	fake := []string{"--fake-usage-dir", usage, "--fake-wake-time-l1", wake.String()}
	s := &site{Site: supervisortest.NewSite(t, top, testModel{Name: "a", YAML: od, Fake: fake}, testModel{Name: "b", YAML: od, Fake: fake}), t: t}
	d := s.start()
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	c := client.New(s.Socket)
	ctx := context.Background()
	supervisortest.WaitGateway(t, d, gw)
	state := func(m string) api.Status {
		st, err := c.Status(ctx, m)
		if err != nil || len(st) != 1 {
			t.Fatalf("status %s: %v", m, err)
		}
		return st[0]
	}
	timed := func(m string) time.Duration {
		start := time.Now()
		if code, body := chat(t, gw, m); code != 200 {
			t.Fatalf("%s: %d %s", m, code, body)
		}
		return time.Since(start)
	}
	// Wake alone: a sleeps by hand, then a request wakes it.
	timed("a")
	var wakes []time.Duration
	for range 20 {
		if _, err := c.Op(ctx, api.OpSleep, "a"); err != nil {
			t.Fatal(err)
		}
		d.waitFor(t, 10*time.Second, "a asleep", func() bool { st := state("a"); return st.State == api.Sleeping && st.SleepLevel == 1 })
		wakes = append(wakes, timed("a")-wake)
	}
	// Eviction and wake: b's request puts a to sleep and wakes b, and back.
	timed("b")
	var swaps []time.Duration
	for i := range 20 {
		m := []string{"a", "b"}[i%2]
		swaps = append(swaps, timed(m)-wake)
	}
	var refused float64
	for _, m := range s.Models {
		refused += fakeCounter(t, m.Port, "refused_asleep") + fakeCounter(t, m.Port, "refused_sleeps")
	}
	rows := [][2]string{
		{"the supervisor's share of a wake (median of 20; round trip less the 100 ms wake)", median(wakes).Round(100 * time.Microsecond).String()},
		{"the supervisor's share of an eviction + wake (median of 20; no request in flight to drain)", median(swaps).Round(100 * time.Microsecond).String()},
		{"requests the fake saw while asleep, or sleeps with requests in flight", fmt.Sprint(refused)},
	}
	var b strings.Builder
	b.WriteString("| measure | value |\n| --- | --- |\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s |\n", r[0], r[1])
	}
	t.Log("\n" + b.String())
	if refused != 0 {
		t.Errorf("the fake saw %g requests while asleep or sleeps with requests in flight", refused)
	}
}

func fakeCounter(t *testing.T, port int, name string) float64 {
	return supervisortest.FakeStats(t, port)[name]
}
