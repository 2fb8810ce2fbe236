//go:build e2e

package main

import (
	"context"
	"flag"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
)

var (
	hostileTrials       = flag.Int("hostile.trials", 20, "randomized trials of each hostile-children case in cgroup mode")
	hostileMarkerTrials = flag.Int("hostile.marker-trials", 5, "randomized trials of each hostile-children case in marker mode (the fallback)")
)

// hostileModels are the children that escaped the marker-and-parent-links
// tracking, one model each:
//   - scrub: a grandchild that clears its environment (env -i) and
//     double-forks: no marker, no parent link;
//   - hidden: a double-forked grandchild that sets PR_SET_DUMPABLE 0, so a
//     daemon that is not root cannot read its environment;
//   - hop: a chain of processes that fork and exit (pid hopping);
//   - bare: a main process without the marker (command: [env, -i, ...]).
//
// Each one ignores SIGTERM, so only the stop's SIGKILL ends it.
func hostileModels() []testModel {
	bin, _ := filepath.Abs(os.Args[0])
	// A short stop_timeout: the escapees ignore SIGTERM, so every stop
	// runs to its SIGKILL, and the suite's time is mostly that wait.
	const stop = "stop_timeout: 300ms\n"
	return []testModel{
		{Name: "scrub", YAML: stop, Fake: []string{"--fake-escape-env"}},
		{Name: "hidden", YAML: stop, Fake: []string{"--fake-undumpable"}},
		{Name: "hop", YAML: stop, Fake: []string{"--fake-pid-hop"}},
		{Name: "bare", YAML: stop + fmt.Sprintf("command: [env, -i, %q, --fake-self]", bin)},
	}
}

// hostileRoles is the role of the process each model's escape is about.
var hostileRoles = map[string]string{"scrub": "escapee", "hidden": "hidden", "hop": "hopper", "bare": "server"}

// escaped reports whether every model's hostile child has started this
// trial: the moment the old tracking lost them. Started, not running: in
// marker mode the daemon's stray killer may already have ended an escapee.
func escaped(s *supervisortest.Site, t testing.TB) bool {
	for _, m := range s.Models {
		found := false
		for _, role := range s.PIDs(t, m.Name) {
			found = found || role == hostileRoles[m.Name]
		}
		if !found {
			return false
		}
	}
	return true
}

// forget clears the models' process records once nothing of them runs, so
// the next trial's escape is its own.
func forget(t testing.TB, s *supervisortest.Site) {
	t.Helper()
	for _, m := range s.Models {
		dir := filepath.Join(s.Dir, "pids", m.Name)
		if err := os.RemoveAll(dir); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
}

// servers counts each model's running servers that answer on its port.
func servers(s *supervisortest.Site, t testing.TB) map[string]int {
	out := map[string]int{}
	for _, m := range s.Models {
		out[m.Name] = len(supervisortest.Live(s.PIDs(t, m.Name), "server"))
	}
	return out
}

// jitter waits a random 0-300 ms: where in the children's forking the
// stop or the signal lands.
func jitter() { <-time.After(time.Duration(rand.IntN(300)) * time.Millisecond) }

func hostileSite(t *testing.T) *site {
	s := newSite(t, hostileModels()...)
	return s
}

// TestHostileChildren: every escape, in both ownership modes, stopped by
// citadelctl stop, by the daemon's SIGTERM, and by SIGKILL of the daemon
// and a restart: nothing survives and no model runs twice.
//
// In marker mode (no cgroup) a SIGKILLed daemon cannot find a process that
// has neither the marker nor the daemon as parent: there only "never two
// copies" is checked (the port check keeps the second copy pending); the
// cgroup mode is the one that promises zero survivors.
func TestHostileChildren(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Log("NOTE: not root: cgroup mode is not tested here (CI runs as root)")
	}
	for _, mode := range []string{supervisor.OwnershipCgroup, supervisor.OwnershipMarker} {
		for _, action := range []string{"stop", "sigterm", "sigkill"} {
			t.Run(mode+"/"+action, func(t *testing.T) {
				if mode == supervisor.OwnershipCgroup && os.Geteuid() != 0 {
					t.Skip("cgroup mode needs root or a delegated cgroup")
				}
				t.Parallel()
				s := hostileSite(t)
				trials := *hostileTrials
				if mode == supervisor.OwnershipMarker {
					trials = *hostileMarkerTrials
				}
				switch action {
				case "stop":
					hostileStops(t, s, mode, trials)
				case "sigterm":
					hostileSIGTERMs(t, s, mode, trials)
				case "sigkill":
					hostileSIGKILLs(t, s, mode, trials)
				}
			})
		}
	}
}

func (s *site) startMode(mode string) *daemon {
	s.t.Helper()
	return s.startArgs("--ownership", mode)
}

func hostileStops(t *testing.T, s *site, mode string, trials int) {
	d := s.startMode(mode)
	c := client.New(s.Socket)
	defer c.Close()
	for trial := range trials {
		d.waitFor(t, 30*time.Second, "models healthy", s.healthy)
		d.waitFor(t, 10*time.Second, "every hostile child running", func() bool { return escaped(s.Site, t) })
		jitter()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if _, err := c.Op(ctx, api.OpStop, "all"); err != nil {
			t.Fatalf("trial %d: stop: %v", trial, err)
		}
		cancel()
		d.waitFor(t, 30*time.Second, "every model stopped", func() bool {
			st, err := c.Status(context.Background())
			if err != nil {
				return false
			}
			for _, m := range st {
				if m.State != api.Stopped {
					return false
				}
			}
			return true
		})
		if l := siteProcs(s.Site); len(l) != 0 {
			t.Fatalf("trial %d (%s): processes survive citadelctl stop: %v", trial, mode, describe(l))
		}
		forget(t, s.Site)
		ctx, cancel = context.WithTimeout(context.Background(), 30*time.Second)
		if _, err := c.Op(ctx, api.OpStart, "all"); err != nil {
			t.Fatalf("trial %d: start: %v", trial, err)
		}
		cancel()
	}
	d.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // checked by wait
	if code := d.wait(t); code != 0 {
		t.Errorf("exit code %d after SIGTERM", code)
	}
}

func hostileSIGTERMs(t *testing.T, s *site, mode string, trials int) {
	for trial := range trials {
		d := s.startMode(mode)
		d.waitFor(t, 30*time.Second, "models healthy", s.healthy)
		d.waitFor(t, 10*time.Second, "every hostile child running", func() bool { return escaped(s.Site, t) })
		jitter()
		start := time.Now()
		d.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // checked by wait
		if code := d.wait(t); code != 0 {
			t.Fatalf("trial %d: exit code %d after SIGTERM", trial, code)
		}
		if took := time.Since(start); took > 300*time.Millisecond+supervisor.StopOverhead {
			t.Errorf("trial %d: SIGTERM took %s", trial, took)
		}
		if l := siteProcs(s.Site); len(l) != 0 {
			t.Fatalf("trial %d (%s): processes survive the daemon's SIGTERM: %v", trial, mode, describe(l))
		}
		forget(t, s.Site)
	}
}

// readyPIDs maps each ready model to its PID, as the daemon says.
func readyPIDs(t *testing.T, socket string) map[string]int {
	out := map[string]int{}
	for name, m := range statusOf(t, socket) {
		if m.State == api.Ready {
			out[name] = m.PID
		}
	}
	return out
}

func hostileSIGKILLs(t *testing.T, s *site, mode string, trials int) {
	for trial := range trials {
		first := s.startMode(mode)
		first.waitFor(t, 30*time.Second, "models healthy", s.healthy)
		first.waitFor(t, 10*time.Second, "every hostile child running", func() bool { return escaped(s.Site, t) })
		var before map[string]int
		first.waitFor(t, 10*time.Second, "the daemon says every model is ready", func() bool {
			before = readyPIDs(t, s.Socket)
			return len(before) == len(s.Models)
		})
		jitter()
		first.cmd.Process.Kill() //nolint:errcheck // checked by wait
		first.wait(t)

		second := s.startMode(mode)
		if mode == supervisor.OwnershipCgroup {
			// Adopted (docs/operations.md): the same server per model, ready again,
			// never a second copy.
			second.waitFor(t, 30*time.Second, "every model adopted: ready on the process it had, one server each", func() bool {
				for _, n := range servers(s.Site, t) {
					if n != 1 {
						t.Fatalf("trial %d: a model runs %d servers", trial, n)
					}
				}
				after := readyPIDs(t, s.Socket)
				return len(after) == len(s.Models) && maps.Equal(after, before)
			})
		} else {
			// Never two copies, whether or not the old ones were found.
			deadline := time.Now().Add(3 * time.Second)
			for time.Now().Before(deadline) {
				for m, n := range servers(s.Site, t) {
					if n > 1 {
						t.Fatalf("trial %d (%s): model %s runs %d copies", trial, mode, m, n)
					}
				}
				<-time.After(50 * time.Millisecond)
			}
		}
		second.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // checked by wait
		if code := second.wait(t); code != 0 {
			t.Fatalf("trial %d: second daemon exit code %d", trial, code)
		}
		if mode == supervisor.OwnershipCgroup {
			if l := siteProcs(s.Site); len(l) != 0 {
				t.Fatalf("trial %d (%s): processes survive SIGKILL + restart + SIGTERM: %v", trial, mode, describe(l))
			}
		}
		killSite(s.Site)
		forget(t, s.Site)
	}
}

// describe names pids with their command lines, for a failure message.
func describe(pids []int) string {
	var b strings.Builder
	for _, pid := range pids {
		cmdline, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
		fmt.Fprintf(&b, "\n  %d %s", pid, strings.ReplaceAll(string(cmdline), "\x00", " "))
	}
	return b.String()
}
