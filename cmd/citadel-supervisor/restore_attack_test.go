//go:build e2e

package main

import (
	"citadel-supervisor/supervisor"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
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

// without is s's configuration without the model name.
func without(t *testing.T, s *site, name string) string {
	t.Helper()
	return s.Edit(t, supervisortest.Delete("models."+name))
}

// TestUpgradeWhileTakeoverStopsARemovedModel: the new image of an upgrade
// stops a model removed from the file meanwhile before it adopts the
// others, which takes that model's stop_timeout. Meanwhile the handed-over
// models (and a's worker, orphaned and re-parented to the daemon) are the
// daemon's children that no runner owns yet: the reaper must neither kill
// them as strays (marker mode: nothing else says whose they are) nor reap one that exits then, whose exit status the new image
// is owed; and a SIGUSR2 then is no upgrade and no death. A removed
// model's stop_timeout is unknown to the new image: it
// is given the longest configured, here a's 6 s, past the reaper's tick.
func TestUpgradeWhileTakeoverStopsARemovedModel(t *testing.T) {
	s := newSite(t,
		testModel{Name: "a", YAML: "stop_timeout: 6s", Fake: []string{"--fake-orphan-workers", "1"}},
		testModel{Name: "b"},
		testModel{Name: "x", Fake: []string{"--fake-ignore-sigterm"}},
	)
	in := newInstalled(t)
	d := in.start(s, "--ownership", "marker")
	d.waitFor(t, 30*time.Second, "a, b and x ready, a's worker up", func() bool {
		st := statusOf(t, s.Socket)
		// The orphan's parent records itself as a worker too, and exits
		// once the orphan runs: both recorded, one alive.
		workers := 0
		for _, role := range s.procs("a") {
			if role == "worker" {
				workers++
			}
		}
		return st["a"].State == api.Ready && st["b"].State == api.Ready && st["x"].State == api.Ready &&
			workers == 2 && len(live(s.procs("a"), "worker")) == 1
	})
	before := statusOf(t, s.Socket)
	worker := live(s.procs("a"), "worker")[0]
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	// b's server crashes while the new image stops x (6 s).
	upgradeRemovingX(ctx, t, s, in, d, c, before["b"].PID)
	// A second SIGUSR2 (an impatient operator) while the new image takes
	// over: no upgrade can start yet, and it must not kill the daemon.
	if err := d.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	d.waitFor(t, 30*time.Second, "the new image answering, x gone, b back", func() bool {
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
	if dv, err := c.Daemon(ctx); err != nil || dv.Upgrades != 1 {
		t.Errorf("daemon after the upgrade: %+v, %v; want 1 upgrade", dv, err)
	}
	if !supervisortest.Running(worker) {
		t.Errorf("a's worker %d was killed during the takeover", worker)
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
	top := fmt.Sprintf("listen: \"\"\nlog: {level: debug}\ngpu: {backend: none}\ngateway: {listen: 127.0.0.1:%d, max_wait: 1m}\n", gwPort)
	s := &site{Site: supervisortest.NewSite(t, top,
		testModel{Name: "a"},
		testModel{Name: "slow", Fake: []string{"--fake-load-time", "6s"}},
		testModel{Name: "st", Fake: []string{"--fake-ignore-sigterm"}, YAML: "stop_timeout: 1m"},
	), t: t}
	in := newInstalled(t)
	d := in.start(s)
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	supervisortest.WaitGateway(t, d, gw)
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	d.waitFor(t, 30*time.Second, "a and st ready, slow loading", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["st"].State == api.Ready && st["slow"].State == api.Starting && st["slow"].PID != 0
	})
	before := statusOf(t, s.Socket)

	// 1. slow is loading: taken over as it is.
	in.install(t, "v2")
	if _, err := c.Upgrade(ctx); err != nil {
		t.Fatalf("upgrade while slow loads: %v", err)
	}
	d.waitFor(t, 30*time.Second, "v2 answering, slow ready on its process", func() bool {
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
	d.waitFor(t, 10*time.Second, "st stopping", func() bool { return statusOf(t, s.Socket)["st"].State == api.Stopping })
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
	killStop(t, s, d, stopped)

	// 3. Settled: SIGUSR2 upgrades.
	if err := d.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	d.waitFor(t, 30*time.Second, "v3 answering after SIGUSR2", func() bool {
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
	if _, err := c.Reload(ctx); err != nil {
		t.Errorf("reload after two upgrades: %v", err)
	}
	if _, err := c.Op(ctx, api.OpStart, "st"); err != nil {
		t.Fatal(err)
	}
	d.waitFor(t, 30*time.Second, "st started again by the new image", func() bool { return statusOf(t, s.Socket)["st"].State == api.Ready })
	go func() {
		_, err := c.Op(ctx, api.OpStop, "st")
		stopped <- err
	}()
	d.waitFor(t, 10*time.Second, "st stopping", func() bool { return statusOf(t, s.Socket)["st"].State == api.Stopping })
	killStop(t, s, d, stopped)
}

// killStop ends the stop of st, a model that ignores SIGTERM under a long
// stop_timeout, by SIGKILLing its processes, and waits for the stop's
// answer.
func killStop(t *testing.T, s *site, d *daemon, stopped <-chan error) {
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
	d.waitFor(t, 10*time.Second, "st stopped", func() bool { return statusOf(t, s.Socket)["st"].State == api.Stopped })
}

// TestCrashAdoptionCornerCases: after a daemon's SIGKILL the next one
// adopts a model still loading (ready later, on its process), stops a model disabled meanwhile (and holds it) and one removed, adopts
// a sleeping on-demand model asleep (a request through the gateway wakes
// it on its process), takes the engine's word where the record is a step
// behind (the daemon died while a model went to sleep), and restarts an adopted model that later dies, its
// exit status unknown. systemd's descriptor store then holds exactly the
// running instances' two pipes. --stop-leftovers refuses while a daemon
// runs, leaves everything after a crash (SERVICE_RESULT=signal) and stops
// everything after a stop that timed out, leaving no record behind.
func TestCrashAdoptionCornerCases(t *testing.T) {
	for _, mode := range []string{"auto", "marker"} { // auto: cgroup where usable
		t.Run(mode, func(t *testing.T) { crashAdoptionCornerCases(t, mode) })
	}
}

func crashAdoptionCornerCases(t *testing.T, mode string) {
	sd := newFakeSystemd(t)
	gwPort := supervisortest.FreePort(t)
	top := fmt.Sprintf("listen: \"\"\nlog: {level: debug}\ngpu: {backend: none}\ngateway: {listen: 127.0.0.1:%d, max_wait: 1m}\n", gwPort)
	s := &site{Site: supervisortest.NewSite(t, top,
		testModel{Name: "a"},
		testModel{Name: "k"},
		testModel{Name: "od", YAML: "activation: on_demand\nsleep_level: 1\nidle_after: 1h\nmin_awake: 0s"},
		testModel{Name: "od2", YAML: "activation: on_demand\nsleep_level: 1\nidle_after: 1h\nmin_awake: 0s"},
		testModel{Name: "slow", Fake: []string{"--fake-load-time", "4s"}},
		testModel{Name: "r", Fake: []string{"--fake-workers", "1"}},
	), t: t}
	first := sd.start(s, os.Args[0], "--ownership", mode)
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	supervisortest.WaitGateway(t, first, gw)
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for _, m := range []string{"od", "od2"} {
		if code, body := chat(t, gw, m); code != 200 {
			t.Fatalf("%s: %d %s", m, code, body)
		}
	}
	if _, err := c.Op(ctx, api.OpSleep, "od"); err != nil {
		t.Fatal(err)
	}
	first.waitFor(t, 30*time.Second, "a, k, r, od2 ready, od asleep, slow loading, all pipes stored", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["k"].State == api.Ready && st["r"].State == api.Ready && st["od2"].State == api.Ready &&
			st["od"].State == api.Sleeping && strings.HasPrefix(st["od"].Reason, "asleep") && st["slow"].State == api.Starting &&
			len(sd.stored()) == 12
	})
	before := statusOf(t, s.Socket)
	odPort, od2Port := s.Models[2].Port, s.Models[3].Port
	// od2 goes to sleep as the daemon dies: its record still says awake.
	resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/sleep?level=1", od2Port), "application/json", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("od2's engine /sleep: %d", resp.StatusCode)
	}

	first.cmd.Process.Kill() //nolint:errcheck // checked by wait
	first.wait(t)
	cfg := s.Edit(t, supervisortest.Delete("models.r"), supervisortest.Set("models.a.enabled", false))
	if err := os.WriteFile(s.Path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	second := sd.start(s, os.Args[0], "--ownership", mode)
	second.waitFor(t, 30*time.Second, "k and slow adopted ready, od and od2 adopted asleep, a held stopped", func() bool {
		st := statusOf(t, s.Socket)
		return st["k"].State == api.Ready && st["od"].State == api.Sleeping && st["od2"].State == api.Sleeping &&
			st["a"].State == api.Stopped && st["a"].Held && st["slow"].State == api.Ready
	})
	after := statusOf(t, s.Socket)
	for _, m := range []string{"k", "od", "od2", "slow"} {
		if after[m].PID != before[m].PID || after[m].Restarts != 0 {
			t.Errorf("%s: pid %d restarts %d, was pid %d", m, after[m].PID, after[m].Restarts, before[m].PID)
		}
	}
	if _, ok := after["r"]; ok {
		t.Errorf("r (removed) has a status: %+v", after["r"])
	}
	for _, m := range []string{"a", "r"} {
		if l := live(s.procs(m), ""); len(l) != 0 {
			t.Errorf("%s: still running after the restart: %v", m, l)
		}
	}
	// The gateway wakes od and od2 on their processes rather than sending
	// to a sleeping engine.
	for m, port := range map[string]int{"od": odPort, "od2": od2Port} {
		if code, body := chat(t, gw, m); code != 200 {
			t.Errorf("%s through the gateway after adoption: %d %s", m, code, body)
		}
		if st := supervisortest.FakeStats(t, port); st["refused_asleep"] != 0 || st["wakes_l1"] != 1 {
			t.Errorf("%s's engine: %v; want one wake and no request refused asleep", m, st)
		}
		if st := statusOf(t, s.Socket)[m]; st.State != api.Ready || st.PID != before[m].PID {
			t.Errorf("%s after the request: %s pid %d, want ready pid %d", m, st.State, st.PID, before[m].PID)
		}
	}
	// An adopted model that dies is restarted; how it ended is unknown.
	if err := syscall.Kill(before["k"].PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	second.waitFor(t, 30*time.Second, "k restarted", func() bool {
		st := statusOf(t, s.Socket)["k"]
		return st.State == api.Ready && st.PID != before["k"].PID
	})
	if st := statusOf(t, s.Socket)["k"]; st.RestartsByReason["exit"] != 1 || !strings.Contains(st.LastExit, "unknown") {
		t.Errorf("k: restarts %v, last exit %q; want one restart for an exit of unknown status", st.RestartsByReason, st.LastExit)
	}
	// The store: two pipes for each running instance (k's new one, od,
	// od2, slow), nothing of a, r, or k's first instance.
	second.waitFor(t, 10*time.Second, "the descriptor store holds k's, od's, od2's and slow's pipes only", func() bool {
		st := sd.stored()
		if len(st) != 8 {
			return false
		}
		for _, name := range st {
			if !strings.HasPrefix(name, "k@") && !strings.HasPrefix(name, "od@") && !strings.HasPrefix(name, "od2@") && !strings.HasPrefix(name, "slow@") {
				return false
			}
		}
		return true
	})
	recs := filepath.Join(filepath.Dir(s.Socket), "instances")
	if ents, err := os.ReadDir(recs); err != nil || len(ents) != 4 {
		t.Errorf("instance records: %v, %v; want k's, od's, od2's and slow's", ents, err)
	}

	leftovers := func(result string) (int, string) {
		cmd := exec.Command(os.Args[0], "--config", s.Path, "--stop-leftovers")
		cmd.Env = supervisortest.DaemonEnviron(roleEnv+"=1", "SERVICE_RESULT="+result)
		out, _ := cmd.CombinedOutput()
		return cmd.ProcessState.ExitCode(), string(out)
	}
	running := statusOf(t, s.Socket)
	if code, out := leftovers("success"); code == 0 || !strings.Contains(out, "another citadel-supervisor is running") {
		t.Errorf("--stop-leftovers while the daemon runs: exit %d\n%s", code, out)
	}
	second.cmd.Process.Kill() //nolint:errcheck // checked by wait
	second.wait(t)
	if code, out := leftovers("signal"); code != 0 {
		t.Errorf("--stop-leftovers after a crash: exit %d\n%s", code, out)
	}
	for _, m := range []string{"k", "od", "od2", "slow"} {
		if !supervisortest.Running(running[m].PID) {
			t.Errorf("%s: stopped by --stop-leftovers after a crash", m)
		}
	}
	if code, out := leftovers("timeout"); code != 0 {
		t.Errorf("--stop-leftovers after a stop that timed out: exit %d\n%s", code, out)
	}
	for _, m := range []string{"a", "k", "od", "od2", "slow", "r"} {
		if l := live(s.procs(m), ""); len(l) != 0 {
			t.Errorf("%s: still running after --stop-leftovers: %v", m, l)
		}
	}
	if ents, _ := os.ReadDir(recs); len(ents) != 0 {
		t.Errorf("instance records left after --stop-leftovers: %v", ents)
	}
}

// TestUpgradeThenCrashAdopts: a daemon upgraded in place, then killed,
// is succeeded by one that adopts its models: the ones handed over at the
// upgrade and one the new image restarted since, their output still
// captured; the descriptor store holds each running instance's two pipes.
func TestUpgradeThenCrashAdopts(t *testing.T) {
	sd := newFakeSystemd(t)
	s := newSite(t,
		testModel{Name: "a", Fake: []string{"--fake-log-every", "50ms"}},
		testModel{Name: "b"},
	)
	in := newInstalled(t)
	first := sd.start(s, in.exe)
	first.waitFor(t, 30*time.Second, "a and b ready, pipes stored", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["b"].State == api.Ready && len(sd.stored()) == 4
	})
	before := statusOf(t, s.Socket)
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	in.install(t, "v2")
	if _, err := c.Upgrade(ctx); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	first.waitFor(t, 30*time.Second, "v2 answering", func() bool {
		dv, err := c.Daemon(ctx)
		return err == nil && dv.Version == "v2"
	})
	// b dies under the new image, which restarts it.
	if err := syscall.Kill(before["b"].PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	first.waitFor(t, 30*time.Second, "b restarted by v2", func() bool {
		st := statusOf(t, s.Socket)["b"]
		return st.State == api.Ready && st.PID != before["b"].PID
	})
	if st := statusOf(t, s.Socket)["b"]; st.LastExit != "killed by SIGKILL" {
		t.Errorf("b's exit under the new image: %q, want killed by SIGKILL (it is the daemon's child)", st.LastExit)
	}
	first.waitFor(t, 10*time.Second, "the store holds a's and b's new pipes", func() bool { return len(sd.stored()) == 4 })
	mid := statusOf(t, s.Socket)

	first.cmd.Process.Kill() //nolint:errcheck // checked by wait
	first.wait(t)
	second := sd.start(s, in.exe)
	second.waitFor(t, 30*time.Second, "a and b adopted", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["a"].PID == mid["a"].PID && st["b"].State == api.Ready && st["b"].PID == mid["b"].PID
	})
	if !strings.Contains(second.logText(), "adopting a model left running by a previous supervisor") {
		t.Errorf("the successor did not adopt:\n%s", second.logText())
	}
	if strings.Contains(second.logText(), "output pipes are lost") {
		t.Errorf("the successor lost output pipes")
	}
	var was []string
	_ = c.Logs(ctx, "a", 1000, false, func(l string) { was = append(was, l) })
	second.waitFor(t, 10*time.Second, "a's output reaching the successor", func() bool {
		var now []string
		_ = c.Logs(ctx, "a", 1000, false, func(l string) { now = append(now, l) })
		return len(now) > len(was) || (len(now) > 0 && len(was) > 0 && now[len(now)-1] != was[len(was)-1])
	})
	if st := sd.stored(); len(st) != 4 {
		t.Errorf("descriptor store after the adoption: %v, want a's and b's two pipes", st)
	}
}

// TestUpgradeForgetsARemovedModel: a model removed from the file before
// an upgrade is stopped by the new image, and nothing of it outlives it:
// no record, no pipes in systemd's descriptor store.
func TestUpgradeForgetsARemovedModel(t *testing.T) {
	sd := newFakeSystemd(t)
	s := newSite(t, testModel{Name: "a"}, testModel{Name: "x"})
	in := newInstalled(t)
	d := sd.start(s, in.exe)
	d.waitFor(t, 30*time.Second, "a and x ready, pipes stored", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["x"].State == api.Ready && len(sd.stored()) == 4
	})
	before := statusOf(t, s.Socket)
	if err := os.WriteFile(s.Path, []byte(without(t, s, "x")), 0o644); err != nil {
		t.Fatal(err)
	}
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	in.install(t, "v2")
	if _, err := c.Upgrade(ctx); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	d.waitFor(t, 30*time.Second, "v2 answering without x", func() bool {
		dv, err := c.Daemon(ctx)
		_, hasX := statusOf(t, s.Socket)["x"]
		return err == nil && dv.Version == "v2" && !hasX
	})
	if l := live(s.procs("x"), ""); len(l) != 0 {
		t.Errorf("x still runs: %v", l)
	}
	if st := statusOf(t, s.Socket)["a"]; st.PID != before["a"].PID {
		t.Errorf("a: pid %d, was %d", st.PID, before["a"].PID)
	}
	d.waitFor(t, 10*time.Second, "only a's pipes in the store", func() bool {
		st := sd.stored()
		return len(st) == 2 && strings.HasPrefix(st[0], "a@") && strings.HasPrefix(st[1], "a@")
	})
	ents, err := os.ReadDir(filepath.Join(filepath.Dir(s.Socket), "instances"))
	if err != nil || len(ents) != 1 || !strings.HasPrefix(ents[0].Name(), "a@") {
		t.Errorf("instance records after the upgrade: %v, %v; want a's only", ents, err)
	}
}

// TestDescriptorStoreHygiene: through many crashes, restarts, stops and
// starts, systemd's descriptor store holds exactly the two pipes of each
// running instance, and the instance records match.
func TestDescriptorStoreHygiene(t *testing.T) {
	sd := newFakeSystemd(t)
	s := newSite(t,
		testModel{Name: "a"},
		testModel{Name: "c", Fake: []string{"--fake-crash-after", "150ms"}, YAML: "restart: {delay: 10ms, max_delay: 20ms, burst: 1000, interval: 1m}"},
	)
	d := sd.start(s, os.Args[0])
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	d.waitFor(t, 30*time.Second, "a ready", func() bool { return statusOf(t, s.Socket)["a"].State == api.Ready })
	for range 5 {
		for _, op := range []api.Op{api.OpStop, api.OpStart, api.OpRestart} {
			if _, err := c.Op(ctx, op, "a"); err != nil {
				t.Fatalf("%s a: %v", op, err)
			}
		}
	}
	d.waitFor(t, 30*time.Second, "c restarted 10 times", func() bool { return statusOf(t, s.Socket)["c"].RestartsByReason["exit"] >= 10 })
	if _, err := c.Op(ctx, api.OpStop, "c"); err != nil {
		t.Fatal(err)
	}
	recs := filepath.Join(filepath.Dir(s.Socket), "instances")
	d.waitFor(t, 10*time.Second, "a ready, c stopped, the store and the records a's alone", func() bool {
		st := statusOf(t, s.Socket)
		stored := sd.stored()
		ents, _ := os.ReadDir(recs)
		return st["a"].State == api.Ready && st["c"].State == api.Stopped &&
			len(stored) == 2 && strings.HasPrefix(stored[0], "a@") && strings.HasPrefix(stored[1], "a@") &&
			len(ents) == 1 && strings.HasPrefix(ents[0].Name(), "a@")
	})
}

// TestCrashAdoptionRefusesAReusedPID: a record whose PID now belongs to
// another process (its start time differs) is not adopted: the stranger
// is left alone, what is left of the model's tree is stopped, and the
// model starts afresh.
func TestCrashAdoptionRefusesAReusedPID(t *testing.T) {
	sd := newFakeSystemd(t)
	s := newSite(t, testModel{Name: "a", Fake: []string{"--fake-detached-workers", "1"}})
	first := sd.start(s, os.Args[0])
	first.waitFor(t, 30*time.Second, "a ready with its worker", func() bool {
		return statusOf(t, s.Socket)["a"].State == api.Ready && len(live(s.procs("a"), "worker")) == 1
	})
	before := statusOf(t, s.Socket)["a"]
	worker := live(s.procs("a"), "worker")[0]
	first.cmd.Process.Kill() //nolint:errcheck // checked by wait
	first.wait(t)
	// a's server dies too, and its PID "is reused" by a stranger.
	if err := syscall.Kill(before.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	stranger := exec.Command("sleep", "120")
	if err := stranger.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { stranger.Process.Kill(); stranger.Wait() }() //nolint:errcheck // best effort
	recs := filepath.Join(filepath.Dir(s.Socket), "instances")
	ents, err := os.ReadDir(recs)
	if err != nil || len(ents) != 1 {
		t.Fatalf("records: %v, %v", ents, err)
	}
	p := filepath.Join(recs, ents[0].Name())
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var rec map[string]any
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatal(err)
	}
	rec["pid"] = stranger.Process.Pid
	if b, err = json.Marshal(rec); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	second := sd.start(s, os.Args[0])
	second.waitFor(t, 30*time.Second, "a started afresh", func() bool {
		st := statusOf(t, s.Socket)["a"]
		return st.State == api.Ready && st.PID != before.PID && st.PID != stranger.Process.Pid
	})
	if !supervisortest.Running(stranger.Process.Pid) {
		t.Errorf("the stranger holding the recorded PID was killed")
	}
	if supervisortest.Running(worker) {
		t.Errorf("a's old worker %d survives", worker)
	}
	if strings.Contains(second.logText(), "adopting a model left running") {
		t.Errorf("the successor adopted a stranger:\n%s", second.logText())
	}
}

// TestTakeoverRestartsARotatedSecret: a model whose env_files changed
// while no daemon watched it (rotated before an upgrade, or while the
// daemon was dead) is restarted, deliberately, as a reload would: its
// process still has the old secret.
func TestTakeoverRestartsARotatedSecret(t *testing.T) {
	sd := newFakeSystemd(t)
	secrets := filepath.Join(t.TempDir(), "secrets.env")
	rotate := func(v string) {
		t.Helper()
		if err := os.WriteFile(secrets, []byte("HF_TOKEN="+v+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	rotate("one")
	s := newSite(t, testModel{Name: "a", YAML: "env_files: [" + secrets + "]"}, testModel{Name: "b"})
	in := newInstalled(t)
	first := sd.start(s, in.exe)
	first.waitFor(t, 30*time.Second, "a and b ready", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["b"].State == api.Ready
	})
	before := statusOf(t, s.Socket)
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	rotate("two")
	in.install(t, "v2")
	if _, err := c.Upgrade(ctx); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	first.waitFor(t, 30*time.Second, "v2 answering, a restarted for its new secret", func() bool {
		dv, err := c.Daemon(ctx)
		st := statusOf(t, s.Socket)["a"]
		return err == nil && dv.Version == "v2" && st.State == api.Ready && st.PID != before["a"].PID
	})
	if st := statusOf(t, s.Socket); st["a"].RestartsByReason["reload"] != 1 || st["b"].PID != before["b"].PID {
		t.Errorf("after the upgrade: a restarts %v (want one for reload), b pid %d (was %d)", st["a"].RestartsByReason, st["b"].PID, before["b"].PID)
	}
	mid := statusOf(t, s.Socket)

	first.cmd.Process.Kill() //nolint:errcheck // checked by wait
	first.wait(t)
	rotate("three")
	third := sd.start(s, in.exe)
	third.waitFor(t, 30*time.Second, "a restarted for its new secret after the crash", func() bool {
		st := statusOf(t, s.Socket)["a"]
		return st.State == api.Ready && st.PID != mid["a"].PID
	})
	// A new daemon counts afresh: one restart, for the secret.
	if st := statusOf(t, s.Socket); st["a"].RestartsByReason["reload"] != 1 || st["b"].PID != before["b"].PID {
		t.Errorf("after the crash: a restarts %v (want one for reload), b pid %d (was %d)", st["a"].RestartsByReason, st["b"].PID, before["b"].PID)
	}
}

// socketInodes lists the socket inodes pid holds open.
func socketInodes(t *testing.T, pid int) map[string]bool {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, e := range ents {
		if l, err := os.Readlink(filepath.Join(dir, e.Name())); err == nil && strings.HasPrefix(l, "socket:[") {
			out[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
		}
	}
	return out
}

// listeningInodes are the inodes of the TCP sockets listening on port and
// of the unix socket bound at path.
func listeningInodes(t *testing.T, port int, path string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(line)
			if len(fs) > 9 && fs[3] == "0A" && strings.HasSuffix(fs[1], fmt.Sprintf(":%04X", port)) {
				out[fs[9]] = fmt.Sprintf("tcp listener :%d", port)
			}
		}
	}
	b, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n")[1:] {
		fs := strings.Fields(line)
		if len(fs) >= 8 && fs[3] == "00010000" && fs[len(fs)-1] == path { // listening
			out[fs[6]] = "control socket " + path
		}
	}
	return out
}

// TestModelsInheritNoListenerAfterAnUpgrade: the new image of an upgrade
// inherits the listeners and the control socket; a model it spawns before
// it has taken them up (one that died across the exec, restarted at once)
// must not inherit them too, or a listener outlives the daemon in a
// model, and the next daemon cannot bind its port.
func TestModelsInheritNoListenerAfterAnUpgrade(t *testing.T) {
	httpPort, gwPort := supervisortest.FreePort(t), supervisortest.FreePort(t)
	top := fmt.Sprintf("listen: 127.0.0.1:%d\nlog: {level: debug}\ngpu: {backend: none}\ngateway: {listen: 127.0.0.1:%d}\n", httpPort, gwPort)
	s := &site{Site: supervisortest.NewSite(t, top,
		testModel{Name: "a", YAML: "stop_timeout: 3s"},
		testModel{Name: "b", YAML: "restart: {delay: 1ms, max_delay: 1ms}"},
		testModel{Name: "x", Fake: []string{"--fake-ignore-sigterm"}},
	), t: t}
	in := newInstalled(t)
	d := in.start(s)
	d.waitFor(t, 30*time.Second, "a, b and x ready", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["b"].State == api.Ready && st["x"].State == api.Ready
	})
	before := statusOf(t, s.Socket)
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	upgradeRemovingX(ctx, t, s, in, d, c, before["b"].PID)
	d.waitFor(t, 30*time.Second, "v2 answering, b back", func() bool {
		dv, err := c.Daemon(ctx)
		st := statusOf(t, s.Socket)["b"]
		return err == nil && dv.Version == "v2" && st.State == api.Ready && st.PID != before["b"].PID
	})
	listeners := listeningInodes(t, httpPort, s.Socket)
	for k, v := range listeningInodes(t, gwPort, "") {
		listeners[k] = v
	}
	if len(listeners) != 3 {
		t.Fatalf("the daemon's listeners: %v, want http, gateway and control", listeners)
	}
	for _, m := range []string{"a", "b"} {
		for _, pid := range live(s.procs(m), "") {
			for ino := range socketInodes(t, pid) {
				if what, ok := listeners[ino]; ok {
					t.Errorf("%s's process %d holds the daemon's %s", m, pid, what)
				}
			}
		}
	}
}

// TestCrashAdoptedReadyModelFailsFast: a model that was ready when its
// daemon died, and stopped answering meanwhile, is restarted after its
// probe's failure_threshold, not after a whole startup_timeout (minutes on
// a real GPU): its record says it was ready, so the successor does not
// take it for one still loading.
func TestCrashAdoptedReadyModelFailsFast(t *testing.T) {
	sd := newFakeSystemd(t)
	s := newSite(t, testModel{Name: "u", Fake: []string{"--fake-unhealthy-after", "2s"},
		YAML: "probe: {period: 50ms, timeout: 1s, failure_threshold: 3, startup_timeout: 2m}"})
	first := sd.start(s, os.Args[0])
	first.waitFor(t, 30*time.Second, "u ready", func() bool { return statusOf(t, s.Socket)["u"].State == api.Ready })
	before := statusOf(t, s.Socket)["u"]
	first.cmd.Process.Kill() //nolint:errcheck // checked by wait
	first.wait(t)
	// No daemon runs: a plain wait.
	waitFor(t, 10*time.Second, "u unhealthy while no daemon watches", func() bool {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/health", s.Models[0].Port))
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusServiceUnavailable
	})
	second := sd.start(s, os.Args[0])
	// Restarted within a few probe periods: the wait is far below
	// startup_timeout.
	second.waitFor(t, 20*time.Second, "u restarted after failing its probes", func() bool {
		st := statusOf(t, s.Socket)["u"]
		return st.PID != before.PID && st.PID != 0
	})
}

// TestTakeoverKeepsTheWatchdogFed: a takeover that stops a predecessor's
// leftovers takes their stop_timeout, during which the watchdog must
// still be pinged: the daemon is making progress, and a watchdog kill
// then would cost the very restart the takeover is there to avoid.
func TestTakeoverKeepsTheWatchdogFed(t *testing.T) {
	sd := newFakeSystemd(t)
	sd.env = []string{"WATCHDOG_USEC=2000000"}
	s := newSite(t,
		testModel{Name: "a", YAML: "stop_timeout: 6s"},
		testModel{Name: "x", Fake: []string{"--fake-ignore-sigterm"}},
	)
	first := sd.start(s, os.Args[0])
	first.waitFor(t, 30*time.Second, "a and x ready", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["x"].State == api.Ready
	})
	first.cmd.Process.Kill() //nolint:errcheck // checked by wait
	first.wait(t)
	if err := os.WriteFile(s.Path, []byte(without(t, s, "x")), 0o644); err != nil {
		t.Fatal(err)
	}
	pings := sd.sent("WATCHDOG=1")
	second := sd.start(s, os.Args[0])
	// x ignores SIGTERM: its stop takes a's 6 s, the longest configured.
	second.waitFor(t, 30*time.Second, "the takeover done", func() bool { return strings.Contains(second.logText(), `"supervisor running"`) })
	if n := sd.sent("WATCHDOG=1") - pings; n < 3 {
		t.Errorf("%d watchdog pings during a 6 s takeover with WatchdogSec=2s", n)
	}
	if l := live(s.procs("x"), ""); len(l) != 0 {
		t.Errorf("x still runs: %v", l)
	}
}

// upgradeRemovingX removes model x (it ignores SIGTERM) from the file,
// upgrades to v2, and SIGKILLs b's server (pid b) while the new image is
// still stopping x during its takeover.
func upgradeRemovingX(ctx context.Context, t *testing.T, s *site, in *installedDaemon, d *daemon, c *client.Client, b int) {
	t.Helper()
	if err := os.WriteFile(s.Path, []byte(without(t, s, "x")), 0o644); err != nil {
		t.Fatal(err)
	}
	in.install(t, "v2")
	if _, err := c.Upgrade(ctx); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	d.waitFor(t, 20*time.Second, "the new image stopping x", func() bool {
		return strings.Contains(d.logText(), `left by a previous supervisor","model":"x"`)
	})
	if err := syscall.Kill(b, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
}

// TestRepeatedDaemonSIGKILL kills the daemon again and again while its
// models start, run and crash, then starts it once more: exactly one copy
// of each model, nothing of the earlier incarnations, nothing after stop.
func TestRepeatedDaemonSIGKILL(t *testing.T) {
	s := newSite(t,
		testModel{Name: "steady"},
		testModel{Name: "crashy", YAML: "restart: {delay: 100ms, burst: 1000}", Fake: []string{"--fake-crash-after", "700ms"}},
		testModel{Name: "slow", Fake: []string{"--fake-load-time", "1s"}},
		testModel{Name: "stubborn", YAML: "stop_timeout: 300ms", Fake: stubborn},
	)
	for i, after := range []time.Duration{200 * time.Millisecond, 900 * time.Millisecond, 1500 * time.Millisecond, 2500 * time.Millisecond} {
		d := s.start()
		// Let it get somewhere: models starting, running, crashing.
		deadline := time.Now().Add(after)
		d.waitFor(t, after+10*time.Second, "time to pass", func() bool { return time.Now().After(deadline) })
		d.cmd.Process.Kill() //nolint:errcheck // checked by wait
		d.wait(t)
		t.Logf("round %d: daemon killed after %s", i, after)
	}
	old := s.allProcs("steady", "crashy", "slow", "stubborn")
	final := s.start()
	// Ask the new daemon itself: its models ready on processes of its own.
	c := client.New(s.Socket)
	current := map[int]bool{}
	final.waitFor(t, 30*time.Second, "steady, slow and stubborn ready", func() bool {
		st, err := c.Status(context.Background(), "steady", "slow", "stubborn")
		if err != nil {
			return false
		}
		for _, m := range st {
			if m.State != supervisor.Ready {
				return false
			}
			current[m.PID] = true
		}
		return true
	})
	// crashy's current process too (it may be an adopted one that has not
	// crashed yet), read after the others: an earlier process it had then
	// is not running by now.
	if st, err := c.Status(context.Background(), "crashy"); err == nil && len(st) == 1 && st[0].PID != 0 {
		current[st[0].PID] = true
	}
	// An earlier incarnation's server lives on only as a model's current
	// process (adopted); nothing else of theirs is left.
	for pid, role := range old {
		if role == "server" && len(live(map[int]string{pid: role}, "server")) == 1 && !current[pid] {
			t.Errorf("server %d of an earlier incarnation is alive and nobody's", pid)
		}
	}
	for _, m := range []string{"steady", "slow", "stubborn", "crashy"} {
		if n := len(live(s.procs(m), "server")); n > 1 {
			t.Errorf("%s: %d servers", m, n)
		}
	}
	if n := len(live(s.procs("stubborn"), "worker")); n != 2 {
		t.Errorf("stubborn: %d live workers, want its 2", n)
	}
	final.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // checked by wait
	if code := final.wait(t); code != 0 {
		t.Errorf("final daemon exit %d", code)
	}
	for _, m := range []string{"steady", "crashy", "slow", "stubborn"} {
		if l := live(s.procs(m), ""); len(l) != 0 {
			t.Errorf("%s: processes alive after the final stop: %v", m, l)
		}
	}
}
