package probe

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
)

// vLLM's sleep mode (docs/on-demand.md), as the supervisor drives it. These endpoints
// exist only with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1; the
// gateway never forwards them.

// Sleep puts the server at base to sleep at level (1 or 2). The level goes
// in the query string: vLLM ignores a JSON body (a wrapper that sends
// {"level": 2} gets level 1).
func (h *HTTP) Sleep(ctx context.Context, base string, level int) error {
	return h.post(ctx, base+"/sleep?level="+strconv.Itoa(level), nil)
}

// WakeUp wakes the server at base from level. After a level-2 sleep the
// weights were discarded and must be reloaded before use: wake the weights'
// memory, reload them, wake the KV cache. The prefix cache (it refers to
// blocks of the old cache) is the caller's to reset, after any wake.
func (h *HTTP) WakeUp(ctx context.Context, base string, level int) error {
	if level != 2 {
		return h.post(ctx, base+"/wake_up", nil)
	}
	for _, step := range []struct {
		path string
		body any
	}{
		{"/wake_up?tags=weights", nil},
		{"/collective_rpc", map[string]any{"method": "reload_weights"}},
		{"/wake_up?tags=kv_cache", nil},
	} {
		if err := h.post(ctx, base+step.path, step.body); err != nil {
			return err
		}
	}
	return nil
}

// IsSleeping asks the server at base whether it sleeps. /health answers
// 200 while asleep, so this is the only way to know.
func (h *HTTP) IsSleeping(ctx context.Context, base string) (bool, error) {
	b, err := h.get(ctx, base+"/is_sleeping", 64*1024)
	if err != nil {
		return false, fmt.Errorf("is_sleeping: %w", err)
	}
	var v struct {
		IsSleeping *bool `json:"is_sleeping"`
	}
	if err := json.Unmarshal(b, &v); err != nil || v.IsSleeping == nil {
		return false, fmt.Errorf("is_sleeping: unexpected answer")
	}
	return *v.IsSleeping, nil
}

func (h *HTTP) post(ctx context.Context, url string, body any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := h.client.Do(req)
	if err != nil {
		return fmt.Errorf("POST %s: %w", pathOf(req), err)
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64*1024)) //nolint:errcheck // drained for reuse only
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("POST %s: %w", pathOf(req), &StatusError{Code: resp.StatusCode})
	}
	return nil
}

func pathOf(r *http.Request) string {
	if r.URL.RawQuery == "" {
		return r.URL.Path
	}
	return r.URL.Path + "?" + r.URL.RawQuery
}
