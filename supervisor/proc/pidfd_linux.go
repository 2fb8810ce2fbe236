package proc

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Exited returns a channel closed once the process pid (started at start)
// has exited, for a process that is not the caller's child: a model a
// previous daemon started, whose exit status nobody here can wait for. It
// waits on a pidfd through the runtime's poller, so no thread is held.
// ErrGone means it is gone already.
func Exited(pid int, start uint64) (<-chan struct{}, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return nil, ErrGone
		}
		return nil, fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	// The pidfd pins the process: checked after it is open, the identity
	// cannot change under it.
	if err := Check(pid, start); err != nil {
		unix.Close(fd)
		return nil, err
	}
	f := os.NewFile(uintptr(fd), fmt.Sprintf("pidfd:%d", pid))
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer f.Close()
		// A pidfd polls readable once the process has exited; until then
		// the poller parks this goroutine.
		err := rc.Read(func(fd uintptr) bool {
			p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, err := unix.Poll(p, 0)
			return err != nil || n > 0
		})
		_ = err // a pidfd that cannot be polled is closed: treat as exited
	}()
	return done, nil
}
