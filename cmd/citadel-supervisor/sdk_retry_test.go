//go:build e2e

package main

import (
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"citadel-supervisor/supervisor/supervisortest"
)

// sdkPost sends one request as OpenAI's SDKs do (openai-node's
// makeRequest and retryRequest, openai-python's _retry_request): up to two
// retries of a 408, 409, 429 or 5xx unless x-should-retry says otherwise,
// each after retry-after-ms, else Retry-After, else 0.5 s doubling. It
// returns the final status and how many attempts it took.
func sdkPost(url, body string) (int, int) {
	for attempt := 1; ; attempt++ {
		resp, err := http.Post(url, "application/json", strings.NewReader(body))
		if err != nil {
			return -1, attempt
		}
		io.Copy(io.Discard, resp.Body) //nolint:errcheck // the status is enough
		resp.Body.Close()
		retry := resp.StatusCode == 408 || resp.StatusCode == 409 || resp.StatusCode == 429 || resp.StatusCode >= 500
		switch resp.Header.Get("X-Should-Retry") {
		case "true":
			retry = true
		case "false":
			retry = false
		}
		if resp.StatusCode < 400 || !retry || attempt == 3 {
			return resp.StatusCode, attempt
		}
		wait := 500 * time.Millisecond << (attempt - 1)
		if ms, err := strconv.ParseFloat(resp.Header.Get("Retry-After-Ms"), 64); err == nil {
			wait = time.Duration(ms * float64(time.Millisecond))
		} else if s, err := strconv.ParseFloat(resp.Header.Get("Retry-After"), 64); err == nil {
			wait = time.Duration(s * float64(time.Second))
		}
		time.Sleep(wait) // the client's own backoff, as the SDK sleeps
	}
}

// TestColdStartRetries: 100 concurrent requests, retried as OpenAI's SDKs
// retry, to an on-demand model that takes 4 s to start, with max_queue 64:
// the 36 refused at first are told when to come back, and every request
// succeeds. (make e2e runs the same with the real Node SDK.)
func TestColdStartRetries(t *testing.T) {
	gwPort := supervisortest.FreePort(t)
	top := fmt.Sprintf("gpu: {backend: none}\ngateway: {listen: 127.0.0.1:%d}\n", gwPort)
	s := &site{Site: supervisortest.NewSite(t, top, testModel{Name: "alpha",
		YAML: "activation: on_demand\nsleep_level: 0",
		Fake: []string{"--fake-load-time", "4s"},
	}), t: t}
	d := s.start()
	url := fmt.Sprintf("http://127.0.0.1:%d/v1/chat/completions", gwPort)
	body := `{"model":"alpha","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`
	d.waitFor(t, 30*time.Second, "the gateway serving", func() bool {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/v1/models", gwPort))
		if err == nil {
			resp.Body.Close()
		}
		return err == nil && resp.StatusCode == 200
	})
	var wg sync.WaitGroup
	codes := make([]int, 100)
	attempts := make([]int, 100)
	for i := range codes {
		wg.Go(func() { codes[i], attempts[i] = sdkPost(url, body) })
	}
	wg.Wait()
	retried := 0
	for i, c := range codes {
		if c != 200 {
			t.Errorf("request %d: %d after %d attempts", i, c, attempts[i])
		}
		if attempts[i] > 1 {
			retried++
		}
	}
	if retried != 36 {
		t.Errorf("%d requests retried, want the 36 beyond max_queue", retried)
	}
}
