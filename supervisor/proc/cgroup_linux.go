package proc

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Cgroups is the daemon's own cgroup v2 subtree: one leaf per model
// instance, created before the spawn, so the child is cloned straight into
// it (CLONE_INTO_CGROUP) and every process it ever starts stays in it,
// whatever it does to its environment, process group, parent or dumpable
// flag. A leaf is ended with cgroup.kill, which the kernel applies to every
// member at once, so a process that keeps forking cannot slip between
// rounds of signals.
type Cgroups struct {
	// Root is the directory holding the instances' leaves.
	Root string
	// Delegated is true when the daemon moved itself into a leaf of its
	// own (a systemd unit with Delegate=yes): cgroup v2 allows processes
	// only in leaves once controllers are enabled for children.
	Delegated bool
}

// ErrNoCgroups means no writable cgroup v2 hierarchy is available.
var ErrNoCgroups = errors.New("no writable cgroup v2 hierarchy")

// cgroup2Mount finds where cgroup v2 is mounted: /sys/fs/cgroup on unified
// hosts, /sys/fs/cgroup/unified on hybrid ones.
func cgroup2Mount() (string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// "36 35 0:30 / /sys/fs/cgroup rw,... - cgroup2 cgroup2 rw"
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		if fields := strings.Fields(post); len(fields) > 0 && fields[0] == "cgroup2" {
			if pf := strings.Fields(pre); len(pf) >= 5 {
				return pf[4], nil
			}
		}
	}
	return "", fmt.Errorf("%w: cgroup2 is not mounted", ErrNoCgroups)
}

// ownCgroup is this process's cgroup v2 path ("0::/system.slice/x.service").
func ownCgroup() (string, error) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return "", fmt.Errorf("read /proc/self/cgroup: %w", err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return p, nil
		}
	}
	return "", fmt.Errorf("%w: no cgroup v2 entry in /proc/self/cgroup", ErrNoCgroups)
}

// OpenCgroups prepares the daemon's subtree "<own cgroup>/citadel-<id>".
//
// With delegate (a systemd unit with Delegate=yes owns its cgroup and lets
// the daemon manage below it), the daemon first moves itself into
// "<own cgroup>/supervisor": cgroup v2's "no internal processes" rule
// forbids enabling controllers for children of a cgroup that has processes.
// Without, it creates its subtree where it is (as root, in the root cgroup
// of a host, or in a cgroup it was given); the kernel's core files
// (cgroup.kill, cgroup.events, cpu.stat) work without any controller.
// Controllers (memory, cpu, pids) are enabled where the parent offers them,
// for the leaves' memory.current; their absence is not an error.
func OpenCgroups(id string, delegate bool) (*Cgroups, error) {
	mount, err := cgroup2Mount()
	if err != nil {
		return nil, err
	}
	own, err := ownCgroup()
	if err != nil {
		return nil, err
	}
	base := filepath.Join(mount, own)
	if _, err := os.Stat(filepath.Join(base, "cgroup.kill")); err != nil && own != "/" {
		// The root cgroup has no cgroup.kill of its own; others must.
		return nil, fmt.Errorf("%w: %s has no cgroup.kill (kernel before 5.14?)", ErrNoCgroups, base)
	}
	c := &Cgroups{Root: filepath.Join(base, "citadel-"+id)}
	if delegate && own != "/" {
		leaf := filepath.Join(base, "supervisor")
		if err := os.Mkdir(leaf, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return nil, fmt.Errorf("%w: %v", ErrNoCgroups, err)
		}
		if err := os.WriteFile(filepath.Join(leaf, "cgroup.procs"), []byte(strconv.Itoa(os.Getpid())), 0); err != nil {
			return nil, fmt.Errorf("%w: move the daemon into %s: %v", ErrNoCgroups, leaf, err)
		}
		c.Delegated = true
		enableControllers(base)
	}
	if err := os.Mkdir(c.Root, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("%w: %v", ErrNoCgroups, err)
	}
	if _, err := os.Stat(filepath.Join(c.Root, "cgroup.kill")); err != nil {
		return nil, fmt.Errorf("%w: %s has no cgroup.kill (kernel before 5.14?)", ErrNoCgroups, c.Root)
	}
	enableControllers(c.Root)
	// Prove a leaf can be made and removed before promising cgroups.
	probe, err := c.New("probe-" + strconv.Itoa(os.Getpid()))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoCgroups, err)
	}
	err = cloneInto(probe)
	if rerr := probe.Remove(); err == nil && rerr != nil {
		err = rerr
	}
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoCgroups, err)
	}
	return c, nil
}

// cloneInto proves a child can be cloned into g (clone3 with
// CLONE_INTO_CGROUP). A seccomp filter may answer clone3 with ENOSYS:
// systemd does under RestrictNamespaces=, since it cannot inspect clone3's
// flags; every spawn would then fail, so the daemon must know at start.
func cloneInto(g *Cgroup) error {
	bin, err := exec.LookPath("true")
	if err != nil {
		return nil // nothing to try with; the first spawn will say
	}
	fd, err := g.OpenFD()
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	cmd := exec.Command(bin)
	cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("clone into %s: %w (a seccomp filter such as systemd's RestrictNamespaces= blocks clone3)", g.Path, err)
	}
	_ = cmd.Wait()
	return nil
}

// enableControllers enables, in dir's subtree_control, the controllers the
// leaves' accounting uses, where dir offers them. Best effort.
func enableControllers(dir string) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
	if err != nil {
		return
	}
	for _, c := range strings.Fields(string(b)) {
		if c == "memory" || c == "cpu" || c == "pids" {
			_ = os.WriteFile(filepath.Join(dir, "cgroup.subtree_control"), []byte("+"+c), 0)
		}
	}
}

// New creates the leaf name under the root.
func (c *Cgroups) New(name string) (*Cgroup, error) {
	p := filepath.Join(c.Root, name)
	if err := os.Mkdir(p, 0o755); err != nil {
		return nil, fmt.Errorf("create cgroup %s: %w", p, err)
	}
	return &Cgroup{Path: p}, nil
}

// Leaves lists the leaves under the root: after a daemon crash, the
// instances its predecessor left, found by cgroup, not by marker.
func (c *Cgroups) Leaves() ([]*Cgroup, error) {
	ents, err := os.ReadDir(c.Root)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", c.Root, err)
	}
	var out []*Cgroup
	for _, e := range ents {
		if e.IsDir() {
			out = append(out, &Cgroup{Path: filepath.Join(c.Root, e.Name())})
		}
	}
	return out, nil
}

// Holds reports whether pid is in one of the leaves (false when it cannot
// tell).
func (c *Cgroups) Holds(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		return false
	}
	mount, err := cgroup2Mount()
	if err != nil {
		return false
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if p, ok := strings.CutPrefix(line, "0::"); ok {
			return strings.HasPrefix(filepath.Join(mount, p), c.Root+"/")
		}
	}
	return false
}

// Cgroup is one instance's leaf.
type Cgroup struct {
	Path string

	// noMemory is set once the leaf has shown it has no memory.current
	// (the memory controller is not enabled for it, as on a host whose
	// memory controller is bound to cgroup v1): each scrape would
	// otherwise try to open it again. Controllers are enabled for the
	// leaves before they are created; one enabled later is not seen until
	// the model's next instance, whose resident memory is the sum of its
	// processes' meanwhile.
	noMemory atomic.Bool

	// kept holds the accounting files open from one read to the next (a
	// read at offset 0 has the kernel write them anew): opening and
	// closing cpu.stat costs some six times reading it, for every model
	// at every /metrics scrape. Built at the first read; closed by Remove,
	// or once the Cgroup is dropped.
	kept atomic.Pointer[keptFiles]
}

// keptFiles are a leaf's open accounting files.
type keptFiles struct {
	mu      sync.Mutex
	fds     [2]int // keptCPU, keptMemory: the descriptor + 1, 0 while closed
	removed bool   // the leaf is gone: nothing is opened again
}

// The files kept open, and their names.
const (
	keptCPU = iota
	keptMemory
)

var keptNames = [...]string{keptCPU: "cpu.stat", keptMemory: "memory.current"}

func (k *keptFiles) close() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.closeLocked()
}

func (k *keptFiles) closeLocked() {
	for i, fd := range k.fds {
		if fd != 0 {
			unix.Close(fd - 1) //nolint:errcheck // read-only
			k.fds[i] = 0
		}
	}
}

// keptFiles returns g's kept files, made at the first call.
func (g *Cgroup) keptFiles() *keptFiles {
	if k := g.kept.Load(); k != nil {
		return k
	}
	k := &keptFiles{}
	if !g.kept.CompareAndSwap(nil, k) {
		return g.kept.Load()
	}
	runtime.AddCleanup(g, (*keptFiles).close, k)
	return k
}

// readKept reads one of the leaf's accounting files into buf (grown if
// too small) through its kept descriptor, opened at the first read and
// again after a failed one.
func (g *Cgroup) readKept(which int, buf []byte) ([]byte, error) {
	k := g.keptFiles()
	k.mu.Lock()
	defer k.mu.Unlock()
	path := filepath.Join(g.Path, keptNames[which])
	if k.removed {
		return nil, &fs.PathError{Op: "open", Path: path, Err: unix.ENOENT}
	}
	if k.fds[which] == 0 {
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, &fs.PathError{Op: "open", Path: path, Err: err}
		}
		k.fds[which] = fd + 1
	}
	fd := k.fds[which] - 1
	b, err := preadSmall(fd, buf)
	if err != nil {
		unix.Close(fd) //nolint:errcheck // read-only
		k.fds[which] = 0
		return nil, &fs.PathError{Op: "read", Path: path, Err: err}
	}
	return b, nil
}

// OpenFD opens the leaf for clone3's CLONE_INTO_CGROUP
// (syscall.SysProcAttr.CgroupFD). The caller closes it after the spawn.
func (g *Cgroup) OpenFD() (int, error) {
	fd, err := unix.Open(g.Path, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open cgroup %s: %w", g.Path, err)
	}
	return fd, nil
}

// Procs lists the leaf's processes.
func (g *Cgroup) Procs() ([]int, error) {
	b, err := os.ReadFile(filepath.Join(g.Path, "cgroup.procs"))
	if err != nil {
		return nil, fmt.Errorf("read %s/cgroup.procs: %w", g.Path, err)
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if pid, err := strconv.Atoi(f); err == nil {
			out = append(out, pid)
		}
	}
	return out, nil
}

// Populated reads cgroup.events: whether any process is left. A leaf that
// is gone is empty.
func (g *Cgroup) Populated() (bool, error) {
	b, err := os.ReadFile(filepath.Join(g.Path, "cgroup.events"))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read %s/cgroup.events: %w", g.Path, err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "populated "); ok {
			return v != "0", nil
		}
	}
	return false, fmt.Errorf("read %s/cgroup.events: no populated line", g.Path)
}

// Kill SIGKILLs every process in the leaf at once (cgroup.kill), also ones
// forked while the kill runs.
func (g *Cgroup) Kill() error {
	err := os.WriteFile(filepath.Join(g.Path, "cgroup.kill"), []byte("1"), 0)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("kill cgroup %s: %w", g.Path, err)
	}
	return nil
}

// WaitEmpty waits until cgroup.events says populated 0, or ctx ends. A
// read error is not "empty": it is returned when ctx ends.
func (g *Cgroup) WaitEmpty(ctx context.Context) error {
	tick := time.NewTicker(pollInterval)
	defer tick.Stop()
	for {
		pop, err := g.Populated()
		if err == nil && !pop {
			return nil
		}
		select {
		case <-ctx.Done():
			if err != nil {
				return err
			}
			pids, _ := g.Procs()
			return fmt.Errorf("cgroup %s still holds %v: %w", g.Path, pids, ctx.Err())
		case <-tick.C:
		}
	}
}

// Remove deletes the leaf; it must be empty. Gone already is fine. Its
// kept accounting files are closed first, and not opened again once it is
// gone.
func (g *Cgroup) Remove() error {
	k := g.keptFiles()
	k.mu.Lock()
	defer k.mu.Unlock()
	// Closed under the lock the rmdir holds too: a read in between would
	// open them again, left open on a leaf removed.
	k.closeLocked()
	if err := unix.Rmdir(g.Path); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("remove cgroup %s: %w", g.Path, err)
	}
	k.removed = true
	return nil
}

// MemoryBytes is the leaf's memory.current, when the memory controller is
// enabled for it.
func (g *Cgroup) MemoryBytes() (int64, bool) {
	if g.noMemory.Load() {
		return 0, false
	}
	var buf [64]byte
	b, err := g.readKept(keptMemory, buf[:])
	if errors.Is(err, fs.ErrNotExist) {
		g.noMemory.Store(true)
	}
	if err != nil {
		return 0, false
	}
	v, err := strconv.ParseInt(string(bytes.TrimSpace(b)), 10, 64)
	return v, err == nil
}

// CPUSeconds is the leaf's cpu.stat usage_usec: all CPU time of every
// process that ever ran in it, exited ones included, so it never goes back.
func (g *Cgroup) CPUSeconds() (float64, bool) {
	var buf [512]byte
	b, err := g.readKept(keptCPU, buf[:])
	if err != nil {
		return 0, false
	}
	for line := range bytes.SplitSeq(b, []byte("\n")) {
		if v, ok := bytes.CutPrefix(line, []byte("usage_usec ")); ok {
			n, err := strconv.ParseUint(string(v), 10, 64)
			return float64(n) / 1e6, err == nil
		}
	}
	return 0, false
}

// Close removes the root once every leaf is gone (a clean shutdown); a
// root that still holds leaves stays, for the next daemon to find.
func (c *Cgroups) Close() error {
	leaves, err := c.Leaves()
	if err != nil || len(leaves) > 0 {
		return err
	}
	return (&Cgroup{Path: c.Root}).Remove()
}

// FindCgroups returns the subtree OpenCgroups(id, false) would use, if it
// exists, without creating anything: for tools and tests that clean up
// after a daemon that was killed.
func FindCgroups(id string) (*Cgroups, bool) {
	mount, err := cgroup2Mount()
	if err != nil {
		return nil, false
	}
	own, err := ownCgroup()
	if err != nil {
		return nil, false
	}
	// From the daemon's own leaf, or from systemd's control processes
	// (ExecStopPost) in a delegated unit: the subtree is the unit's.
	if b := filepath.Base(own); b == "supervisor" || b == ".control" {
		own = filepath.Dir(own)
	}
	root := filepath.Join(mount, own, "citadel-"+id)
	if _, err := os.Stat(root); err != nil {
		return nil, false
	}
	return &Cgroups{Root: root}, true
}
