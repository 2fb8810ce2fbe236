package gateway

import (
	"errors"
	"io"
	"net/http"
	"os"
	"time"
)

// A request body must keep arriving: a client that names its model and
// then goes silent must not hold anything for as long as its connection
// stays open. Two bounds, as nginx (client_body_timeout) and Apache
// (mod_reqtimeout's body=…,MinRate=…) have them:
//   - idle: no byte for gateway.body_timeout → 408;
//   - rate: once the first body_timeout has passed, the body must average
//     gateway.min_body_rate bytes per second → 408. A body of N bytes thus
//     has body_timeout + N/min_body_rate to arrive, however it trickles.
//
// The answer has its own bound, gateway.send_timeout (nginx's
// send_timeout): a client that reads nothing for that long is cut, so a
// reader that stops reading cannot hold a model's slot either.
//
// The bounds are the connection's read and write deadlines, set through
// http.ResponseController before each read and write.

// Why a body stalled: the values of citadel_gateway_client_stalls_total's
// reason.
const (
	StallBodyIdle = "body_idle" // no byte of the body for body_timeout
	StallBodyRate = "body_rate" // the body arrived slower than min_body_rate
	StallSend     = "send"      // the client read nothing of its answer for send_timeout
)

// readBounds are a request body's time bounds.
type readBounds struct {
	idle time.Duration // gateway.body_timeout
	rate int64         // gateway.min_body_rate, bytes per second; 0 = none
}

// deadline is when the body's next byte must have arrived, for a body that
// began at start and has brought got bytes by now, and which bound that
// is. A pure function of its arguments, so the rule is tested without a
// clock.
func (b readBounds) deadline(start, now time.Time, got int64) (time.Time, string) {
	dl, why := now.Add(b.idle), StallBodyIdle
	if b.rate > 0 {
		// At time t the body owes rate·(t − start − idle) bytes; it has
		// got, which pays up to start + idle + got/rate.
		paid := time.Duration(float64(got) / float64(b.rate) * float64(time.Second))
		if rd := start.Add(b.idle + paid); rd.Before(dl) {
			dl, why = rd, StallBodyRate
		}
	}
	return dl, why
}

// minReadDeadline: the connection's read deadline is never set closer than
// this. When the body's last byte arrives, net/http starts its own
// background read on the connection with whatever deadline is set, until
// the reader clears it; a deadline that expired in between would make the
// server cancel the request as if the client had hung up. A byte that
// comes within this margin but after the bound is still refused, by the
// check after each read.
const minReadDeadline = time.Second

// errStalled: the client stopped sending its body (stall says how).
type errStalled struct{ why string }

func (e *errStalled) Error() string {
	if e.why == StallBodyRate {
		return "the request body arrived slower than gateway.min_body_rate"
	}
	return "the request body stopped arriving for gateway.body_timeout"
}

// timedBody is a request body read under readBounds.
type timedBody struct {
	r     io.Reader
	rc    *http.ResponseController
	b     readBounds
	start time.Time
	got   int64
	clear bool // the read deadline is cleared
}

// Close is a no-op: the request's body is net/http's to close.
func (t *timedBody) Close() error { return nil }

func newTimedBody(w http.ResponseWriter, r io.Reader, b readBounds) *timedBody {
	return &timedBody{r: r, rc: controller(w), b: b, start: time.Now()}
}

// controller is w's ResponseController: a recorder's own, made once per
// request, or a new one.
func controller(w http.ResponseWriter) *http.ResponseController {
	if rec, ok := w.(*recorder); ok {
		return rec.controller()
	}
	return http.NewResponseController(w)
}

func (t *timedBody) Read(p []byte) (int, error) {
	now := time.Now()
	dl, why := t.b.deadline(t.start, now, t.got)
	if !now.Before(dl) {
		return 0, t.stalled(why)
	}
	// Not supported (a test's recorder): the bound is then only checked
	// between reads.
	set := dl
	if floor := now.Add(minReadDeadline); set.Before(floor) {
		set = floor
	}
	_ = t.rc.SetReadDeadline(set)
	t.clear = false
	n, err := t.r.Read(p)
	t.got += int64(n)
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		return n, t.stalled(why)
	}
	if n > 0 && time.Now().After(dl) {
		return n, t.stalled(why)
	}
	if err != nil {
		// The whole body (io.EOF) or the client gone: either way the
		// connection's reads are net/http's again.
		t.done()
	}
	return n, err
}

// stalled leaves the read deadline in the past, so net/http's attempt to
// read what is left of the body after the answer fails at once and the
// connection closes.
func (t *timedBody) stalled(why string) error {
	t.abandon()
	return &errStalled{why: why}
}

// abandon gives up on the rest of the body: the connection closes after
// the answer instead of reading it.
func (t *timedBody) abandon() {
	_ = t.rc.SetReadDeadline(time.Unix(1, 0))
	t.clear = false
}

// done clears the read deadline once the body is read whole.
func (t *timedBody) done() {
	if !t.clear {
		_ = t.rc.SetReadDeadline(time.Time{})
		t.clear = true
	}
}

// sendBound bounds each write of an answer: the client must take it within
// gateway.send_timeout. The deadline is left set after the last write, so
// net/http's final flush after the handler is bounded too; the next request
// on the connection sets its own (ServeHTTP).
type sendBound struct {
	rc *http.ResponseController
	d  time.Duration
}

func newSendBound(w http.ResponseWriter, d time.Duration) sendBound {
	return sendBound{rc: controller(w), d: d}
}

// next bounds the next write.
func (s sendBound) next() { _ = s.rc.SetWriteDeadline(time.Now().Add(s.d)) }

func (s sendBound) flush() error { return s.rc.Flush() }

// failed counts a write that ran out of its bound: the client read
// nothing for send_timeout. (Any other failure is a client gone.)
func (s sendBound) failed(g *Gateway, err error) {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		g.guard.stalls.WithLabelValues(StallSend).Inc()
	}
}
