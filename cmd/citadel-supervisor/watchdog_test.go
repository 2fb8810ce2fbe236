//go:build e2e

package main

import (
	"os"
	"os/exec"
	"strconv"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor/supervisortest"
)

// TestWatchdogPingGaps runs the daemon under a real notify socket with
// WATCHDOG_USEC of 1 s, 2 s and 30 s and, meanwhile, reloads a
// configuration that removes a model whose stop takes its whole
// stop_timeout. systemd kills a daemon whose pings are further apart than
// the interval; the daemon promises one every half interval, so no gap
// may exceed half the interval plus 100 ms. (Before, the loop beat once a
// second whatever the interval, and waited for removed models' stops.)
func TestWatchdogPingGaps(t *testing.T) {
	for _, interval := range []time.Duration{time.Second, 2 * time.Second, 30 * time.Second} {
		t.Run(interval.String(), func(t *testing.T) {
			t.Parallel()
			watchdogGaps(t, interval)
		})
	}
}

func watchdogGaps(t *testing.T, interval time.Duration) {
	sockPath, msgs := notifySocket(t)

	s := newSite(t,
		testModel{Name: "keep"},
		testModel{Name: "slow", YAML: "stop_timeout: 3s", Fake: []string{"--fake-ignore-sigterm", "--fake-workers", "1", "--fake-worker-ignore-sigterm"}},
	)
	withoutSlow := s.Edit(t, supervisortest.Delete("models.slow"))
	cmd := exec.Command(os.Args[0], "--config", s.Path)
	cmd.Env = supervisortest.DaemonEnviron(roleEnv+"=1", "NOTIFY_SOCKET="+sockPath,
		"WATCHDOG_USEC="+strconv.FormatInt(interval.Microseconds(), 10), "WATCHDOG_PID=")
	d := &daemon{cmd: cmd, log: &supervisortest.SyncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = d.log, d.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { cmd.Wait(); close(d.done) }() //nolint:errcheck // ProcessState says
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // best effort
			d.wait(t)
		}
		if t.Failed() {
			t.Logf("daemon output:\n%s", d.log.String())
		}
	})

	var pings []time.Time
	reloadAt, reloaded := time.Time{}, time.Time{}
	// Watch for an interval after the reload completed (it took the
	// removed model's stop_timeout), and for three pings at least.
	deadline := time.After(2*interval + 60*time.Second)
	for reloaded.IsZero() || len(pings) < 3 || time.Since(reloaded) < interval {
		select {
		case m, ok := <-msgs:
			if !ok {
				t.Fatal("notify socket closed")
			}
			switch {
			case m.text == "WATCHDOG=1":
				pings = append(pings, m.at)
			case m.text == "STATUS=2/2 ready" && reloadAt.IsZero():
				if err := os.WriteFile(s.Path, []byte(withoutSlow), 0o644); err != nil {
					t.Fatal(err)
				}
				reloadAt = time.Now()
				cmd.Process.Signal(syscall.SIGHUP) //nolint:errcheck // the READY=1 below says
			case m.text == "READY=1" && !reloadAt.IsZero() && reloaded.IsZero():
				reloaded = m.at
			}
		case <-deadline:
			t.Fatalf("%d pings; reload sent %v, done %v", len(pings), !reloadAt.IsZero(), !reloaded.IsZero())
		}
	}
	if took := reloaded.Sub(reloadAt); took < 3*time.Second {
		t.Fatalf("the reload took %s, less than the removed model's stop_timeout: the test proves nothing", took)
	}
	limit := interval/2 + 100*time.Millisecond
	for i := 1; i < len(pings); i++ {
		if gap := pings[i].Sub(pings[i-1]); gap > limit {
			t.Errorf("ping %d came %s after the previous one (limit %s)", i, gap.Round(time.Millisecond), limit)
		}
	}
}
