//go:build e2e

package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
)

// Swaps across a daemon's death and an upgrade: the successor decides
// nothing about GPU memory before it has read the GPUs, and never takes a
// model that was going to sleep for awake.

// swapSite is one 80 GiB sim GPU behind the gateway, with on-demand
// models a and b (0.6 each: never both awake) and fake flags of its own.
func swapSite(t *testing.T, fake ...string) (*site, string) {
	t.Helper()
	gwPort := supervisortest.FreePort(t)
	top := fmt.Sprintf(`listen: ""
log: {level: debug}
gpu:
  backend: sim
  sim:
    devices: [{uuid: GPU-00000000-0000-0000-0000-000000000000, name: Sim H100, memory: 80GiB}]
gateway: {listen: 127.0.0.1:%d, max_wait: 1m}
`, gwPort)
	od := "activation: on_demand\nsleep_level: 1\nidle_after: 1h\nmin_awake: 0s\ngpu_memory_utilization: 0.6"
	return &site{Site: supervisortest.NewSite(t, top,
		testModel{Name: "a", YAML: od, Fake: fake},
		testModel{Name: "b", YAML: od, Fake: fake},
	), t: t}, fmt.Sprintf("http://127.0.0.1:%d", gwPort)
}

// bothAsleep serves a request of each through the gateway, then puts
// both to sleep by hand.
func bothAsleep(t *testing.T, s *site, d *daemon, gw string) map[string]api.Status {
	t.Helper()
	supervisortest.WaitGateway(t, d, gw)
	for _, m := range []string{"a", "b"} {
		if code, body := chat(t, gw, m); code != 200 {
			t.Fatalf("%s: %d %s", m, code, body)
		}
	}
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Op(ctx, api.OpSleep, "b"); err != nil {
		t.Fatal(err)
	}
	var st map[string]api.Status
	d.waitFor(t, 30*time.Second, "a and b asleep", func() bool {
		st = statusOf(t, s.Socket)
		return st["a"].State == api.Sleeping && st["b"].State == api.Sleeping &&
			strings.HasPrefix(st["a"].Reason, "asleep") && strings.HasPrefix(st["b"].Reason, "asleep")
	})
	return st
}

// chatBoth sends a request for a and for b at once; the channel gets
// "model: code" for each.
func chatBoth(t *testing.T, gw string) <-chan string {
	out := make(chan string, 2)
	for _, m := range []string{"a", "b"} {
		go func() {
			code, body := chat(t, gw, m)
			if code != 200 {
				out <- fmt.Sprintf("%s: %d %s", m, code, body)
				return
			}
			out <- m + ": 200"
		}()
	}
	return out
}

// TestUpgradeWithABacklogOfWakes: requests for two sleepers that do not
// fit together wait in the listeners' backlog while the daemon upgrades
// in place; the new image wakes them one after the other, putting the
// first back to sleep for the second, never both at once (it woke both
// before its first GPU reading: the second exits out of memory).
func TestUpgradeWithABacklogOfWakes(t *testing.T) {
	s, gw := swapSite(t)
	in := newInstalled(t)
	d := in.start(s)
	bothAsleep(t, s, d, gw)
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	in.install(t, "v2")
	upgraded := make(chan error, 1)
	go func() {
		_, err := c.Upgrade(ctx)
		upgraded <- err
	}()
	// The listeners are paused once the old image says it executes the
	// new one: requests sent now wait in the kernel's backlog for it.
	d.waitFor(t, 30*time.Second, "the old image executing the new one", func() bool {
		return strings.Contains(d.logText(), "upgrade in place: executing the new image")
	})
	answers := chatBoth(t, gw)
	if err := <-upgraded; err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	for range 2 {
		select {
		case a := <-answers:
			if !strings.HasSuffix(a, ": 200") {
				t.Errorf("after the upgrade: %s", a)
			}
		case <-time.After(90 * time.Second):
			t.Fatal("a request after the upgrade got no answer")
		}
	}
}

// TestCrashRestartWithABacklogOfWakes: the same after a daemon's SIGKILL:
// the successor adopts both sleepers and requests for both arrive as soon
// as its gateway listens.
func TestCrashRestartWithABacklogOfWakes(t *testing.T) {
	s, gw := swapSite(t)
	sd := newFakeSystemd(t)
	first := sd.start(s, os.Args[0])
	before := bothAsleep(t, s, first, gw)
	first.cmd.Process.Kill() //nolint:errcheck // checked by wait
	first.wait(t)
	d := sd.start(s, os.Args[0])
	supervisortest.WaitGateway(t, d, gw)
	answers := chatBoth(t, gw)
	for range 2 {
		select {
		case a := <-answers:
			if !strings.HasSuffix(a, ": 200") {
				t.Errorf("after the restart: %s", a)
			}
		case <-time.After(90 * time.Second):
			t.Fatal("a request after the restart got no answer")
		}
	}
	after := statusOf(t, s.Socket)
	for _, m := range []string{"a", "b"} {
		if after[m].PID != before[m].PID {
			t.Errorf("%s: pid %d, was %d: adopted models should wake on their processes", m, after[m].PID, before[m].PID)
		}
	}
}

// TestCrashDuringSleepAdoptsAsleep: the daemon dies while a model's engine
// is going to sleep (its /sleep takes 4 s; /is_sleeping says false until
// it is done). The successor takes it for asleep, as its record says, and
// a request wakes it; no request reaches the engine mid-sleep (it was
// taken for ready and sent one: the engine's 500).
func TestCrashDuringSleepAdoptsAsleep(t *testing.T) {
	s, gw := swapSite(t, "--fake-sleep-time", "4s")
	sd := newFakeSystemd(t)
	first := sd.start(s, os.Args[0])
	supervisortest.WaitGateway(t, first, gw)
	if code, body := chat(t, gw, "a"); code != 200 {
		t.Fatalf("a: %d %s", code, body)
	}
	before := statusOf(t, s.Socket)["a"]
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Op(ctx, api.OpSleep, "a"); err != nil {
		t.Fatal(err)
	}
	first.waitFor(t, 10*time.Second, "a's engine told to sleep", func() bool {
		for _, e := range s.ReadEvents(t) {
			if e.Model == "a" && e.Ev == "sleep_begin" {
				return true
			}
		}
		return false
	})
	if err := first.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	first.wait(t)
	second := sd.start(s, os.Args[0])
	supervisortest.WaitGateway(t, second, gw)
	var st api.Status
	second.waitFor(t, 10*time.Second, "a adopted", func() bool {
		st = statusOf(t, s.Socket)["a"]
		return st.PID != 0
	})
	if st.State != api.Sleeping || st.PID != before.PID {
		t.Errorf("a adopted as %s (%s) pid %d; want asleep on pid %d", st.State, st.Reason, st.PID, before.PID)
	}
	if code, body := chat(t, gw, "a"); code != 200 {
		t.Errorf("a after the adoption: %d %s", code, body)
	}
	if st := statusOf(t, s.Socket)["a"]; st.State != api.Ready || st.PID != before.PID {
		t.Errorf("a after the request: %s pid %d; want ready on pid %d", st.State, st.PID, before.PID)
	}
}

// TestUpgradeAfterCrashAdoption: a model adopted after a daemon's SIGKILL
// is not the daemon's child (it was re-parented); an upgrade in place
// hands it to the new image as such, which watches it through a pidfd. (It
// was handed over as a child: waiting for it failed at once, ECHILD, the
// new image took it for exited and restarted it, cutting its requests.)
func TestUpgradeAfterCrashAdoption(t *testing.T) {
	s, gw := swapSite(t)
	sd := newFakeSystemd(t)
	in := newInstalled(t)
	first := sd.start(s, in.exe)
	supervisortest.WaitGateway(t, first, gw)
	if code, body := chat(t, gw, "a"); code != 200 {
		t.Fatalf("a: %d %s", code, body)
	}
	before := statusOf(t, s.Socket)["a"]
	first.cmd.Process.Kill() //nolint:errcheck // checked by wait
	first.wait(t)
	second := sd.start(s, in.exe)
	second.waitFor(t, 30*time.Second, "a adopted, ready", func() bool {
		st := statusOf(t, s.Socket)["a"]
		return st.State == api.Ready && st.PID == before.PID
	})
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	in.install(t, "v2")
	if _, err := c.Upgrade(ctx); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	second.waitFor(t, 30*time.Second, "v2 answering", func() bool {
		dv, err := c.Daemon(ctx)
		return err == nil && dv.Version == "v2"
	})
	// Two probe periods: a model taken for exited is restarted by then.
	deadline := time.Now().Add(time.Second)
	second.waitFor(t, 5*time.Second, "a second after the upgrade", func() bool { return time.Now().After(deadline) })
	if st := statusOf(t, s.Socket)["a"]; st.State != api.Ready || st.PID != before.PID || st.Restarts != 0 {
		t.Fatalf("a after the upgrade: %s pid %d restarts %d (%s); want ready on pid %d, no restart", st.State, st.PID, st.Restarts, st.LastExit, before.PID)
	}
	if code, body := chat(t, gw, "a"); code != 200 {
		t.Errorf("a after the upgrade: %d %s", code, body)
	}
	// Its end is still seen, through its pidfd.
	if err := syscall.Kill(before.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	second.waitFor(t, 30*time.Second, "a's exit seen", func() bool {
		st := statusOf(t, s.Socket)["a"]
		return st.RestartsByReason["exit"] == 1
	})
}
