package supervisor

import (
	"context"

	"citadel-supervisor/supervisor/control/api"
)

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

type actorKey struct{}

// WithActor says who asks for the operations Do runs with ctx ("uid 1000
// (pid 4242)"): the control socket knows its peer; each model's status
// names who last changed it (Status.LastOp).
func WithActor(ctx context.Context, who string) context.Context {
	return context.WithValue(ctx, actorKey{}, who)
}

func actorOf(ctx context.Context) string {
	s, _ := ctx.Value(actorKey{}).(string)
	return s
}
