// Package systemd connects the daemon to systemd: sd_notify (readiness,
// reload, stop, status line, watchdog) through coreos/go-systemd, and the
// journal for model output, so `journalctl -t citadel-<model>` works as it
// did with per-model units.
package systemd

import (
	"context"
	"strconv"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Notifier sends sd_notify messages. Outside systemd (no NOTIFY_SOCKET)
// every call is a no-op. NOTIFY_SOCKET stays in the daemon's environment
// (later messages need it); children never see it (supervisor strips it).
type Notifier struct {
	log *zap.Logger
}

// NewNotifier returns a Notifier that logs send failures to log.
func NewNotifier(log *zap.Logger) *Notifier { return &Notifier{log: log} }

func (n *Notifier) send(states ...string) {
	if _, err := daemon.SdNotify(false, strings.Join(states, "\n")); err != nil {
		n.log.Warn("sd_notify failed", zap.Strings("state", states), zap.Error(err))
	}
}

// Ready says start-up (or a reload) is done: configuration, GPU backend
// and listeners are up. Models are not waited for.
func (n *Notifier) Ready() { n.send(daemon.SdNotifyReady) }

// Reloading says a reload began, with the monotonic time systemd needs to
// match it to `systemctl reload` (Type=notify-reload protocol).
func (n *Notifier) Reloading() {
	n.send(daemon.SdNotifyReloading, "MONOTONIC_USEC="+strconv.FormatInt(monotonicUsec(), 10))
}

// Stopping says the daemon is stopping its models.
func (n *Notifier) Stopping() { n.send(daemon.SdNotifyStopping) }

// Status sets the one-line status `systemctl status` shows.
func (n *Notifier) Status(line string) { n.send("STATUS=" + line) }

func monotonicUsec() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return ts.Nano() / 1000
}

// WatchdogInterval is systemd's watchdog interval for this process
// (WATCHDOG_USEC), or 0 without one.
func WatchdogInterval() time.Duration {
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		return 0
	}
	return d
}

// Heartbeat is how often the supervisor's main loop must prove it is alive
// for the watchdog: a quarter of the interval (at most a second), so a loop
// that turns is always seen alive at each ping, however short WatchdogSec.
func Heartbeat(watchdog time.Duration) time.Duration {
	if watchdog <= 0 {
		return time.Second
	}
	return min(time.Second, watchdog/4)
}

// Watchdog pings systemd's watchdog at half of WATCHDOG_USEC while alive
// says the supervisor's main loop turned within the watchdog interval. A
// stuck loop gets no ping, and systemd kills and restarts the daemon: a
// goroutine ticking on its own would hide exactly the failure the
// watchdog exists for. Without a watchdog it waits for ctx and returns.
func (n *Notifier) Watchdog(ctx context.Context, alive func(maxAge time.Duration) bool) error {
	interval, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		n.log.Warn("WATCHDOG_USEC unusable; no watchdog pings", zap.Error(err))
	}
	if interval <= 0 {
		<-ctx.Done()
		return nil
	}
	n.log.Info("systemd watchdog enabled", zap.Duration("interval", interval))
	tick := time.NewTicker(interval / 2)
	defer tick.Stop()
	stalled := false
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
			if alive(interval / 2) {
				n.send(daemon.SdNotifyWatchdog)
				stalled = false
			} else if !stalled {
				stalled = true
				n.log.Error("supervisor main loop stalled; withholding the watchdog ping so systemd restarts the daemon")
			}
		}
	}
}

// StatusUpdates keeps STATUS= current: it sends line() whenever it
// changes, checking every period, until ctx ends.
func (n *Notifier) StatusUpdates(ctx context.Context, period time.Duration, line func() string) error {
	tick := time.NewTicker(period)
	defer tick.Stop()
	last := ""
	for {
		if l := line(); l != last {
			n.Status(l)
			last = l
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}
