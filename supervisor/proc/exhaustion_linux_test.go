package proc

import (
	"context"
	"errors"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// exhaustFDs lowers the soft descriptor limit and takes every descriptor
// left, so the next open fails with EMFILE; release gives them back.
func exhaustFDs(t *testing.T) (release func()) {
	t.Helper()
	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	low := old
	low.Cur = 256
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	var held []int
	for {
		fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			if !errors.Is(err, unix.EMFILE) {
				t.Fatalf("open: %v", err)
			}
			break
		}
		held = append(held, fd)
	}
	return func() {
		for _, fd := range held {
			unix.Close(fd)
		}
		unix.Setrlimit(unix.RLIMIT_NOFILE, &old) //nolint:errcheck // restoring
	}
}

// TestProcUnreadableIsNotGone: with the process out of descriptors, /proc
// cannot be read. A live process must not read as gone (the old "alive()"
// did, and a stop then "succeeded" without signalling), and a stop must end
// within its bound and say it failed.
func TestProcUnreadableIsNotGone(t *testing.T) {
	marker := token()
	cmd := start(t, marker, "sh", "-c", "trap '' TERM; while :; do sleep 1; done")
	tr := NewTree(marker, cmd.Process.Pid)
	waitFor(t, "the sleep child", func() bool { tr.Refresh(); return len(tr.PIDs()) >= 2 })
	s, err := ReadStat(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	tr.bound = 500 * time.Millisecond

	release := exhaustFDs(t)
	checkErr := Check(cmd.Process.Pid, s.Start)
	alive := Alive(cmd.Process.Pid, s.Start)
	tr.Refresh()
	members := len(tr.PIDs())
	begin := time.Now()
	stopErr := tr.Stop(context.Background(), 200*time.Millisecond, true)
	took := time.Since(begin)
	release()

	if checkErr == nil || errors.Is(checkErr, ErrGone) || !errors.Is(checkErr, syscall.EMFILE) {
		t.Errorf("Check under EMFILE = %v, want an EMFILE error that is not ErrGone", checkErr)
	}
	if !alive {
		t.Error("Alive under EMFILE = false: an unreadable /proc read as gone")
	}
	if members < 2 {
		t.Errorf("Refresh under EMFILE dropped members: %d left", members)
	}
	if stopErr == nil {
		t.Error("Stop under EMFILE reported success without being able to signal")
	}
	if bound := 200*time.Millisecond + tr.bound + time.Second; took > bound {
		t.Errorf("Stop under EMFILE took %s, bound %s", took, bound)
	}
	// With descriptors back, the stop does its work.
	if err := tr.Stop(context.Background(), 100*time.Millisecond, true); err != nil {
		t.Fatalf("Stop after release: %v", err)
	}
	if Alive(cmd.Process.Pid, s.Start) {
		t.Error("main process alive after the second Stop")
	}
}
