package supervisor

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"citadel-supervisor/supervisor/liverestore"
	"citadel-supervisor/supervisor/proc"
)

// Reaper makes the daemon a child subreaper and reaps the orphans that are
// re-parented to it.
//
// vLLM's workers can outlive their API server. As a subreaper the daemon,
// not PID 1, becomes their parent, so they stay inside the daemon's view
// (and its systemd cgroup) until they are killed, and their exit is reaped
// here instead of leaving zombies on hosts whose PID 1 does not reap.
//
// A process has one subreaper attribute, so a process has one Reaper: main
// builds it and passes it to every Supervisor. Children the supervisor
// spawns are started through Start, which records them, so the reaper never
// steals an exit status that os/exec's Wait is owed.
type Reaper struct {
	mu      sync.Mutex
	managed map[int]bool
	// starting holds when each Start in flight began, in /proc's clock
	// ticks since boot: a child started within forkWindow of it may be its
	// own, not recorded yet, so reap leaves it alone until it returns. The
	// lock is not held across a fork and exec: one that hangs (its binary
	// on a mount that does not answer) holds its own spawn, not the
	// reaping, the stops and exits of other models, or their spawns; the
	// orphans inherited meanwhile are reaped as ever.
	starting map[*exec.Cmd]uint64
	// hook, when set (tests), is called by Start just before the fork and
	// exec: an exec that hangs.
	hook func(cmd *exec.Cmd)
	// accounted, when set (KillStrays), tells whether a model accounts
	// for an inherited orphan; strays holds when each unaccounted one was
	// first seen, by PID and start time.
	accounted func(pid int) bool
	strays    map[[2]uint64]time.Time
	now       func() time.Time
}

// strayGrace is how long an inherited orphan may stay unaccounted for
// before it is killed while its models run: long enough for a model's
// tree to follow a worker that was re-parented a moment ago. After a stop,
// and at shutdown, strays are killed at once.
const strayGrace = 2 * time.Second

// KillStrays makes the reaper SIGKILL the orphans it inherits that no model
// accounts for (accounted(pid) false): a process that scrubbed its
// environment and double-forked leaves its model's tree, but as an orphan
// it is re-parented to the daemon, the subreaper. In cgroup mode the leaf
// holds it anyway; in marker mode this is what catches it.
func (r *Reaper) KillStrays(accounted func(pid int) bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.accounted, r.strays, r.now = accounted, map[[2]uint64]time.Time{}, time.Now
}

// NewReaper marks this process a child subreaper.
func NewReaper() (*Reaper, error) {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return nil, fmt.Errorf("prctl(PR_SET_CHILD_SUBREAPER): %w", err)
	}
	return &Reaper{managed: map[int]bool{}, starting: map[*exec.Cmd]uint64{}}, nil
}

// Start starts cmd and records its PID as one os/exec will wait for. A
// child that exits at once is not reaped by Reap before it is recorded:
// reap leaves every child younger than a Start in flight alone.
func (r *Reaper) Start(cmd *exec.Cmd) error {
	if r == nil {
		return cmd.Start()
	}
	r.mu.Lock()
	r.starting[cmd] = bootTicks()
	hook := r.hook
	r.mu.Unlock()
	if hook != nil {
		hook(cmd)
		r.mu.Lock()
		r.starting[cmd] = bootTicks() // it forks now
		r.mu.Unlock()
	}
	err := cmd.Start()
	r.mu.Lock()
	delete(r.starting, cmd)
	if err == nil {
		r.managed[cmd.Process.Pid] = true
	}
	r.mu.Unlock()
	return err
}

// setHook sets the test hook Start calls before its fork and exec.
func (r *Reaper) setHook(hook func(cmd *exec.Cmd)) {
	r.mu.Lock()
	r.hook = hook
	r.mu.Unlock()
}

// userHZ is the unit of /proc's process start times (USER_HZ).
const userHZ = 100

// forkWindow bounds how long after a Start begins its fork happens (the
// exec, which may hang, comes after the fork): os/exec forks within
// milliseconds. A child started later is not a Start's in flight.
const forkWindow = 10 * userHZ

// mayBeStarting reports whether a child started at start (clock ticks
// since boot) may be a Start's in flight, not recorded yet. Called with mu
// held.
func (r *Reaper) mayBeStarting(start uint64) bool {
	for _, t := range r.starting {
		if start >= t && start-t <= forkWindow {
			return true
		}
	}
	return false
}

// bootTicks is the time since boot in /proc's clock ticks, a tick early
// (a process started after it has a start time no lower); 0 when the
// clock cannot be read (every child is then younger).
func bootTicks() uint64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0
	}
	if t := uint64(ts.Nano()) / uint64(time.Second/userHZ); t > 0 {
		return t - 1
	}
	return 0
}

var _ liverestore.Starter = (*Reaper)(nil)

// Exec runs cmd to its end as a child of the daemon's own (an upgrade's
// preflight, liverestore.Preflight): started through Start, so the reaper neither takes its exit
// status from os/exec nor kills it as a stray while it runs, and forgotten
// once waited for.
func (r *Reaper) Exec(cmd *exec.Cmd) error {
	if err := r.Start(cmd); err != nil {
		return err
	}
	defer r.Done(cmd.Process.Pid)
	return cmd.Wait()
}

// adopt records pid, a child the previous image of this process started
// (an upgrade keeps the children), as one that is waited for elsewhere.
func (r *Reaper) adopt(pid int) {
	if r == nil {
		return
	}
	r.mu.Lock()
	r.managed[pid] = true
	r.mu.Unlock()
}

// Done forgets pid once os/exec's Wait has returned for it.
func (r *Reaper) Done(pid int) {
	if r == nil {
		return
	}
	r.mu.Lock()
	delete(r.managed, pid)
	r.mu.Unlock()
}

// Run reaps adopted orphans on every SIGCHLD, and every few seconds in case
// a signal was coalesced, until ctx ends.
func (r *Reaper) Run(ctx context.Context) error {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGCHLD)
	defer signal.Stop(sig)
	tick := time.NewTicker(5 * time.Second)
	defer tick.Stop()
	for {
		r.Reap()
		select {
		case <-ctx.Done():
			return nil
		case <-sig:
		case <-tick.C:
		}
	}
}

// Reap collects every exited child that os/exec is not waiting for, and
// kills strays that stayed unaccounted for strayGrace.
func (r *Reaper) Reap() int {
	return r.reap(strayGrace)
}

// sweepStrays kills every unaccounted orphan now: after a stop, and at
// shutdown, when no model of the stopped ones may keep a process.
func (r *Reaper) sweepStrays() {
	if r != nil {
		r.reap(0)
	}
}

func (r *Reaper) reap(grace time.Duration) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	seen := map[[2]uint64]bool{}
	for _, pid := range proc.Children(os.Getpid()) {
		if r.managed[pid] {
			continue
		}
		s, err := proc.ReadStat(pid)
		if err != nil || r.mayBeStarting(s.Start) {
			continue
		}
		if s.State != 'Z' {
			if r.accounted != nil && !r.accounted(pid) {
				key := [2]uint64{uint64(pid), s.Start}
				seen[key] = true
				first, ok := r.strays[key]
				if !ok {
					first = r.now()
					r.strays[key] = first
				}
				if r.now().Sub(first) >= grace {
					_ = proc.Signal(pid, s.Start, unix.SIGKILL)
				}
			}
			continue
		}
		var ws unix.WaitStatus
		if got, err := unix.Wait4(pid, &ws, unix.WNOHANG, nil); err == nil && got == pid {
			n++
		}
	}
	for key := range r.strays {
		if !seen[key] {
			delete(r.strays, key)
		}
	}
	return n
}
