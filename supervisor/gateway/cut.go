package gateway

import (
	"context"
	"errors"
	"net/http"
	"sync"
)

// An upgrade in place lets the requests in flight finish within its drain
// bound, then executes the new image, which closes every client
// connection the old one held. A stream still running at the bound would
// end mid-event, and a request still waiting in a queue would get nothing:
// the client could not tell an upgrade from a crash. Cut ends them first,
// as the gateway ends a stream whose model died (an error event, then
// [DONE]), with a reason that says to retry.

// errCut is the cause of a request ended by Cut.
var errCut = errors.New("the gateway is being upgraded")

// cutter is the context every request's own derives from, for Cut.
type cutter struct {
	mu     sync.Mutex
	ctx    context.Context
	cancel context.CancelFunc
}

func newCutter() *cutter {
	c := &cutter{}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	return c
}

// cuttable derives a request's context that Cut ends (with cause errCut);
// release when the request is done.
func (c *cutter) cuttable(parent context.Context) (context.Context, func()) {
	ctx, cancel := context.WithCancelCause(parent)
	c.mu.Lock()
	all := c.ctx
	c.mu.Unlock()
	stop := context.AfterFunc(all, func() { cancel(errCut) })
	return ctx, func() { stop(); cancel(nil) }
}

// Cut ends every request in flight or waiting: a stream with an error
// event and [DONE], a request with no answer yet with 503 and
// Retry-After; an answer already under way is cut. Requests that come
// after it are served as usual (an upgrade that fails resumes serving).
func (g *Gateway) Cut() {
	c := g.cut
	c.mu.Lock()
	cancel := c.cancel
	c.ctx, c.cancel = context.WithCancel(context.Background())
	c.mu.Unlock()
	cancel()
}

// wasCut reports whether ctx was ended by Cut.
func wasCut(ctx context.Context) bool { return errors.Is(context.Cause(ctx), errCut) }

func errUpgrading() *apiError {
	return &apiError{status: http.StatusServiceUnavailable, typ: "server_error", code: "gateway_upgrading",
		msg: "the gateway is being upgraded in place and ended this request past its drain bound; retry", retryAfter: retryBusy}
}
