package supervisor

import (
	"context"
	"time"

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
