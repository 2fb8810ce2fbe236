//go:build e2e

package main

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
)

// TestAbandonedWakeEvictsNobody: a request wakes b, which must wait for a
// (just woken, within its min_awake) to make room; the client hangs up
// while it waits. The wake is called off: b stays asleep, and once a's
// min_awake is over a is not put to sleep for nobody.
func TestAbandonedWakeEvictsNobody(t *testing.T) {
	gwPort := supervisortest.FreePort(t)
	usage := t.TempDir()
	top := fmt.Sprintf(`gpu:
  backend: sim
  sim:
    devices: [{uuid: GPU-00000000-0000-0000-0000-000000000000, name: Sim H100, memory: 80GiB}]
    usage_dir: %s
gateway: {listen: 127.0.0.1:%d, max_wait: 1m}
`, usage, gwPort)
	od := "activation: on_demand\nsleep_level: 1\ngpu_memory_utilization: 0.6"
	fake := []string{"--fake-usage-dir", usage, "--fake-wake-time-l1", "50ms"}
	const minAwake = 3 * time.Second
	s := &site{Site: supervisortest.NewSite(t, top,
		testModel{Name: "a", YAML: od + "\nmin_awake: 3s", Fake: fake},
		testModel{Name: "b", YAML: od + "\nmin_awake: 0s", Fake: fake}), t: t}
	d := s.start()
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	supervisortest.WaitGateway(t, d, gw)
	c := client.New(s.Socket)
	defer c.Close()
	status := func(name string) api.Status {
		st, err := c.Status(context.Background(), name)
		if err != nil {
			t.Fatal(err)
		}
		return st[0]
	}

	if code, body := chat(t, gw, "b"); code != 200 {
		t.Fatalf("b: %d %s", code, body)
	}
	if code, body := chat(t, gw, "a"); code != 200 { // puts b to sleep
		t.Fatalf("a: %d %s", code, body)
	}
	awake := time.Now() // a's min_awake runs from about now
	if st := status("b"); st.State != api.Sleeping {
		t.Fatalf("b %s (%s), want asleep", st.State, st.Reason)
	}

	ctx, cancel := context.WithCancel(context.Background())
	left := make(chan error, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, gw+"/v1/chat/completions",
			strings.NewReader(`{"model":"b","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`))
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		left <- err
	}()
	d.waitFor(t, 10*time.Second, "b waking, waiting for a to make room", func() bool {
		st := status("b")
		return st.State == api.Waking && strings.Contains(st.Reason, "waiting for its GPU memory")
	})
	cancel()
	<-left
	d.waitFor(t, 10*time.Second, "b's wake called off", func() bool {
		st := status("b")
		return st.State == api.Sleeping && strings.Contains(st.Reason, "left")
	})
	// a's min_awake ends; a wake still wanted would now evict it. Watch for
	// twice the time a wake and an eviction take here, past the end.
	watchUntil := awake.Add(minAwake + 2*time.Second)
	for time.Now().Before(watchUntil) {
		if st := status("a"); st.State != api.Ready {
			t.Fatalf("a %s (%s): put to sleep for a wake nobody waits for", st.State, st.Reason)
		}
		select {
		case <-time.After(100 * time.Millisecond):
		case <-d.done:
			t.Fatal("the daemon exited")
		}
	}
	if st := status("b"); st.State != api.Sleeping {
		t.Errorf("b %s (%s), want still asleep", st.State, st.Reason)
	}
	// The next request for b wakes it, putting a to sleep now.
	if code, body := chat(t, gw, "b"); code != 200 {
		t.Fatalf("b again: %d %s", code, body)
	}
}
