//go:build !linux

package gpu

import "errors"

// descendantProcesses needs /proc: the sim backend derives usage from the
// process table only on Linux.
func descendantProcesses() func() ([]SimProcess, error) {
	return func() ([]SimProcess, error) {
		return nil, errors.New("the sim backend reads the process table from /proc, which needs Linux")
	}
}

func simAlive(int, uint64) bool { return false }

// SimProcStart needs /proc.
func SimProcStart(int) (uint64, byte, error) {
	return 0, 0, errors.New("the sim ledger reads /proc, which needs Linux")
}

func simLock(string) (func(), error) {
	return nil, errors.New("the sim ledger needs Linux")
}
