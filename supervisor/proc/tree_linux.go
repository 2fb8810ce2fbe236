package proc

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// pollInterval is how often a stop checks whether the tree is gone.
const pollInterval = 20 * time.Millisecond

// killRounds bounds SIGKILL rounds against a tree that keeps forking.
const killRounds = 50

// KillBound bounds Kill: the SIGKILL rounds, or the wait for an instance's
// cgroup to empty after cgroup.kill. A stop therefore ends within
// stop_timeout + KillBound (+ a sweep), whatever the processes do and
// whether or not /proc can be read.
const KillBound = 10 * time.Second

// Tree tracks every process of one spawned model instance. It is used by one
// goroutine at a time: the model's runner, or the stop it hands off to.
type Tree struct {
	marker  string         // MarkerEnv value of this instance
	main    int            // the process the supervisor spawned
	members map[int]uint64 // pid → start time, everything seen so far
	known   map[int]uint64 // processes already checked for the marker
	seen    map[int]bool   // every member ever, for the GPU release check
	scan    func() ([]int, error)
	cg      *Cgroup       // the instance's cgroup leaf; nil in marker mode
	bound   time.Duration // Kill's bound: KillBound (tests shorten it)
}

// NewTree starts tracking the instance whose main process is mainPID and
// whose processes carry MarkerEnv=marker.
func NewTree(marker string, mainPID int) *Tree {
	t := newTree(marker)
	if s, err := ReadStat(mainPID); err == nil {
		t.members[mainPID] = s.Start
		t.seen[mainPID] = true
	}
	t.main = mainPID
	return t
}

// NewCgroupTree is NewTree for an instance spawned into the cgroup leaf cg:
// every process in cg is a member, whatever it did to escape parent links
// and the marker, and the stop ends with cgroup.kill. With mainPID 0 (an
// instance a previous daemon left) Stop signals every member.
func NewCgroupTree(marker string, mainPID int, cg *Cgroup) *Tree {
	t := NewTree(marker, mainPID)
	t.cg = cg
	t.Refresh()
	return t
}

// Cgroup is the instance's cgroup leaf, nil in marker mode.
func (t *Tree) Cgroup() *Cgroup { return t.cg }

func newTree(marker string) *Tree {
	return &Tree{marker: marker, members: map[int]uint64{}, known: map[int]uint64{}, seen: map[int]bool{}, scan: PIDs, bound: KillBound}
}

// Marked finds every live process whose MarkerEnv value starts with prefix,
// one Tree per value: the instances a previous supervisor of this identity
// left behind when it was killed. They have no main process, so Stop on
// them signals every member.
func Marked(prefix string) (map[string]*Tree, error) {
	pids, err := PIDs()
	if err != nil {
		return nil, err
	}
	groups := map[string]*Tree{}
	for _, pid := range pids {
		v, ok := EnvironValue(pid, MarkerEnv)
		if !ok || !strings.HasPrefix(v, prefix) {
			continue
		}
		st, err := ReadStat(pid)
		if err != nil || st.State == 'Z' {
			continue
		}
		t := groups[v]
		if t == nil {
			t = newTree(v)
			groups[v] = t
		}
		t.members[pid] = st.Start
	}
	return groups, nil
}

// Refresh drops members that are gone and adds their children, recursively.
// A process seen once stays a member (by PID and start time) after its parent
// dies and it is re-parented, so following parent links between refreshes
// keeps even a process that scrubbed its environment.
func (t *Tree) Refresh() {
	if t.cg != nil {
		// The cgroup knows every member; parent links and the marker
		// only add what might be outside it (nothing, unless moved out).
		if pids, err := t.cg.Procs(); err == nil {
			for _, pid := range pids {
				if _, ok := t.members[pid]; ok {
					continue
				}
				if s, err := ReadStat(pid); err == nil && s.State != 'Z' {
					t.members[pid] = s.Start
					t.seen[pid] = true
				}
			}
		}
	}
	queue := make([]int, 0, len(t.members))
	for pid, start := range t.members {
		if !Alive(pid, start) {
			delete(t.members, pid)
			continue
		}
		queue = append(queue, pid)
	}
	for len(queue) > 0 {
		pid := queue[0]
		queue = queue[1:]
		for _, c := range Children(pid) {
			if _, ok := t.members[c]; ok {
				continue
			}
			s, err := ReadStat(c)
			if err != nil || s.State == 'Z' {
				continue
			}
			t.members[c] = s.Start
			t.seen[c] = true
			queue = append(queue, c)
		}
	}
}

// Sweep scans every process for this instance's marker and adds the ones
// found. Each process is read once: the verdict is kept by PID and start.
func (t *Tree) Sweep() error {
	pids, err := t.scan()
	if err != nil {
		return fmt.Errorf("scan processes: %w", err)
	}
	for _, pid := range pids {
		if _, ok := t.members[pid]; ok {
			continue
		}
		s, err := ReadStat(pid)
		if err != nil || s.State == 'Z' {
			continue
		}
		if start, ok := t.known[pid]; ok && start == s.Start {
			continue
		}
		env, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
		if err != nil || len(env) == 0 {
			// Unreadable now, or empty: a kernel thread, or a process
			// in the middle of execve (its environment reads empty for
			// a moment). No verdict is kept; the next sweep reads again.
			continue
		}
		t.known[pid] = s.Start
		if v, ok := lookup(env, MarkerEnv); ok && v == t.marker {
			t.members[pid] = s.Start
			t.seen[pid] = true
		}
	}
	t.Refresh()
	return nil
}

// SeenPIDs returns every process ever known to be this instance's: the
// ones whose GPU memory must be gone before its GPUs are free again.
func (t *Tree) SeenPIDs() []int {
	out := make([]int, 0, len(t.seen))
	for pid := range t.seen {
		out = append(out, pid)
	}
	slices.Sort(out)
	return out
}

// PIDs returns the live members, sorted.
func (t *Tree) PIDs() []int {
	out := make([]int, 0, len(t.members))
	for pid := range t.members {
		out = append(out, pid)
	}
	slices.Sort(out)
	return out
}

func (t *Tree) signalAll(sig unix.Signal) {
	for pid, start := range t.members {
		_ = Signal(pid, start, sig) // gone is fine: that is the goal
	}
}

// Stop ends the instance: SIGTERM to the main process (or, when the main
// process already exited, to what is left), up to grace for everything to
// exit, then Kill. It returns an error only if processes survive Kill,
// naming them, and it returns within grace + KillBound (+ a sweep).
func (t *Tree) Stop(ctx context.Context, grace time.Duration, mainAlive bool) error {
	_ = t.Sweep() // find detached members before anything is re-parented
	if s, ok := t.members[t.main]; mainAlive && ok && t.main != 0 {
		_ = Signal(t.main, s, unix.SIGTERM)
	} else {
		t.signalAll(unix.SIGTERM)
	}
	deadline := time.NewTimer(grace)
	defer deadline.Stop()
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
wait:
	for {
		t.Refresh()
		if t.empty() {
			break
		}
		select {
		case <-tick.C:
		case <-deadline.C:
			break wait
		case <-ctx.Done():
			break wait
		}
	}
	return t.Kill()
}

// empty reports whether nothing of the instance is left: no member, and
// (in cgroup mode) a leaf that cgroup.events says is unpopulated. An
// unreadable cgroup.events is not empty.
func (t *Tree) empty() bool {
	if len(t.members) > 0 {
		return false
	}
	if t.cg == nil {
		return true
	}
	pop, err := t.cg.Populated()
	return err == nil && !pop
}

// Kill SIGKILLs every member until none is left, within KillBound. In
// cgroup mode that is cgroup.kill and a wait for cgroup.events to say
// populated 0, then the leaf is removed; in marker mode, rounds of SIGKILL
// to every member until a fresh sweep finds none.
func (t *Tree) Kill() error {
	ctx, cancel := context.WithTimeout(context.Background(), t.bound)
	defer cancel()
	if t.cg != nil {
		err := t.cg.Kill()
		if err == nil {
			err = t.cg.WaitEmpty(ctx)
		}
		if err != nil {
			return err
		}
		t.Refresh()
		// A member outside the leaf could only have been moved out by
		// root; it still gets the marker rounds below.
		if len(t.members) == 0 {
			return t.cg.Remove()
		}
	}
	for range killRounds {
		if ctx.Err() != nil {
			break
		}
		_ = t.Sweep()
		if len(t.members) == 0 {
			// A child forked while its parent was killed may not have
			// been listed yet: only a second empty sweep is the end.
			<-time.After(pollInterval)
			if _ = t.Sweep(); len(t.members) == 0 {
				return nil
			}
		}
		// Freeze first: a stopped process cannot fork, so a chain that
		// forks and exits (pid hopping) holds still until the sweep has
		// seen all of it.
		for range 5 {
			n := len(t.members)
			t.signalAll(unix.SIGSTOP)
			_ = t.Sweep()
			if len(t.members) == n {
				break
			}
		}
		t.signalAll(unix.SIGKILL)
		// SIGKILL is delivered before the syscall returns, but the process
		// is only gone once it has run its exit path.
		for range 50 {
			t.Refresh()
			if len(t.members) == 0 {
				break
			}
			select {
			case <-ctx.Done():
			case <-time.After(pollInterval):
			}
			if ctx.Err() != nil {
				break
			}
		}
	}
	_ = t.Sweep()
	if len(t.members) == 0 {
		return nil
	}
	var names []string
	for _, pid := range t.PIDs() {
		if s, err := ReadStat(pid); err == nil {
			names = append(names, fmt.Sprintf("%d (%s, state %c)", pid, s.Comm, s.State))
		} else {
			names = append(names, fmt.Sprintf("%d (%v)", pid, err))
		}
	}
	return fmt.Errorf("processes survived SIGKILL: %s", strings.Join(names, ", "))
}
