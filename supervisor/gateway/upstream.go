package gateway

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// upstream is what lasts of a model across routing snapshots: its queue,
// its last request's time, and one pool of kept-alive connections that
// serve every request to it (hop.go). A new address (a reload moved its
// port) gets a new pool; the queue stays.
type upstream struct {
	name        string
	base        string
	adm         *admission
	lastRequest *atomic.Int64 // unix nanoseconds
	hop         *hopClient
	// key is the model's own API key as of the latest snapshot: a request
	// held in the queue while the model started takes the key of the
	// process that serves it, not of the snapshot it arrived with.
	key atomic.Pointer[string]
	// series are the model's metric children (metrics.go).
	series series
}

// apiKey is the model's API key now, "" when it has none.
func (up *upstream) apiKey() string {
	if k := up.key.Load(); k != nil {
		return *k
	}
	return ""
}

// Upstream connection settings. vLLM is on loopback: connecting is instant
// or refused. Idle connections are kept for as many requests as a busy
// model serves at once, up to 64: they hold descriptors that
// netguard.ReservePerModel sets aside for them, outside the gateway's
// connection cap. A generation may take minutes before its first header,
// so there is no response-header timeout.
const (
	dialTimeout     = 5 * time.Second
	maxIdlePerModel = 64
	upstreamIdle    = 90 * time.Second
)

func (g *Gateway) newUpstream(m Model, old *upstream) *upstream {
	name := m.Name
	up := &upstream{name: m.Name, base: m.Upstream, lastRequest: &atomic.Int64{}, adm: &admission{
		gate: gateHold, now: g.now,
		demand:   func() { g.models.Demand(name) },
		unwanted: func() { g.models.Unwanted(name) },
	}}
	if old != nil {
		up.adm, up.lastRequest = old.adm, old.lastRequest
	}
	target, err := url.Parse(m.Upstream)
	if err != nil || target.Host == "" {
		// The supervisor builds these URLs; a bad one is a bug, and the
		// model answers 502 rather than the gateway failing.
		g.log.Error("bad upstream address", zap.String("model", m.Name), zap.String("upstream", m.Upstream))
		target = &url.URL{Scheme: "http", Host: "invalid."}
	}
	// The body passes through as vLLM wrote it: nothing asks for gzip
	// but a client, which negotiates with vLLM itself.
	up.hop = newHopClient(target.Host)
	return up
}

// copyBuffers are the answers' copy buffers, shared: one 32 KiB buffer
// per request would be most of the gateway's garbage.
var copyBuffers = &bufferPool{}

type bufferPool struct{ p sync.Pool }

func (b *bufferPool) Get() []byte {
	if buf, ok := b.p.Get().(*[]byte); ok {
		return *buf
	}
	return make([]byte, 32<<10)
}

func (b *bufferPool) Put(buf []byte) { b.p.Put(&buf) }

func (up *upstream) close() { up.hop.close() }

// proxyError answers a request the model could not: the model went away
// (crash, restart) before answering, the client went away, or the body
// was too large.
func (g *Gateway) proxyError(up *upstream) func(http.ResponseWriter, *http.Request, error) {
	return func(w http.ResponseWriter, r *http.Request, err error) {
		var tooLarge *http.MaxBytesError
		switch {
		case errors.As(err, &tooLarge):
			writeError(w, errBadRequest(http.StatusRequestEntityTooLarge, "request_too_large",
				fmt.Sprintf("request body over %d bytes (gateway.max_body)", tooLarge.Limit)))
		case wasCut(r.Context()):
			w.Header().Set("Connection", "close")
			writeError(w, errUpgrading())
		case r.Context().Err() != nil:
			if rec, ok := w.(*recorder); ok {
				rec.status = statusClientGone
			}
		default:
			g.log.Warn("model failed a request", zap.String("model", up.name), zap.String("request_id", r.Header.Get("X-Request-Id")), zap.Error(err))
			_, reason := up.adm.state()
			msg := fmt.Sprintf("model %s did not answer (it may have crashed or be restarting)", up.name)
			if reason != "" {
				msg += "; now: " + reason
			}
			writeError(w, errUpstream(msg))
		}
	}
}

// sseGuard passes a stream through untouched; if the model dies mid-way
// it ends the stream the way vLLM ends one that fails: an error event,
// then [DONE]. Clients see a clean end with a reason rather than a reset.
type sseGuard struct {
	body    io.ReadCloser
	ctx     context.Context
	last    byte      // the last byte passed on
	tail    io.Reader // the closing events, once the body failed
	pending error     // the body's error, held until the bytes before it are passed on
}

func (s *sseGuard) Read(p []byte) (int, error) {
	if s.tail != nil {
		return s.tail.Read(p)
	}
	if s.pending != nil {
		s.fail()
		return s.tail.Read(p)
	}
	n, err := s.body.Read(p)
	if n > 0 {
		s.last = p[n-1]
	}
	if err == nil || errors.Is(err, io.EOF) || (s.ctx.Err() != nil && !wasCut(s.ctx)) {
		return n, err
	}
	if n > 0 {
		s.pending = err
		return n, nil
	}
	s.pending = err
	s.fail()
	return s.tail.Read(p)
}

func (s *sseGuard) fail() {
	var b bytes.Buffer
	if s.last != '\n' && s.last != 0 {
		b.WriteString("\n\n") // end the torn event so the error is its own
	}
	e := errUpstream("the model stopped answering mid-stream (it may have crashed or be restarting)")
	if wasCut(s.ctx) {
		e = errUpgrading()
	}
	b.WriteString("data: ")
	b.Write(bytes.TrimSpace(e.body()))
	b.WriteString("\n\ndata: [DONE]\n\n")
	s.tail = &b
}

func (s *sseGuard) Close() error { return s.body.Close() }
