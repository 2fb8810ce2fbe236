package supervisor

import (
	"cmp"
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"citadel-supervisor/probe"
	"citadel-supervisor/supervisor/lifecycle"
	"citadel-supervisor/supervisor/liverestore"
	"citadel-supervisor/supervisor/proc"
)

// records are the live instances' records (liverestore.Records).
type records struct{ liverestore.Records }

func (rs records) write(is liverestore.InstanceState) error { return rs.Write(is) }

// keep is what the daemon keeps for its successor (liverestore.Keep).
func (d *deps) keep() liverestore.Keep {
	return liverestore.Keep{Records: d.records.Records, FDStore: d.fdstore, Log: d.log}
}

// storeOutput puts an instance's output pipes in the descriptor store.
func (d *deps) storeOutput(marker string, out, errp *os.File) {
	d.keep().StoreOutput(marker, out, errp)
}

// forgetInstance drops what outlived an instance: its record and its pipes
// in the descriptor store.
func (d *deps) forgetInstance(marker string) { d.keep().Forget(marker) }

// adoptInstance takes over a process tree a predecessor started. child
// says it is this process's child (an upgrade keeps the PID): its exit is
// waited for and known; otherwise (a crash) its end is seen through a
// pidfd and its exit status is unknown. out and errp are its output pipes,
// nil when lost.
func (r *runner) adoptInstance(is liverestore.InstanceState, child bool, tree processTree, out, errp *os.File) (*instance, error) {
	done := make(chan struct{})
	inst := &instance{
		Instance: lifecycle.Instance{PID: is.PID, Started: is.Started, GPUs: is.GPUs},
		start:    is.Start, marker: is.Marker, digest: is.Digest,
		tree: tree,
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
			inst.Exit = describeWait(ws, err)
			close(done)
		}()
	} else {
		inst.Adopted = true
		gone, err := proc.Exited(is.PID, is.Start)
		if err != nil {
			return nil, err
		}
		go func() {
			<-gone
			inst.Exit = lifecycle.Exit{Code: -1, Desc: "exit status unknown (adopted from a previous daemon)"}
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

func describeWait(ws unix.WaitStatus, err error) lifecycle.Exit {
	switch {
	case err != nil:
		return lifecycle.Exit{Code: -1, Desc: fmt.Sprintf("exit status unknown (%v)", err)}
	case ws.Signaled():
		return lifecycle.Exit{Code: 128 + int(ws.Signal()), Desc: "killed by " + unix.SignalName(ws.Signal())}
	}
	return lifecycle.Exit{Code: ws.ExitStatus(), Desc: fmt.Sprintf("exit code %d", ws.ExitStatus())}
}
