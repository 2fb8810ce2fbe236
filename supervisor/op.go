package supervisor

import "citadel-supervisor/supervisor/control/api"

// Op is an operator's operation on models (citadelctl start, stop, restart,
// reset): the control wire's vocabulary, defined once in package api.
type Op = api.Op

// The operations.
const (
	OpStart   = api.OpStart
	OpStop    = api.OpStop
	OpRestart = api.OpRestart
	OpReset   = api.OpReset
	OpSleep   = api.OpSleep
	OpWake    = api.OpWake
)
