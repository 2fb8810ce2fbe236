package gpu

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"

	"citadel-supervisor/supervisor/proc"
)

// descendantProcesses returns a lister of the daemon's descendants with
// their argv and environment, from /proc. Only descendants: daemons (or
// test binaries) running side by side on one host with the same sim UUIDs
// must not count each other's models. Models' orphaned workers stay
// descendants, since the daemon is their subreaper.
func descendantProcesses() func() ([]SimProcess, error) {
	return (&procWalk{root: "/proc", self: os.Getpid()}).descendants
}

// procWalk lists self's descendants under root (a procfs). It keeps the
// argv and CUDA_VISIBLE_DEVICES of the processes that claim sim GPUs, by
// pid and start time, so that a later walk reads only each process's stat
// for them (and returns their environment as that one variable): a
// running model's claim (its --gpu-memory-utilization and
// CUDA_VISIBLE_DEVICES) stays where it was, as a driver keeps a process's
// memory on the GPUs it allocated it on, and reading both files of every
// model at every read was half of a /metrics scrape's time at 200 models.
// A process that claims nothing (yet: a wrapper that has still to exec the
// model) is read again at every walk.
type procWalk struct {
	root string
	self int

	mu      sync.Mutex
	claimed map[procID]SimProcess // claiming descendants seen at the last walk
}

// procID is a process's identity: a pid and its start time.
type procID struct {
	pid   int
	start uint64
}

// descendants walks the parent links of every process under root and
// returns those that descend from self. Processes that exit during the
// walk, and zombies (which hold no GPU memory), are left out.
func (w *procWalk) descendants() ([]SimProcess, error) {
	entries, err := os.ReadDir(w.root)
	if err != nil {
		return nil, err
	}
	children := map[int][]int{}
	zombie := map[int]bool{}
	start := map[int]uint64{}
	buf := make([]byte, 512)
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, b, err := readStat(w.root, pid, buf)
		buf = b
		if err != nil {
			continue // gone meanwhile
		}
		children[st.ppid] = append(children[st.ppid], pid)
		zombie[pid] = st.state == 'Z'
		start[pid] = st.start
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	claimed := map[procID]SimProcess{}
	var out []SimProcess
	queue := slices.Clone(children[w.self])
	for len(queue) > 0 {
		pid := queue[0]
		queue = append(queue[1:], children[pid]...)
		if zombie[pid] {
			continue
		}
		id := procID{pid, start[pid]}
		p, ok := w.claimed[id]
		if !ok {
			args, err := readNulList(w.root, pid, "cmdline")
			if err != nil {
				continue
			}
			env, err := readNulList(w.root, pid, "environ")
			if err != nil {
				continue
			}
			p = SimProcess{PID: pid, Args: args, Env: env}
		}
		if _, _, claims := simClaim(p); claims {
			claimed[id] = claimOnly(p)
		}
		out = append(out, p)
	}
	w.claimed = claimed
	slices.SortFunc(out, func(a, b SimProcess) int { return a.PID - b.PID })
	return out, nil
}

// claimOnly is what is kept of a claiming process: its argv and the
// environment's first CUDA_VISIBLE_DEVICES (the one getenv, and simClaim,
// read), copied out of the whole environment, which is left to the
// garbage collector.
func claimOnly(p SimProcess) SimProcess {
	for _, e := range p.Env {
		if strings.HasPrefix(e, "CUDA_VISIBLE_DEVICES=") {
			return SimProcess{PID: p.PID, Args: p.Args, Env: []string{strings.Clone(e)}}
		}
	}
	return p
}

// procDescendants lists self's descendants under root in one walk, with
// nothing kept from walk to walk.
func procDescendants(root string, self int) ([]SimProcess, error) {
	return (&procWalk{root: root, self: self}).descendants()
}

// statFields is what the sim reads of /proc/PID/stat.
type statFields struct {
	ppid  int
	state byte
	start uint64
}

// readStat reads <root>/PID/stat into buf (grown if it is too small; the
// buffer is returned for the next call) in an open, reads and a close:
// os.ReadFile's two fstat calls and its *os.File cost as much again for a
// file of a few hundred bytes, read for every process on the host at
// every walk.
func readStat(root string, pid int, buf []byte) (statFields, []byte, error) {
	path := root + "/" + strconv.Itoa(pid) + "/stat"
	b, err := proc.ReadSmall(path, buf)
	if err != nil {
		return statFields{}, buf, err
	}
	buf = b[:cap(b)]
	// comm may hold spaces and parentheses: it ends at the last ')'.
	end := bytes.LastIndexByte(b, ')')
	if end < 0 || end+2 >= len(b) {
		return statFields{}, buf, fmt.Errorf("parse %s: malformed", path)
	}
	// Fields from 3 (state) on, space-separated; see proc(5).
	var st statFields
	n := 0
	for f := range bytes.FieldsSeq(b[end+2:]) {
		switch n {
		case 0:
			st.state = f[0]
		case 1:
			ppid, err := strconv.Atoi(string(f))
			if err != nil {
				return statFields{}, buf, fmt.Errorf("parse %s: ppid: %w", path, err)
			}
			st.ppid = ppid
		case 19:
			start, err := strconv.ParseUint(string(f), 10, 64)
			if err != nil {
				return statFields{}, buf, fmt.Errorf("parse %s: start time: %w", path, err)
			}
			st.start = start
			return st, buf, nil
		}
		n++
	}
	return statFields{}, buf, fmt.Errorf("parse %s: %d fields", path, n)
}

// readParent reads the parent pid and state of pid from <root>/PID/stat.
func readParent(root string, pid int) (ppid int, state byte, err error) {
	st, _, err := readStat(root, pid, make([]byte, 512))
	return st.ppid, st.state, err
}

// readNulList reads a NUL-separated list such as /proc/PID/cmdline.
func readNulList(root string, pid int, name string) ([]string, error) {
	b, err := os.ReadFile(root + "/" + strconv.Itoa(pid) + "/" + name)
	if err != nil {
		return nil, err
	}
	if len(b) == 0 {
		return nil, fmt.Errorf("%s/%d/%s: empty (a zombie or a kernel thread)", root, pid, name)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00"), nil
}
