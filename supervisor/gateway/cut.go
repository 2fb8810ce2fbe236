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

// cutter knows the requests Cut would end.
type cutter struct {
	mu   sync.Mutex
	live map[*cutReq]struct{}
}

// cutReq is one request's hold on its context's end.
type cutReq struct {
	c      *cutter
	cancel context.CancelCauseFunc
}

func newCutter() *cutter { return &cutter{live: map[*cutReq]struct{}{}} }

// cuttable derives a request's context that Cut ends (with cause errCut);
// release when the request is done.
func (c *cutter) cuttable(parent context.Context) (context.Context, *cutReq) {
	ctx, cancel := context.WithCancelCause(parent)
	q := &cutReq{c: c, cancel: cancel}
	c.mu.Lock()
	c.live[q] = struct{}{}
	c.mu.Unlock()
	return ctx, q
}

// release ends the request's context: it is done.
func (q *cutReq) release() {
	q.c.mu.Lock()
	delete(q.c.live, q)
	q.c.mu.Unlock()
	q.cancel(nil)
}

// Cut ends every request in flight or waiting: a stream with an error
// event and [DONE], a request with no answer yet with 503 and
// Retry-After; an answer already under way is cut. Requests that come
// after it are served as usual (an upgrade that fails resumes serving).
func (g *Gateway) Cut() {
	c := g.cut
	c.mu.Lock()
	live := c.live
	c.live = map[*cutReq]struct{}{}
	c.mu.Unlock()
	for q := range live {
		q.cancel(errCut)
	}
}

// wasCut reports whether ctx was ended by Cut.
func wasCut(ctx context.Context) bool { return errors.Is(context.Cause(ctx), errCut) }

func errUpgrading() *apiError {
	return &apiError{status: http.StatusServiceUnavailable, typ: "server_error", code: "gateway_upgrading",
		msg: "the gateway is being upgraded in place and ended this request past its drain bound; retry", retryAfter: retryBusy}
}
