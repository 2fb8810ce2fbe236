//go:build !e2e

package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
)

// Live restore (docs/operations.md): an upgrade in place and a daemon's death cost no
// model restart.

// TestSIGKILLThenRestartAdopts: after a daemon's SIGKILL, the next daemon
// adopts the models still running as configured (same PIDs, ready again
// within a probe period, never a second copy), with their output reaching
// it through the pipes systemd kept; a model whose configuration changed
// meanwhile is restarted, deliberately; a stop then leaves nothing.
func TestSIGKILLThenRestartAdopts(t *testing.T) {
	sd := newFakeSystemd(t)
	s := newSite(t,
		testModel{Name: "a", Fake: append([]string{"--fake-log-every", "50ms"}, stubborn...)},
		testModel{Name: "b", Fake: []string{"--fake-detached-workers", "1"}},
		testModel{Name: "c", YAML: `env: {V: "1"}`},
	)
	first := sd.start(s, os.Args[0])
	first.waitFor(t, 30*time.Second, "models healthy", s.healthy)
	first.waitFor(t, 10*time.Second, "all workers recorded", func() bool {
		return len(live(s.procs("a"), "")) == 3 && len(live(s.procs("b"), "")) == 2
	})
	first.waitFor(t, 10*time.Second, "every model's pipes in the descriptor store", func() bool { return len(sd.stored()) == 6 })
	before := statusOf(t, s.Socket)
	old := s.allProcs("a", "b", "c")

	first.cmd.Process.Kill() //nolint:errcheck // checked by wait
	first.wait(t)
	if err := os.WriteFile(s.Path, []byte(s.Edit(t, supervisortest.Set("models.c.env.V", "2"))), 0o644); err != nil {
		t.Fatal(err)
	}
	killedAt := time.Now()
	second := sd.start(s, os.Args[0])
	second.waitFor(t, 30*time.Second, "a and b adopted (same pid, ready), c restarted on a new pid", func() bool {
		now := statusOf(t, s.Socket)
		for _, m := range []string{"a", "b"} {
			if now[m].State != api.Ready || now[m].PID != before[m].PID {
				return false
			}
		}
		return now["c"].State == api.Ready && now["c"].PID != before["c"].PID
	})
	t.Logf("ready again %s after the restart began", time.Since(killedAt).Round(time.Millisecond))
	for _, m := range []string{"a", "b"} {
		if n := len(live(s.procs(m), "server")); n != 1 {
			t.Errorf("%s: %d servers", m, n)
		}
	}
	if n := len(live(s.procs("a"), "worker")); n != 2 {
		t.Errorf("a: %d live workers, want its 2 (adopted with it)", n)
	}
	for pid, role := range old {
		if role == "server" && !supervisortest.Running(pid) && pid != before["c"].PID {
			t.Errorf("server %d of a or b died", pid)
		}
	}
	if got := statusOf(t, s.Socket)["c"].RestartsByReason["reload"]; got != 1 {
		t.Errorf("c: restarts{reload} = %d, want 1 (its configuration changed while the daemon was away)", got)
	}
	// a writes a line every 50 ms into the pipe systemd kept: the new
	// daemon reads it.
	c := client.New(s.Socket)
	defer c.Close()
	second.waitFor(t, 10*time.Second, "a's output after the restart", func() bool {
		lines, err := c.Status(context.Background())
		if err != nil || len(lines) == 0 {
			return false
		}
		var got []string
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = c.Logs(ctx, "a", 5, false, func(l string) { got = append(got, l) })
		return len(got) > 0
	})
	if !strings.Contains(second.logText(), "adopting a model left running by a previous supervisor") {
		t.Errorf("the second daemon does not say it adopted:\n%s", second.logText())
	}
	if sd.sent("FDSTOREREMOVE=1") < 2 {
		t.Errorf("c's old pipes were not removed from the store")
	}

	second.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // checked by wait
	if code := second.wait(t); code != 0 {
		t.Errorf("second daemon exit code %d", code)
	}
	s.noneLive(t, "a", "b", "c")
	if st := sd.stored(); len(st) != 0 {
		t.Errorf("descriptors left in the store after a stop: %v", st)
	}
}

// TestUpgradeInPlace: `citadelctl upgrade` with a rebuilt binary keeps the
// daemon's PID and every model's (awake, asleep, held stopped), restarts
// nothing, lets a stream through the gateway finish, answers status
// throughout, and the new image serves the gateway and captures output.
func TestUpgradeInPlace(t *testing.T) {
	gwPort, httpPort := supervisortest.FreePort(t), supervisortest.FreePort(t)
	top := fmt.Sprintf("listen: 127.0.0.1:%d\nlog: {level: debug}\ngpu: {backend: none}\ngateway: {listen: 127.0.0.1:%d, max_wait: 1m}\n", httpPort, gwPort)
	od := "activation: on_demand\nsleep_level: 1\nidle_after: 1h\nmin_awake: 0s"
	s := &site{Site: supervisortest.NewSite(t, top,
		testModel{Name: "a", Fake: []string{"--fake-log-every", "50ms", "--fake-token-delay", "50ms"}},
		testModel{Name: "b", YAML: od},
		testModel{Name: "held"},
	), t: t}
	// The daemon runs from a copy, which the test replaces as a package
	// upgrade does (a new file renamed over the old), with a new version.
	in := newInstalled(t)
	sd := newFakeSystemd(t)
	d := sd.start(s, in.exe)
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	supervisortest.WaitGateway(t, d, gw)
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if code, body := chat(t, gw, "b"); code != 200 {
		t.Fatalf("b: %d %s", code, body)
	}
	for op, m := range map[api.Op]string{api.OpSleep: "b", api.OpStop: "held"} {
		if _, err := c.Op(ctx, op, m); err != nil {
			t.Fatal(err)
		}
	}
	// b's state is sleeping from the moment its sleep begins; its reason
	// says when the engine is asleep.
	d.waitFor(t, 30*time.Second, "a ready, b asleep, held stopped", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["b"].State == api.Sleeping && strings.HasPrefix(st["b"].Reason, "asleep") && st["held"].State == api.Stopped
	})
	before := statusOf(t, s.Socket)
	dv, err := c.Daemon(ctx)
	if err != nil || dv.Version != "v1" || dv.PID != d.cmd.Process.Pid {
		t.Fatalf("daemon before: %+v, %v", dv, err)
	}

	// citadelctl status answers throughout.
	var polls, failures atomic.Int64
	stopPoll := make(chan struct{})
	polled := make(chan struct{})
	go func() {
		defer close(polled)
		pc := client.New(s.Socket)
		defer pc.Close()
		for {
			select {
			case <-stopPoll:
				return
			case <-time.After(20 * time.Millisecond):
			}
			pctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if _, err := pc.Status(pctx); err != nil {
				failures.Add(1)
				t.Logf("status during the upgrade: %v", err)
			}
			cancel()
			polls.Add(1)
		}
	}()
	// A 40-token stream through the gateway (2 s), in flight at the upgrade.
	stream := startStream(t, gw, "a")

	in.install(t, "v2")
	res, err := c.Upgrade(ctx)
	if err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	if res.From != "v1" || res.To != "v2" || res.Models != 3 || res.Running != 2 {
		t.Errorf("upgrade answer %+v", res)
	}
	if streamed := <-stream; !wholeStream(streamed) {
		t.Errorf("the stream through the gateway was cut by the upgrade: %d events\n%s", strings.Count(streamed, "data: "), streamed)
	}
	d.waitFor(t, 30*time.Second, "the new image answering", func() bool {
		dv, err := c.Daemon(ctx)
		return err == nil && dv.Version == "v2" && dv.Upgrades == 1
	})
	close(stopPoll)
	<-polled
	if dv, _ := c.Daemon(ctx); dv.PID != d.cmd.Process.Pid {
		t.Errorf("pid %d after the upgrade, %d before", dv.PID, d.cmd.Process.Pid)
	}
	if failures.Load() != 0 || polls.Load() == 0 {
		t.Errorf("status failed %d of %d times during the upgrade", failures.Load(), polls.Load())
	}
	after := statusOf(t, s.Socket)
	for _, m := range []string{"a", "b", "held"} {
		b, a := before[m], after[m]
		if a.PID != b.PID || a.State != b.State || a.Restarts != b.Restarts || a.Reason != b.Reason {
			t.Errorf("%s: before %s pid %d restarts %d %q; after %s pid %d restarts %d %q",
				m, b.State, b.PID, b.Restarts, b.Reason, a.State, a.PID, a.Restarts, a.Reason)
		}
	}
	if d.cmd.ProcessState != nil {
		t.Fatalf("the daemon exited: %v", d.cmd.ProcessState)
	}
	// The new image serves: a request wakes b on its process.
	if code, body := chat(t, gw, "b"); code != 200 {
		t.Fatalf("b after the upgrade: %d %s", code, body)
	}
	if st := statusOf(t, s.Socket)["b"]; st.State != api.Ready || st.PID != before["b"].PID {
		t.Errorf("b after its wake: %s pid %d, want ready pid %d", st.State, st.PID, before["b"].PID)
	}
	// a's output reaches the new image through the pipe it inherited.
	var lines []string
	_ = c.Logs(ctx, "a", 1000, false, func(l string) { lines = append(lines, l) })
	n := len(lines)
	d.waitFor(t, 10*time.Second, "a's output captured by the new image", func() bool {
		var now []string
		_ = c.Logs(ctx, "a", 1000, false, func(l string) { now = append(now, l) })
		return len(now) > n || (len(now) == n && len(now) > 0 && now[len(now)-1] != lines[len(lines)-1])
	})
	if !strings.Contains(d.logText(), `"upgraded in place"`) {
		t.Errorf("the new image does not say it was upgraded:\n%s", d.logText())
	}
	// systemd is told RELOADING=1 before the exec and READY=1 by the new
	// image, from the same main process.
	if r, ready := sd.sent("RELOADING=1"), sd.sent("READY=1"); r != 1 || ready != 2 {
		t.Errorf("notify: RELOADING=1 %d times, READY=1 %d times; want 1 and 2", r, ready)
	}
	d.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // checked by wait
	if code := d.wait(t); code != 0 {
		t.Errorf("exit code %d after SIGTERM", code)
	}
	s.noneLive(t, "a", "b", "held")
}

// TestUpgradeRefusesABadBinary: a binary that cannot take over is never
// executed; the daemon keeps running, serving, its models untouched, and
// says why.
func TestUpgradeRefusesABadBinary(t *testing.T) {
	s := newSite(t, testModel{Name: "a"})
	exe := filepath.Join(t.TempDir(), "citadel-supervisor")
	b, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(exe, b, 0o755); err != nil {
		t.Fatal(err)
	}
	d := s.startCmd(func(cmd *exec.Cmd) { cmd.Path, cmd.Args[0] = exe, exe })
	d.waitFor(t, 30*time.Second, "a ready", func() bool { return statusOf(t, s.Socket)["a"].State == api.Ready })
	before := statusOf(t, s.Socket)["a"]
	c := client.New(s.Socket)
	defer c.Close()
	failures := 0
	for name, content := range map[string]string{
		"a truncated binary": "\x7fELF",
		"an older daemon":    "#!/bin/sh\necho 'flag provided but not defined: -handover-version' >&2\nexit 2\n",
		"another handover":   "#!/bin/sh\necho '99 v9'\n",
	} {
		if err := os.WriteFile(exe+".new", []byte(content), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(exe+".new", exe); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := c.Upgrade(ctx)
		cancel()
		if err == nil || !strings.Contains(err.Error(), "upgrade refused") || !strings.Contains(err.Error(), "keeps running") {
			t.Errorf("%s: upgrade answered %v", name, err)
		}
		failures++
		dv, derr := c.Daemon(context.Background())
		if derr != nil || !strings.Contains(dv.LastUpgradeError, "upgrade refused") || dv.Upgrades != 0 || dv.UpgradeFailures != failures {
			t.Errorf("%s: daemon says %+v, %v; want %d failures", name, dv, derr, failures)
		}
		if st := statusOf(t, s.Socket)["a"]; st.PID != before.PID || st.State != api.Ready {
			t.Errorf("%s: a is %s pid %d, was ready pid %d", name, st.State, st.PID, before.PID)
		}
	}
	if d.cmd.ProcessState != nil {
		t.Fatalf("the daemon exited: %v", d.cmd.ProcessState)
	}
}

// noneLive fails for every process of models still alive.
func (s *site) noneLive(t *testing.T, models ...string) {
	t.Helper()
	for _, m := range models {
		if l := live(s.procs(m), ""); len(l) != 0 {
			t.Errorf("%s: alive after stop: %v", m, l)
		}
	}
}

// TestUpgradeToAWrapperWithASlowCheck: the new binary is a packager's
// wrapper script whose --check takes 5 s (a big configuration, a slow
// disk). The preflight is the daemon's own child, started through its
// reaper: the reaper neither takes its exit status nor kills it as a stray
// (it did, after strayGrace: "upgrade refused: … --check …: signal:
// killed"). The upgrade goes through with the same PIDs.
func TestUpgradeToAWrapperWithASlowCheck(t *testing.T) {
	s := newSite(t, testModel{Name: "a"})
	dir := t.TempDir()
	exe, real := filepath.Join(dir, "citadel-supervisor"), filepath.Join(dir, "citadel-supervisor.real")
	b, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{exe, real} {
		if err := os.WriteFile(p, b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(real+".version", []byte("v2"), 0o644); err != nil {
		t.Fatal(err)
	}
	d := s.startCmd(func(cmd *exec.Cmd) { cmd.Path, cmd.Args[0] = exe, exe })
	d.waitFor(t, 30*time.Second, "a ready", func() bool { return statusOf(t, s.Socket)["a"].State == api.Ready })
	before := statusOf(t, s.Socket)["a"]

	// On --check it also leaves two short-lived orphans, as a wrapper's
	// helpers may: their exits make the daemon's reaper look at its
	// children at 1 s and 3.5 s, so a preflight it takes for a stray is
	// killed for sure.
	wrapper := "#!/bin/sh\nfor a; do [ \"$a\" = --check ] && { (sleep 1 &); (sleep 3.5 &); sleep 5; }; done\nexec " + real + " \"$@\"\n"
	if err := os.WriteFile(exe+".new", []byte(wrapper), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(exe+".new", exe); err != nil {
		t.Fatal(err)
	}
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := c.Upgrade(ctx); err != nil {
		t.Fatalf("upgrade to a wrapper whose --check takes 5 s: %v", err)
	}
	d.waitFor(t, 30*time.Second, "the daemon at v2", func() bool {
		dv, err := c.Daemon(ctx)
		return err == nil && dv.Version == "v2"
	})
	dv, err := c.Daemon(ctx)
	if err != nil || dv.PID != d.cmd.Process.Pid || dv.UpgradeFailures != 0 {
		t.Fatalf("daemon after the upgrade: %+v, %v; want pid %d, no failure", dv, err, d.cmd.Process.Pid)
	}
	if st := statusOf(t, s.Socket)["a"]; st.PID != before.PID || st.State != api.Ready {
		t.Errorf("a is %s pid %d after the upgrade, was ready pid %d", st.State, st.PID, before.PID)
	}
}
