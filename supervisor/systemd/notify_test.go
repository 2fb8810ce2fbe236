package systemd

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// notifySocket listens where NOTIFY_SOCKET points, as systemd does.
func notifySocket(t *testing.T) *net.UnixConn {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return c
}

func recv(t *testing.T, c *net.UnixConn, within time.Duration) string {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(within)) //nolint:errcheck // the read reports it
	buf := make([]byte, 4096)
	n, err := c.Read(buf)
	if err != nil {
		return ""
	}
	return string(buf[:n])
}

func TestNotifyMessages(t *testing.T) {
	c := notifySocket(t)
	n := NewNotifier(zap.NewNop())
	n.Ready()
	if got := recv(t, c, time.Second); got != "READY=1" {
		t.Errorf("Ready sent %q", got)
	}
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts) //nolint:errcheck // test
	before := ts.Nano() / 1000
	n.Reloading()
	got := recv(t, c, time.Second)
	usec, ok := strings.CutPrefix(got, "RELOADING=1\nMONOTONIC_USEC=")
	v, err := strconv.ParseInt(usec, 10, 64)
	if !ok || err != nil || v < before || v > before+int64(time.Second/time.Microsecond) {
		t.Errorf("Reloading sent %q (monotonic now %d)", got, before)
	}
	n.Status("5/7 ready, 2 pending")
	if got := recv(t, c, time.Second); got != "STATUS=5/7 ready, 2 pending" {
		t.Errorf("Status sent %q", got)
	}
	n.Stopping()
	if got := recv(t, c, time.Second); got != "STOPPING=1" {
		t.Errorf("Stopping sent %q", got)
	}
}

// TestWatchdogPingsOnlyWhileTheLoopIsAlive: a stalled main loop gets no
// pings, so systemd's watchdog fires.
func TestWatchdogPingsOnlyWhileTheLoopIsAlive(t *testing.T) {
	c := notifySocket(t)
	t.Setenv("WATCHDOG_USEC", "100000") // 100 ms: pings every 50 ms
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	var alive atomic.Bool
	alive.Store(true)
	asked := make(chan time.Duration, 100)
	n := NewNotifier(zap.NewNop())
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- n.Watchdog(ctx, func(maxAge time.Duration) bool {
			select {
			case asked <- maxAge:
			default:
			}
			return alive.Load()
		})
	}()
	for range 3 {
		if got := recv(t, c, 2*time.Second); got != "WATCHDOG=1" {
			t.Fatalf("while alive: got %q", got)
		}
	}
	if maxAge := <-asked; maxAge != 50*time.Millisecond {
		t.Errorf("alive asked about the last %s, want half the watchdog interval", maxAge)
	}
	alive.Store(false)
	recv(t, c, 100*time.Millisecond) // a ping already on its way
	if got := recv(t, c, 300*time.Millisecond); got != "" {
		t.Errorf("a stalled loop was pinged for: %q", got)
	}
	cancel()
	if err := <-done; err != nil {
		t.Error(err)
	}
}

func TestNoWatchdogWithoutSystemd(t *testing.T) {
	t.Setenv("WATCHDOG_USEC", "")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := NewNotifier(zap.NewNop()).Watchdog(ctx, func(time.Duration) bool { return true }); err != nil {
		t.Error(err)
	}
}
