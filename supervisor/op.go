package supervisor

// Op is an operator's operation on models (citadelctl start, stop, restart,
// reset).
type Op string

// The operations.
const (
	OpStart   Op = "start"
	OpStop    Op = "stop"
	OpRestart Op = "restart"
	OpReset   Op = "reset"
)

// Ops lists every operation.
var Ops = []Op{OpStart, OpStop, OpRestart, OpReset}
