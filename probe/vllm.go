package probe

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Fatal reports whether err means the server is broken beyond waiting for:
// vLLM answers /health with 5xx once its engine died (EngineDeadError), and
// it does not come back by itself.
func Fatal(err error) bool {
	se, ok := err.(*StatusError)
	return ok && se.Code >= 500
}

// IdentityError means the port answers for another model. vLLM binds with
// SO_REUSEPORT, so a second server (a hand-started test, a leftover) can
// share the port and silently take part of the traffic.
type IdentityError struct {
	Want string
	Got  []string
}

func (e *IdentityError) Error() string {
	return fmt.Sprintf("the port answers for %s, not %s: another server shares the port", strings.Join(e.Got, ", "), e.Want)
}

// Identity checks that base's /v1/models lists served.
func (h *HTTP) Identity(ctx context.Context, base, served string) error {
	var out struct {
		Data []struct {
			ID string `json:"id"`
		} `json:"data"`
	}
	if err := h.getJSON(ctx, base+"/v1/models", &out); err != nil {
		return fmt.Errorf("/v1/models: %w", err)
	}
	var ids []string
	for _, d := range out.Data {
		ids = append(ids, d.ID)
	}
	if !slices.Contains(ids, served) {
		if len(ids) == 0 {
			ids = []string{"no model"}
		}
		return &IdentityError{Want: served, Got: ids}
	}
	return nil
}

// Version asks base's GET /version (every vLLM since 0.4.0, vllm#3161)
// which vLLM serves: {"version": "0.10.1"}.
func (h *HTTP) Version(ctx context.Context, base string) (string, error) {
	var out struct {
		Version string `json:"version"`
	}
	if err := h.getJSON(ctx, base+"/version", &out); err != nil {
		return "", fmt.Errorf("/version: %w", err)
	}
	if out.Version == "" {
		return "", fmt.Errorf("/version: no version in the answer")
	}
	return out.Version, nil
}

// Traffic sums vLLM's vllm:request_success_total from base's /metrics: the
// requests it has finished, all finish reasons together.
func (h *HTTP) Traffic(ctx context.Context, base string) (float64, error) {
	sum, found, err := h.sumMetric(ctx, base, "vllm:request_success_total")
	if err == nil && !found {
		err = fmt.Errorf("/metrics has no vllm:request_success_total")
	}
	return sum, err
}

// sumMetric sums every sample of the family name on base's /metrics (all
// its label sets), and says whether there was any.
func (h *HTTP) sumMetric(ctx context.Context, base, name string) (sum float64, found bool, err error) {
	body, err := h.get(ctx, base+"/metrics", 4<<20)
	if err != nil {
		return 0, false, err
	}
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) {
			continue
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum += v
			found = true
		}
	}
	return sum, found, nil
}

// Complete asks served for one token. /health answers 200 while a hung
// engine serves nothing; only a real completion shows it works.
func (h *HTTP) Complete(ctx context.Context, base, served string) error {
	req, err := json.Marshal(map[string]any{"model": served, "prompt": "ping", "max_tokens": 1, "temperature": 0})
	if err != nil {
		return err
	}
	r, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/v1/completions", bytes.NewReader(req))
	if err != nil {
		return err
	}
	r.Header.Set("Content-Type", "application/json")
	resp, err := h.client.Do(r)
	if err != nil {
		if ctx.Err() != nil {
			return fmt.Errorf("one-token completion: no answer within the deep probe timeout")
		}
		return fmt.Errorf("one-token completion: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("one-token completion: %w", &StatusError{Code: resp.StatusCode})
	}
	var out struct {
		Choices []json.RawMessage `json:"choices"`
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&out); err != nil || len(out.Choices) == 0 {
		return fmt.Errorf("one-token completion: no choices in the answer")
	}
	return nil
}

func (h *HTTP) getJSON(ctx context.Context, url string, v any) error {
	body, err := h.get(ctx, url, 1<<20)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(body, v); err != nil {
		return fmt.Errorf("bad JSON: %w", err)
	}
	return nil
}

// Deep schedules the optional deep probe of one model: a one-token
// completion every Period, skipped when the model finished requests since
// the last deep probe (it demonstrably serves). It is used by one
// goroutine; the clock is injected.
type Deep struct {
	Period time.Duration
	Now    func() time.Time

	last  time.Time
	count float64 // vllm:request_success_total at the last check; <0 unknown
}

// Client is what a deep probe needs of a prober.
type Client interface {
	Traffic(ctx context.Context, base string) (float64, error)
	Complete(ctx context.Context, base, served string) error
}

var _ Client = (*HTTP)(nil)

// Due reports whether a deep probe is due now.
func (d *Deep) Due() bool {
	return d.Period > 0 && (d.last.IsZero() || d.Now().Sub(d.last) >= d.Period)
}

// Check runs the deep probe if it is due. skipped is true when it was not
// due or the model served traffic since the last one.
func (d *Deep) Check(ctx context.Context, c Client, base, served string) (skipped bool, err error) {
	if !d.Due() {
		return true, nil
	}
	d.last = d.Now()
	n, terr := c.Traffic(ctx, base)
	if terr == nil && d.count > 0 && n > d.count {
		d.count = n
		return true, nil
	}
	if err := c.Complete(ctx, base, served); err != nil {
		return false, err
	}
	if terr == nil {
		d.count = n + 1 // our own completion counts too
	} else {
		d.count = -1
	}
	return false, nil
}
