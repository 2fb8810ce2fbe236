package gateway

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// hopHeaders belong to one connection and are not forwarded (RFC 9110
// §7.6.1), nor are the headers a Connection header names.
var hopHeaders = []string{
	"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization",
	"Te", "Trailer", "Transfer-Encoding", "Upgrade",
}

// copyHeaders copies src to dst without hop-by-hop headers.
func copyHeaders(dst, src http.Header) {
	named := connectionNamed(src)
	for k, vv := range src {
		if !hopHeader(k, named) {
			dst[k] = vv
		}
	}
}

// connectionNamed are the headers h's Connection header names.
func connectionNamed(h http.Header) []string {
	var named []string
	for _, v := range h["Connection"] {
		for _, f := range strings.Split(v, ",") {
			if f = strings.TrimSpace(f); f != "" {
				named = append(named, http.CanonicalHeaderKey(f))
			}
		}
	}
	return named
}

// hopHeader says whether the header k belongs to one connection: one of
// hopHeaders, or one the Connection header named.
func hopHeader(k string, named []string) bool {
	for _, h := range hopHeaders {
		if k == h {
			return true
		}
	}
	for _, h := range named {
		if k == h {
			return true
		}
	}
	return false
}

// serve forwards r with body to the model and copies the answer back. It
// does what httputil.ReverseProxy does for this one case (HTTP/1.1 to a
// model on loopback, no trailers, no upgrades) on the request's own
// goroutine (hop.go): every request passes here.
func (up *upstream) serve(w *recorder, r *http.Request, g *Gateway, req *reqInfo, out outBody) {
	res, err := up.hop.roundTrip(r.Context(), r, out)
	if err != nil {
		g.proxyError(up)(w, r, err)
		return
	}
	defer res.Body.Close()
	sse := strings.HasPrefix(res.Header.Get("Content-Type"), "text/event-stream")
	if w.held && (!sse || res.StatusCode != http.StatusOK) {
		// The held comments committed the answer to a stream: the
		// model's own error becomes its error event (held.go).
		heldError(w, res)
		return
	}
	if req.appender != nil {
		// The model answers once it has read the whole body: the
		// appender has decided.
		req.asked = req.appender.asked.Load()
	}
	flush := res.ContentLength == -1
	body := io.Reader(res.Body)
	// Usage is read as the answer passes (usage.go), and charged after.
	var tap usageTap
	switch {
	case sse:
		t := &sseTap{src: res.Body, strip: req.asked, now: g.now}
		tap, body = t, &sseGuard{body: t, ctx: r.Context()}
		flush = true
	case res.StatusCode == http.StatusOK && strings.HasPrefix(res.Header.Get("Content-Type"), "application/json"):
		t := &jsonTap{src: res.Body}
		tap, body = t, t
	}
	if tap != nil {
		defer func() {
			u, ok, st := tap.result()
			g.account(req, u, ok, st)
		}()
	}
	if !w.held {
		copyHeaders(w.Header(), res.Header)
		if sse {
			w.Header().Set("X-Accel-Buffering", "no")
			if req.asked {
				w.Header().Del("Content-Length") // the usage chunk is not passed on
			}
		}
		w.WriteHeader(res.StatusCode)
	}
	buf := copyBuffers.Get()
	defer copyBuffers.Put(buf)
	send := newSendBound(w, g.settings.Load().SendTimeout)
	for {
		n, rerr := body.Read(buf)
		if n > 0 {
			send.next()
			if _, werr := w.Write(buf[:n]); werr != nil {
				send.failed(g, werr)
				return // the client went away; the context ends the upstream request
			}
			if flush {
				if err := send.flush(); err != nil {
					send.failed(g, err)
					return
				}
			}
		}
		if errors.Is(rerr, io.EOF) {
			return
		}
		if rerr != nil {
			if r.Context().Err() == nil || wasCut(r.Context()) {
				// The answer was torn mid-way and its status is sent:
				// all that is left is to cut the client's connection too.
				panic(http.ErrAbortHandler)
			}
			return
		}
	}
}

// heldError passes the model's answer to a held stream as its error event:
// vLLM's error object as it is, or the answer's text as the message.
func heldError(w *recorder, res *http.Response) {
	b, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10)) //nolint:errcheck // what arrived is what there is
	var v struct {
		Error json.RawMessage `json:"error"`
	}
	switch {
	case json.Unmarshal(b, &v) == nil && len(v.Error) > 0 && v.Error[0] == '{':
		w.event(b)
	case json.Valid(b) && len(bytes.TrimSpace(b)) > 0 && bytes.TrimSpace(b)[0] == '{':
		// vLLM before 0.10 answers {"object":"error","message",...}.
		w.event(append(append([]byte(`{"error":`), bytes.TrimSpace(b)...), '}'))
	default:
		e := errUpstream(fmt.Sprintf("the model answered %d: %s", res.StatusCode, strings.TrimSpace(string(b))))
		w.event(e.body())
	}
	w.status = res.StatusCode
}
