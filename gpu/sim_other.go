//go:build !linux

package gpu

import "errors"

// descendantProcesses needs /proc: the sim backend derives usage from the
// process table only on Linux.
func descendantProcesses() ([]SimProcess, error) {
	return nil, errors.New("the sim backend reads the process table from /proc, which needs Linux")
}
