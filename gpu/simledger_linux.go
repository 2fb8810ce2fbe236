package gpu

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// simAlive reports whether pid is a live process started at start (its
// /proc start time; 0: any): a ledger line of a process gone, or of a pid
// since reused, holds nothing.
func simAlive(pid int, start uint64) bool {
	got, state, err := SimProcStart(pid)
	return err == nil && state != 'Z' && (start == 0 || got == start)
}

// SimProcStart reads pid's start time (clock ticks since boot) and state
// from /proc: with the pid, a process's identity.
func SimProcStart(pid int) (start uint64, state byte, err error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	end := bytes.LastIndexByte(b, ')')
	if end < 0 || end+2 >= len(b) {
		return 0, 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[end+2:]))
	if len(f) < 20 || len(f[0]) == 0 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	start, err = strconv.ParseUint(f[19], 10, 64)
	return start, f[0][0], err
}

// simLock takes the ledger's exclusive lock (flock on <dir>/.lock).
func simLock(dir string) (unlock func(), err error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("sim ledger: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("sim ledger: lock: %w", err)
	}
	return func() { f.Close() }, nil
}
