package supervisor

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"citadel-supervisor/probe"
	"citadel-supervisor/supervisor/proc"
)

// FDStore keeps descriptors past the daemon's death: systemd's file
// descriptor store (FDSTORE=1). The daemon puts each model's output pipes
// there, so a model whose daemon died keeps writing into a pipe someone
// holds (no SIGPIPE, nothing lost up to the pipe's buffer), and the next
// daemon is handed the pipe back and reads on.
type FDStore interface {
	// Store keeps f under name (letters, digits, '@', '.', '-', '_').
	Store(name string, f *os.File) error
	// Remove forgets name.
	Remove(name string) error
	// Take returns the descriptor handed back under name at start, once.
	Take(name string) *os.File
	// Rest returns the names of the descriptors handed back and never
	// taken.
	Rest() []string
}

// records keeps one file per live instance (InstanceState) next to the
// control socket: what a successor needs to tell a predecessor's process
// from a stranger's, and whether its configuration is still the same.
type records struct{ dir string }

func (rs records) path(key string) string { return filepath.Join(rs.dir, key+".json") }

// key is an instance's record, leaf and descriptor-store name:
// <model>@<token>, the token being the marker's random part.
func instanceKey(marker string) string {
	parts := strings.Split(marker, "/")
	if len(parts) != 3 {
		return strings.ReplaceAll(marker, "/", "@")
	}
	return parts[1] + "@" + parts[2]
}

func (rs records) write(is InstanceState) error {
	if rs.dir == "" {
		return nil
	}
	if err := os.MkdirAll(rs.dir, 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(is)
	if err != nil {
		return err
	}
	// A temporary file of its own: two writers of one record (the runner,
	// a sleep about to begin) never rename each other's file away.
	p := rs.path(instanceKey(is.Marker))
	f, err := os.CreateTemp(rs.dir, filepath.Base(p)+".*.tmp")
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		_ = os.Remove(f.Name())
	}
	return err
}

func (rs records) remove(marker string) {
	if rs.dir != "" {
		_ = os.Remove(rs.path(instanceKey(marker)))
	}
}

// all reads every record, by key.
func (rs records) all() (map[string]InstanceState, error) {
	out := map[string]InstanceState{}
	if rs.dir == "" {
		return out, nil
	}
	ents, err := os.ReadDir(rs.dir)
	if errors.Is(err, os.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return out, err
	}
	var errs []error
	for _, e := range ents {
		key, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok {
			_ = os.Remove(filepath.Join(rs.dir, e.Name())) // a write cut short
			continue
		}
		b, err := os.ReadFile(filepath.Join(rs.dir, e.Name()))
		var is InstanceState
		if err == nil {
			err = json.Unmarshal(b, &is)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("instance record %s: %w", e.Name(), err))
			continue
		}
		out[key] = is
	}
	return out, errors.Join(errs...)
}

// storeOutput puts an instance's output pipes in the descriptor store.
func (d *deps) storeOutput(marker string, out, errp *os.File) {
	if d.fdstore == nil {
		return
	}
	key := instanceKey(marker)
	for suffix, f := range map[string]*os.File{".out": out, ".err": errp} {
		if err := d.fdstore.Store(key+suffix, f); err != nil {
			d.log.Warn("cannot keep a model's output pipe in systemd's descriptor store: after a daemon crash its output is lost until it restarts",
				zap.String("instance", key), zap.Error(err))
			return
		}
	}
}

// forgetInstance drops what outlived an instance: its record and its pipes
// in the descriptor store.
func (d *deps) forgetInstance(marker string) {
	d.records.remove(marker)
	if d.fdstore != nil {
		key := instanceKey(marker)
		_ = d.fdstore.Remove(key + ".out")
		_ = d.fdstore.Remove(key + ".err")
	}
}

// adoptInstance takes over a process tree a predecessor started. child
// says it is this process's child (an upgrade keeps the PID): its exit is
// waited for and known; otherwise (a crash) its end is seen through a
// pidfd and its exit status is unknown. out and errp are its output pipes,
// nil when lost.
func (r *runner) adoptInstance(is InstanceState, child bool, tree processTree, out, errp *os.File) (*instance, error) {
	done := make(chan struct{})
	inst := &instance{
		pid: is.PID, start: is.Start, marker: is.Marker, digest: is.Digest,
		tree: tree, started: is.Started, gpus: is.GPUs,
		deep: &probe.Deep{Now: r.d.now},
		done: done,
		kill: func() error { return proc.Signal(is.PID, is.Start, unix.SIGKILL) },
	}
	if child {
		r.d.reaper.adopt(is.PID)
		// A zombie is taken too: it exited across the exec, and only this
		// process can say how (nothing reaps a child it has not waited
		// for, so its PID is not reused meanwhile).
		if st, err := proc.ReadStat(is.PID); err != nil || st.Start != is.Start {
			r.d.reaper.Done(is.PID)
			return nil, cmp.Or(err, proc.ErrGone)
		}
		go func() {
			awaitExit(is.PID, is.Start)
			var ws unix.WaitStatus
			_, err := waitPID(is.PID, &ws)
			r.d.reaper.Done(is.PID)
			inst.exit = describeWait(ws, err)
			close(done)
		}()
	} else {
		inst.adopted = true
		gone, err := proc.Exited(is.PID, is.Start)
		if err != nil {
			return nil, err
		}
		go func() {
			<-gone
			inst.exit = exitInfo{code: -1, desc: "exit status unknown (adopted from a previous daemon)"}
			close(done)
		}()
	}
	if out != nil {
		inst.stdout = out
		go r.capture(out, "stdout")
	}
	if errp != nil {
		inst.stderr = errp
		go r.capture(errp, "stderr")
	}
	if cgt, ok := tree.(*proc.Tree); ok && cgt.Cgroup() != nil {
		r.cg.Store(cgt.Cgroup())
	}
	marker := is.Marker
	r.marker.Store(&marker)
	if is.EnvDigest != "" {
		d := is.EnvDigest
		r.envDigest.Store(&d)
	}
	r.hostHeld.Store(is.HostHeld)
	r.publishPIDs(tree)
	return inst, nil
}

// awaitExit returns once the child pid (started at start) has exited, and
// leaves it to be reaped. It parks on the runtime's poller, where a pidfd
// polls readable at the process's exit: a wait4 or os/exec's Wait blocks
// an OS thread until the child exits, one thread per model for as long as
// it runs. Where no pidfd can be had, it returns at once and the caller's
// wait blocks as before.
func awaitExit(pid int, start uint64) {
	if gone, err := proc.Exited(pid, start); err == nil {
		<-gone
	}
}

// waitPID waits for a child, retrying on EINTR.
func waitPID(pid int, ws *unix.WaitStatus) (int, error) {
	for {
		got, err := unix.Wait4(pid, ws, 0, nil)
		if !errors.Is(err, unix.EINTR) {
			return got, err
		}
	}
}

func describeWait(ws unix.WaitStatus, err error) exitInfo {
	switch {
	case err != nil:
		return exitInfo{code: -1, desc: fmt.Sprintf("exit status unknown (%v)", err)}
	case ws.Signaled():
		return exitInfo{code: 128 + int(ws.Signal()), desc: "killed by " + unix.SignalName(ws.Signal())}
	}
	return exitInfo{code: ws.ExitStatus(), desc: fmt.Sprintf("exit code %d", ws.ExitStatus())}
}
