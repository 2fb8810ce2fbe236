package gateway

import (
	"context"
	"fmt"
)

// Drain stops admitting requests to model and returns once none is in
// flight (or ctx ends): the supervisor calls it before it puts an on-demand
// model to sleep, since vLLM must never be told to sleep with requests in
// flight, nor be sent one while asleep. seq is the Seq of the model's
// state that announced the sleep: no older state reopens the door, and the
// model's next state (awake again, or still asleep) decides.
func (g *Gateway) Drain(ctx context.Context, model string, seq uint64) error {
	rt := g.table.Load().byName[model]
	if rt == nil {
		return nil // not routed: nothing in flight
	}
	return rt.up.adm.drain(ctx, seq, fmt.Sprintf("model %s is going to sleep", model))
}

// InFlight is the number of requests model is serving.
func (g *Gateway) InFlight(model string) int {
	rt := g.table.Load().byName[model]
	if rt == nil {
		return 0
	}
	n, _ := rt.up.adm.load()
	return n
}

// Waiting is the number of requests waiting in model's queue (for a slot,
// or for the model to be ready).
func (g *Gateway) Waiting(model string) int {
	rt := g.table.Load().byName[model]
	if rt == nil {
		return 0
	}
	_, n := rt.up.adm.load()
	return n
}
