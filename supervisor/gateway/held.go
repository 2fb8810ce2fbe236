package gateway

import (
	"fmt"
	"net/http"
	"time"
)

// A streaming request held while its model starts, wakes or is busy gets
// SSE comment lines (": waking mixtral (level 1), 2.3s"), which clients
// ignore, so that the client and any proxy in between see progress rather
// than an idle connection that their read timeout cuts. The first comment
// commits the answer to 200 text/event-stream: what happens after that (the
// model's own error, max_wait, the model failing) reaches the client as an
// error event and [DONE], the way vLLM ends a stream that fails.
const (
	holdFirst = time.Second     // a short wait keeps its proper status code
	holdEvery = 4 * time.Second // "at least every 5 s", with room for a late timer
)

// holder writes a held stream's comments. It runs on the request's own
// goroutine (admission.acquire calls it between waits).
type holder struct {
	w            *recorder
	model        string
	began        time.Time // when the request began to wait
	now          func() time.Time
	first, every time.Duration
	stopTimer    func()
}

func (g *Gateway) newHolder(w *recorder, model string) *holder {
	return &holder{w: w, model: model, began: g.now(), now: g.now, first: g.holdFirst, every: g.holdEvery}
}

// start arms the first comment.
func (h *holder) start(timer Timer) <-chan time.Time {
	c, stop := timer(h.first)
	h.stopTimer = stop
	return c
}

func (h *holder) stop() {
	if h.stopTimer != nil {
		h.stopTimer()
	}
}

// tick writes one comment saying what the request waits for, and arms
// the next.
func (h *holder) tick(g gate, reason string, l Loading, timer Timer) <-chan time.Time {
	h.stop()
	if !h.w.held {
		hdr := h.w.Header()
		hdr.Set("Content-Type", "text/event-stream")
		hdr.Set("Cache-Control", "no-cache")
		hdr.Set("X-Accel-Buffering", "no")
		h.w.WriteHeader(http.StatusOK)
		h.w.held = true
	}
	now := h.now()
	since := h.began
	if !l.Began.IsZero() {
		since = l.Began
	}
	took := roundHeld(now.Sub(since))
	var line string
	switch {
	case g == gateOpen:
		line = fmt.Sprintf(": waiting for a free slot of %s (max_concurrency), %s", h.model, roundHeld(now.Sub(h.began)))
	case l.Waking:
		line = fmt.Sprintf(": waking %s (level %d), %s", h.model, l.Level, took)
	default:
		line = fmt.Sprintf(": %s, %s", reason, took)
	}
	if l.Typical > 0 && g != gateOpen {
		line += fmt.Sprintf("; usually %s", roundHeld(l.Typical))
	}
	h.w.comment(line)
	c, stop := timer(h.every)
	h.stopTimer = stop
	return c
}

// roundHeld prints a wait as a person reads it: 2.3s, 12s, 2m5s.
func roundHeld(d time.Duration) time.Duration {
	if d >= 10*time.Second {
		return d.Round(time.Second)
	}
	return d.Round(100 * time.Millisecond)
}
