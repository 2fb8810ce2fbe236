// Package probe answers whether a model server is healthy.
//
// A prober answers one question, "did it work", like blackbox_exporter's
// probers: the caller owns the deadline (through ctx), the timing and the
// bookkeeping of consecutive failures.
package probe

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"syscall"
)

// ErrRefused means nothing listens on the port yet. While a model is
// starting this means "still loading": vLLM binds its port only after the
// weights are loaded.
var ErrRefused = errors.New("connection refused")

// StatusError is a non-2xx answer.
type StatusError struct{ Code int }

func (e *StatusError) Error() string { return fmt.Sprintf("HTTP %d", e.Code) }

// keyCtx carries a model's API key to every request made with the context.
type keyCtx struct{}

// WithKey returns ctx carrying key, the model's own API key (VLLM_API_KEY or
// --api-key): every request of this package made with it says
// Authorization: Bearer key. vLLM with a key answers 401 on /v1/* without
// it; sending it on the other routes too costs nothing and keeps working
// where vLLM guards more of them. The key is never part of an error.
func WithKey(ctx context.Context, key string) context.Context {
	if key == "" {
		return ctx
	}
	return context.WithValue(ctx, keyCtx{}, key)
}

// keyTransport sets the context's key on every request it sends: one
// place, so no call of this package can reach a keyed model without it (the
// canary's did, and was answered 401).
type keyTransport struct{ next http.RoundTripper }

func (t keyTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if key, _ := r.Context().Value(keyCtx{}).(string); key != "" {
		r = r.Clone(r.Context()) // a RoundTripper must not change the caller's request
		r.Header.Set("Authorization", "Bearer "+key)
	}
	return t.next.RoundTrip(r)
}

// HTTP probes a URL with GET; any 2xx answer is healthy.
type HTTP struct {
	client *http.Client
}

// NewHTTP returns an HTTP prober. It keeps no idle connections, so a probe
// never reuses a connection into a server that has since wedged, and it
// ignores proxy variables: models are probed on this host.
func NewHTTP() *HTTP {
	return &HTTP{client: &http.Client{
		Transport: keyTransport{&http.Transport{Proxy: nil, DisableKeepAlives: true}},
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}}
}

// Probe GETs target and returns nil for a 2xx answer before ctx ends.
func (h *HTTP) Probe(ctx context.Context, target string) error {
	_, err := h.get(ctx, target, 64*1024)
	return err
}

// get GETs url and returns its body (at most limit bytes) for a 2xx answer.
func (h *HTTP) get(ctx context.Context, url string, limit int64) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := h.client.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return nil, ErrRefused
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("no answer within the probe timeout")
		}
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, limit))
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return nil, &StatusError{Code: resp.StatusCode}
	}
	return body, err
}
