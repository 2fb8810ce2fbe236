package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
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
