package supervisor

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/supervisor/proc"
)

// processTree is what a runner needs of one spawned instance's processes
// (implemented by proc.Tree, on Linux by reading /proc). One goroutine uses
// it at a time: the runner, or the stop it hands the instance to.
//
//   - Refresh follows parent links from the known members, adds their new
//     children and drops members that are gone. A process once seen stays
//     known after it is re-parented. Cheap: called on every probe tick.
//   - PIDs returns the live members as of the last Refresh or Stop, sorted.
//   - SeenPIDs returns every process ever a member, also gone ones, sorted:
//     the ones whose GPU memory must be gone before the GPUs are free.
//   - Stop ends the instance: it first sweeps the process table for the
//     instance's marker, then SIGTERMs the main process (every member when
//     mainAlive is false), waits up to grace, and SIGKILLs everything it
//     finds until a sweep finds nothing. It blocks that long, so it runs
//     off the deciding goroutine; it returns an error only when processes
//     survive every SIGKILL round, naming them.
type processTree interface {
	Refresh()
	PIDs() []int
	SeenPIDs() []int
	Stop(ctx context.Context, grace time.Duration, mainAlive bool) error
}

var _ processTree = (*proc.Tree)(nil)

// reapBound bounds the wait for the main process's reaping once its tree
// is stopped, so a stop ends within stop_timeout + proc.KillBound + twice
// this, whatever /proc answers.
const reapBound = 3 * time.Second

// stopInstance stops inst's tree, kills the orphans no model accounts for
// (see Reaper.KillStrays), and waits, bounded, for the main process to be
// reaped. If the tree could not see the main process die (/proc
// unreadable, say), it is SIGKILLed through its pidfd rather than waited
// for forever.
func (r *runner) stopInstance(inst *instance, grace time.Duration, mainAlive bool) error {
	err := inst.tree.Stop(context.Background(), grace, mainAlive && !inst.exited())
	r.d.reaper.sweepStrays()
	for round := range 2 {
		t := time.NewTimer(reapBound)
		select {
		case <-inst.done:
			t.Stop()
			return err
		case <-t.C:
		}
		if round == 0 && inst.kill != nil {
			r.log.Warn("main process still running after its stop; killing it", zap.Int("pid", inst.PID))
			_ = inst.kill()
		}
	}
	return errors.Join(err, fmt.Errorf("main process %d not reaped within %s of its stop", inst.PID, 2*reapBound))
}

// StopOverhead is what a stop may take beyond its stop_timeout: the kill
// bound and the bounded waits for the main process's reaping.
const StopOverhead = proc.KillBound + 2*reapBound
