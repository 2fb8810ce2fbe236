package probe

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
)

// The known-answer canary: a woken engine must answer as it did right after
// it started. A wake can "succeed" into an engine that answers nonsense:
// after a level-2 wake with an FP8 KV cache (vllm#25800), without the
// weight reload (vllm#29341, #54235), or from a stale prefix cache after a
// level-1 wake on 0.8.0-0.10.1 (vllm#16234, #17103; fixed by PR #22726).
// A one-token completion with any "choices" passes all of those.

// CanaryPrompt is the canary's fixed prompt; CanaryTokens how many tokens
// it asks for, greedily (temperature 0, a fixed seed).
const (
	CanaryPrompt = "The capital of France is"
	CanaryTokens = 8
	canarySeed   = 1234
)

// Answer is what an engine answered the canary: a completion's text, or
// for an embedding-only model (it refuses completions) the prompt's
// vector.
type Answer struct {
	Kind   string    `json:"kind"` // "completion" or "embedding"
	Text   string    `json:"text,omitempty"`
	Vector []float64 `json:"vector,omitempty"`
}

// Same reports whether b is the answer a: the same text, or vectors equal
// within a relative tolerance (a GPU's float arithmetic is not bit-exact
// across runs).
func (a Answer) Same(b Answer) bool {
	if a.Kind != b.Kind {
		return false
	}
	if a.Kind != "embedding" {
		return a.Text == b.Text
	}
	if len(a.Vector) != len(b.Vector) || len(a.Vector) == 0 {
		return false
	}
	var diff, norm float64
	for i := range a.Vector {
		d := a.Vector[i] - b.Vector[i]
		diff += d * d
		norm += a.Vector[i] * a.Vector[i]
	}
	return math.Sqrt(diff) <= 1e-3*math.Max(math.Sqrt(norm), 1e-9)
}

func (a Answer) String() string {
	if a.Kind == "embedding" {
		n := min(len(a.Vector), 3)
		return fmt.Sprintf("a %d-dimensional embedding %v…", len(a.Vector), a.Vector[:n])
	}
	return strconv.Quote(a.Text)
}

// KnownAnswer asks base's model (served) the canary: a greedy completion
// of CanaryPrompt; a model that refuses completions (4xx: an embedding
// model) is asked for the prompt's embedding instead.
func (h *HTTP) KnownAnswer(ctx context.Context, base, served string) (Answer, error) {
	body, err := h.postJSON(ctx, base+"/v1/completions", map[string]any{
		"model": served, "prompt": CanaryPrompt, "max_tokens": CanaryTokens, "temperature": 0, "seed": canarySeed,
	})
	var se *StatusError
	if errors.As(err, &se) && se.Code >= 400 && se.Code < 500 {
		return h.knownEmbedding(ctx, base, served)
	}
	if err != nil {
		return Answer{}, fmt.Errorf("canary completion: %w", err)
	}
	var out struct {
		Choices []struct {
			Text string `json:"text"`
		} `json:"choices"`
	}
	if err := json.Unmarshal(body, &out); err != nil || len(out.Choices) == 0 {
		return Answer{}, errors.New("canary completion: no choices in the answer")
	}
	return Answer{Kind: "completion", Text: out.Choices[0].Text}, nil
}

func (h *HTTP) knownEmbedding(ctx context.Context, base, served string) (Answer, error) {
	body, err := h.postJSON(ctx, base+"/v1/embeddings", map[string]any{"model": served, "input": CanaryPrompt})
	if err != nil {
		return Answer{}, fmt.Errorf("canary embedding (the model refuses completions): %w", err)
	}
	var out struct {
		Data []struct {
			Embedding []float64 `json:"embedding"`
		} `json:"data"`
	}
	if err := json.Unmarshal(body, &out); err != nil || len(out.Data) == 0 || len(out.Data[0].Embedding) == 0 {
		return Answer{}, errors.New("canary embedding: no vector in the answer")
	}
	return Answer{Kind: "embedding", Vector: out.Data[0].Embedding}, nil
}

// ResetPrefixCache drops the engine's prefix cache: after a wake it may
// refer to blocks of the cache from before the sleep.
func (h *HTTP) ResetPrefixCache(ctx context.Context, base string) error {
	return h.post(ctx, base+"/reset_prefix_cache", nil)
}

// ErrNoRunningGauge means the engine's /metrics has no
// vllm:num_requests_running: it cannot say whether it still runs a request.
var ErrNoRunningGauge = errors.New("/metrics has no vllm:num_requests_running")

// Running is vLLM's vllm:num_requests_running from base's /metrics: the
// requests its engine still runs, those whose client went away included
// until the engine notices (it does at its next write to the client).
func (h *HTTP) Running(ctx context.Context, base string) (float64, error) {
	sum, found, err := h.sumMetric(ctx, base, "vllm:num_requests_running")
	if err == nil && !found {
		err = ErrNoRunningGauge
	}
	return sum, err
}

// postJSON posts body and returns the answer's body (at most 1 MiB), or a
// *StatusError for an answer other than 200.
func (h *HTTP) postJSON(ctx context.Context, url string, body any) ([]byte, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := h.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, &StatusError{Code: resp.StatusCode}
	}
	return out, nil
}
