package probe

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

// TestEveryCallSendsTheModelsKey: with WithKey, every request this package
// makes carries Authorization: Bearer KEY (vLLM with VLLM_API_KEY answers
// 401 on /v1/* without it); without, none does; the key is in no error.
func TestEveryCallSendsTheModelsKey(t *testing.T) {
	const key = "sk-model-secret-1234"
	var mu sync.Mutex
	seen := map[string]string{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen[r.URL.Path] = r.Header.Get("Authorization")
		mu.Unlock()
		if strings.HasPrefix(r.URL.Path, "/v1/") && r.Header.Get("Authorization") != "Bearer "+key {
			w.WriteHeader(http.StatusUnauthorized)
			w.Write([]byte(`{"error": "Unauthorized"}`))
			return
		}
		switch r.URL.Path {
		case "/v1/models":
			w.Write([]byte(`{"data":[{"id":"m"}]}`))
		case "/v1/completions":
			w.Write([]byte(`{"choices":[{"text":"x"}]}`))
		case "/metrics":
			w.Write([]byte("vllm:request_success_total{model_name=\"m\"} 3\nvllm:num_requests_running{model_name=\"m\"} 0\n"))
		case "/version":
			w.Write([]byte(`{"version":"0.10.1"}`))
		case "/is_sleeping":
			w.Write([]byte(`{"is_sleeping":false}`))
		}
	}))
	defer srv.Close()
	p := NewHTTP()
	ctx := WithKey(context.Background(), key)
	calls := []struct {
		path string
		call func(context.Context) error
	}{
		{"/health", func(c context.Context) error { return p.Probe(c, srv.URL+"/health") }},
		{"/v1/models", func(c context.Context) error { return p.Identity(c, srv.URL, "m") }},
		{"/v1/completions", func(c context.Context) error { return p.Complete(c, srv.URL, "m") }},
		{"/v1/completions", func(c context.Context) error { _, err := p.KnownAnswer(c, srv.URL, "m"); return err }},
		{"/metrics", func(c context.Context) error { _, err := p.Traffic(c, srv.URL); return err }},
		{"/metrics", func(c context.Context) error { _, err := p.Running(c, srv.URL); return err }},
		{"/version", func(c context.Context) error { _, err := p.Version(c, srv.URL); return err }},
		{"/sleep", func(c context.Context) error { return p.Sleep(c, srv.URL, 1) }},
		{"/wake_up", func(c context.Context) error { return p.WakeUp(c, srv.URL, 1) }},
		{"/is_sleeping", func(c context.Context) error { _, err := p.IsSleeping(c, srv.URL); return err }},
		{"/collective_rpc", func(c context.Context) error { return p.WakeUp(c, srv.URL, 2) }},
		{"/reset_prefix_cache", func(c context.Context) error { return p.ResetPrefixCache(c, srv.URL) }},
	}
	for i, c := range calls {
		mu.Lock()
		clear(seen)
		mu.Unlock()
		if err := c.call(ctx); err != nil {
			t.Errorf("%s (call %d) with the key: %v", c.path, i, err)
		}
		mu.Lock()
		got := seen[c.path]
		mu.Unlock()
		if got != "Bearer "+key {
			t.Errorf("%s (call %d): Authorization %q", c.path, i, got)
		}
	}
	err := p.Identity(context.Background(), srv.URL, "m")
	var se *StatusError
	if !errors.As(err, &se) || se.Code != http.StatusUnauthorized {
		t.Errorf("without the key: %v, want HTTP 401", err)
	}
	if mu.Lock(); seen["/v1/models"] != "" {
		t.Errorf("a call without WithKey sent %q", seen["/v1/models"])
	}
	mu.Unlock()
	for _, c := range calls {
		if err := c.call(WithKey(context.Background(), "wrong")); err != nil && strings.Contains(err.Error(), key) {
			t.Errorf("%s: the key is in the error %q", c.path, err)
		}
	}
}

func TestVersion(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/version" {
			w.Write([]byte(`{"version":"0.6.3"}`))
			return
		}
		http.NotFound(w, r)
	}))
	defer srv.Close()
	if v, err := NewHTTP().Version(context.Background(), srv.URL); err != nil || v != "0.6.3" {
		t.Errorf("Version = %q, %v", v, err)
	}
	if _, err := NewHTTP().Version(context.Background(), srv.URL+"/nothing"); err == nil {
		t.Error("a 404 gave a version")
	}
}
