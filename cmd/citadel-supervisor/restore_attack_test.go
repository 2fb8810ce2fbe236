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

// Live restore under stress: upgrades and crashes while things move.

// installedDaemon runs the daemon from a copy of this binary, so a test
// can replace it as a package upgrade does.
type installedDaemon struct {
	exe string
}

func newInstalled(t *testing.T) *installedDaemon {
	t.Helper()
	in := &installedDaemon{exe: filepath.Join(t.TempDir(), "citadel-supervisor")}
	in.install(t, "v1")
	return in
}

// install puts a new file (this binary, saying version v) in place.
func (in *installedDaemon) install(t *testing.T, v string) {
	t.Helper()
	b, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(in.exe+".new", b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(in.exe+".new", in.exe); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(in.exe+".version", []byte(v), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (in *installedDaemon) start(s *site, args ...string) *daemon {
	return s.startCmd(func(cmd *exec.Cmd) {
		cmd.Path, cmd.Args[0] = in.exe, in.exe
		cmd.Args = append(cmd.Args, args...)
	})
}

// withoutLast is s's configuration without its last model, name.
func withoutLast(t *testing.T, s *site, name string) string {
	t.Helper()
	i := strings.Index(s.YAML, "\n  "+name+":\n")
	if i < 0 || name != s.Models[len(s.Models)-1].Name {
		t.Fatalf("%s is not the last model of\n%s", name, s.YAML)
	}
	return s.YAML[:i+1]
}

// TestUpgradeWhileTakeoverStopsARemovedModel: the new image of an upgrade
// stops a model removed from the file meanwhile before it adopts the
// others, which takes that model's stop_timeout. Meanwhile the handed-over
// models are the daemon's children that no runner owns yet: the reaper
// must neither kill them as strays (marker mode: nothing else says whose
// they are) nor reap one that exits then, whose exit status the new image
// is owed. A removed model's stop_timeout is unknown to the new image: it
// is given the longest configured, here a's 6 s, past the reaper's tick.
func TestUpgradeWhileTakeoverStopsARemovedModel(t *testing.T) {
	s := newSite(t,
		testModel{Name: "a", YAML: "stop_timeout: 6s"},
		testModel{Name: "b"},
		testModel{Name: "x", Fake: []string{"--fake-ignore-sigterm"}},
	)
	in := newInstalled(t)
	d := in.start(s, "--ownership", "marker")
	waitFor(t, 30*time.Second, "a, b and x ready", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["b"].State == api.Ready && st["x"].State == api.Ready
	})
	before := statusOf(t, s.Socket)
	if err := os.WriteFile(s.Path, []byte(withoutLast(t, s, "x")), 0o644); err != nil {
		t.Fatal(err)
	}
	in.install(t, "v2")
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := c.Upgrade(ctx); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	// The new image is stopping x (6 s, it ignores SIGTERM): b's server
	// crashes now.
	waitFor(t, 20*time.Second, "the new image stopping x", func() bool {
		return strings.Contains(d.logText(), `left by a previous supervisor","model":"x"`)
	})
	if err := syscall.Kill(before["b"].PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the new image answering, x gone, b back", func() bool {
		dv, err := c.Daemon(ctx)
		if err != nil || dv.Version != "v2" {
			return false
		}
		st := statusOf(t, s.Socket)
		_, hasX := st["x"]
		return !hasX && st["b"].State == api.Ready && st["b"].PID != before["b"].PID && st["a"].State == api.Ready
	})
	if l := live(s.procs("x"), ""); len(l) != 0 {
		t.Errorf("x (removed) still runs: %v", l)
	}
	after := statusOf(t, s.Socket)
	if a := after["a"]; a.PID != before["a"].PID || a.Restarts != before["a"].Restarts {
		t.Errorf("a: pid %d restarts %d after the upgrade, pid %d restarts %d before (killed as a stray while the new image took over?)",
			a.PID, a.Restarts, before["a"].PID, before["a"].Restarts)
	}
	if b := after["b"]; b.LastExit != "killed by SIGKILL" || b.RestartsByReason["exit"] != 1 {
		t.Errorf("b: last exit %q, restarts %v; want its exit known (killed by SIGKILL) and one restart for it", b.LastExit, b.RestartsByReason)
	}
	if d.cmd.ProcessState != nil {
		t.Fatalf("the daemon exited: %v", d.cmd.ProcessState)
	}
}

// TestUpgradeWhileModelsMove: an upgrade while a model loads takes it over
// loading (same process, ready later, no restart); one while a model's
// stop outlasts the freeze bound is refused, and the daemon works on as
// before (status, gateway, reload, the stop completes); once that settles,
// a second upgrade (SIGUSR2 this time) goes through.
func TestUpgradeWhileModelsMove(t *testing.T) {
	gwPort := supervisortest.FreePort(t)
	top := fmt.Sprintf("log: {level: debug}\ngpu: {backend: none}\ngateway: {listen: 127.0.0.1:%d, max_wait: 1m}\n", gwPort)
	s := &site{Site: supervisortest.NewSite(t, top,
		testModel{Name: "a"},
		testModel{Name: "slow", Fake: []string{"--fake-load-time", "6s"}},
		testModel{Name: "st", Fake: []string{"--fake-ignore-sigterm"}, YAML: "stop_timeout: 1m"},
	), t: t}
	in := newInstalled(t)
	d := in.start(s)
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	supervisortest.WaitGateway(t, gw)
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	waitFor(t, 30*time.Second, "a and st ready, slow loading", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["st"].State == api.Ready && st["slow"].State == api.Starting && st["slow"].PID != 0
	})
	before := statusOf(t, s.Socket)

	// 1. slow is loading: taken over as it is.
	in.install(t, "v2")
	if _, err := c.Upgrade(ctx); err != nil {
		t.Fatalf("upgrade while slow loads: %v", err)
	}
	waitFor(t, 30*time.Second, "v2 answering, slow ready on its process", func() bool {
		dv, err := c.Daemon(ctx)
		st := statusOf(t, s.Socket)
		return err == nil && dv.Version == "v2" && st["slow"].State == api.Ready
	})
	after := statusOf(t, s.Socket)
	for _, m := range []string{"a", "slow", "st"} {
		if after[m].PID != before[m].PID || after[m].Restarts != 0 {
			t.Errorf("%s: pid %d restarts %d after the upgrade; pid %d before", m, after[m].PID, after[m].Restarts, before[m].PID)
		}
	}

	// 2. st's stop outlasts the freeze bound: refused, nothing changed.
	stopped := make(chan error, 1)
	go func() {
		_, err := c.Op(ctx, api.OpStop, "st")
		stopped <- err
	}()
	waitFor(t, 10*time.Second, "st stopping", func() bool { return statusOf(t, s.Socket)["st"].State == api.Stopping })
	t0 := time.Now()
	in.install(t, "v3")
	// Status answers while the upgrade waits for st, and the gateway
	// serves.
	var slowest atomic.Int64
	polling, polled := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(polled)
		pc := client.New(s.Socket)
		defer pc.Close()
		for {
			select {
			case <-polling:
				return
			case <-time.After(100 * time.Millisecond):
			}
			t0 := time.Now()
			pctx, pcancel := context.WithTimeout(ctx, 30*time.Second)
			_, _ = pc.Status(pctx)
			pcancel()
			if took := int64(time.Since(t0)); took > slowest.Load() {
				slowest.Store(took)
			}
		}
	}()
	_, err := c.Upgrade(ctx)
	close(polling)
	<-polled
	if took := time.Duration(slowest.Load()); took > 3*time.Second {
		t.Errorf("status took %s to answer while the upgrade waited for st to settle", took.Round(time.Millisecond))
	}
	if err == nil || !strings.Contains(err.Error(), "st is stopping") {
		t.Fatalf("upgrade while st stops: %v, want refused naming st", err)
	}
	sctx, scancel := context.WithTimeout(ctx, 2*time.Second)
	_, err = c.Status(sctx)
	scancel()
	if err != nil {
		t.Errorf("status right after the refused upgrade: %v", err)
	}
	if code, body := chat(t, gw, "a"); code != 200 {
		t.Errorf("gateway after the refused upgrade: %d %s", code, body)
	}
	if _, err := c.Reload(ctx); err != nil {
		t.Errorf("reload after the refused upgrade: %v", err)
	}
	if dv, err := c.Daemon(ctx); err != nil || dv.Version != "v2" || dv.Upgrades != 1 || !strings.Contains(dv.LastUpgradeError, "st is stopping") {
		t.Errorf("daemon after the refused upgrade: %+v, %v", dv, err)
	}
	t.Logf("refused after %s", time.Since(t0).Round(time.Millisecond))
	// The stop goes on: st's processes die at the test's hand.
	killStop(t, s, stopped)

	// 3. Settled: SIGUSR2 upgrades.
	if err := d.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "v3 answering after SIGUSR2", func() bool {
		dv, err := c.Daemon(ctx)
		return err == nil && dv.Version == "v3" && dv.Upgrades == 2 && dv.PID == d.cmd.Process.Pid
	})
	final := statusOf(t, s.Socket)
	for _, m := range []string{"a", "slow"} {
		if final[m].PID != before[m].PID || final[m].Restarts != 0 || final[m].State != api.Ready {
			t.Errorf("%s: %s pid %d restarts %d after two upgrades; pid %d before", m, final[m].State, final[m].PID, final[m].Restarts, before[m].PID)
		}
	}
	if st := final["st"]; st.State != api.Stopped || !st.Held {
		t.Errorf("st after the upgrade: %s held %v, want stopped and held", st.State, st.Held)
	}
	if code, body := chat(t, gw, "slow"); code != 200 {
		t.Errorf("gateway after two upgrades: %d %s", code, body)
	}
	if _, err := c.Op(ctx, api.OpStart, "st"); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "st started again by the new image", func() bool { return statusOf(t, s.Socket)["st"].State == api.Ready })
	go func() {
		_, err := c.Op(ctx, api.OpStop, "st")
		stopped <- err
	}()
	waitFor(t, 10*time.Second, "st stopping", func() bool { return statusOf(t, s.Socket)["st"].State == api.Stopping })
	killStop(t, s, stopped)
}

// killStop ends the stop of st, a model that ignores SIGTERM under a long
// stop_timeout, by SIGKILLing its processes, and waits for the stop's
// answer.
func killStop(t *testing.T, s *site, stopped <-chan error) {
	t.Helper()
	for _, pid := range live(s.procs("st"), "") {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	select {
	case err := <-stopped:
		if err != nil {
			t.Errorf("stop st: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("st's stop never completed")
	}
	waitFor(t, 10*time.Second, "st stopped", func() bool { return statusOf(t, s.Socket)["st"].State == api.Stopped })
}
