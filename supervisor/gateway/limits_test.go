package gateway

import (
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// manualTimer is a Timer the test fires: max_wait passes when the test says.
type manualTimer struct {
	mu     sync.Mutex
	timers []chan time.Time
	waits  []time.Duration
}

func (m *manualTimer) timer(d time.Duration) (<-chan time.Time, func()) {
	m.mu.Lock()
	defer m.mu.Unlock()
	ch := make(chan time.Time, 1)
	m.timers = append(m.timers, ch)
	m.waits = append(m.waits, d)
	return ch, func() {}
}

// fire expires every timer started so far.
func (m *manualTimer) fire() {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, ch := range m.timers {
		select {
		case ch <- time.Time{}:
		default:
		}
	}
}

type result struct {
	code       int
	body       string
	retryAfter string
}

// async posts body in the background; the result arrives on the channel.
func async(t *testing.T, ctx context.Context, url, body string) <-chan result {
	ch := make(chan result, 1)
	go func() {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			ch <- result{code: -1, body: err.Error()}
			return
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		ch <- result{resp.StatusCode, string(b), resp.Header.Get("Retry-After")}
	}()
	return ch
}

func wait(t *testing.T, ch <-chan result) result {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("no answer within 10s")
	}
	return result{}
}

func TestConcurrencyQueueAndLimits(t *testing.T) {
	// Each request takes 100 tokens × 100 ms unless cancelled.
	up := startFake(t, "alpha", "--fake-token-delay", "100ms")
	m := ready("alpha", "alpha", up.base)
	m.MaxConcurrency = 1
	clock := &manualTimer{}
	set := defaultSettings()
	set.MaxQueue, set.MaxWait = 1, 42*time.Second
	s := startGateway(t, newStub(m), set, clock.timer)
	alpha := map[string]string{"model": "alpha"}
	body := `{"model":"alpha","max_tokens":100}`

	ctx1, cancel1 := context.WithCancel(context.Background())
	defer cancel1()
	first := async(t, ctx1, s.url+"/v1/completions", body)
	waitFor(t, 5*time.Second, "one request in flight", func() bool { return s.value(t, "citadel_gateway_in_flight", alpha) == 1 })
	second := async(t, context.Background(), s.url+"/v1/completions", body)
	waitFor(t, 5*time.Second, "one request queued", func() bool { return s.value(t, "citadel_gateway_queue_depth", alpha) == 1 })
	if up.running(t) != "1" {
		t.Fatal("max_concurrency 1: the model must see one request")
	}

	third := wait(t, async(t, context.Background(), s.url+"/v1/completions", body))
	if third.code != 429 || third.retryAfter == "" {
		t.Fatalf("queue full: %d Retry-After %q %s", third.code, third.retryAfter, third.body)
	}
	if _, _, code := apiErr(t, third.body); code != "queue_full" {
		t.Errorf("429 code %q", code)
	}

	clock.fire() // max_wait passes for the queued request
	r := wait(t, second)
	if r.code != 503 || r.retryAfter == "" {
		t.Fatalf("max_wait: %d Retry-After %q %s", r.code, r.retryAfter, r.body)
	}
	if msg, _, code := apiErr(t, r.body); code != "max_wait_exceeded" || !strings.Contains(msg, "42s") {
		t.Errorf("503 %q %q", code, msg)
	}
	for reason, want := range map[string]float64{"queue_full": 1, "max_wait": 1} {
		if got := s.value(t, "citadel_gateway_rejected_total", map[string]string{"model": "alpha", "reason": reason}); got != want {
			t.Errorf("rejected_total{reason=%s} = %v, want %v", reason, got, want)
		}
	}
	if got := s.value(t, "citadel_gateway_queue_wait_seconds", alpha); got != 1 {
		t.Errorf("queue_wait_seconds count %v, want 1", got)
	}

	// A freed slot goes to the oldest waiter.
	queued := async(t, context.Background(), s.url+"/v1/completions", `{"model":"alpha","max_tokens":1}`)
	waitFor(t, 5*time.Second, "one request queued", func() bool { return s.value(t, "citadel_gateway_queue_depth", alpha) == 1 })
	cancel1()
	wait(t, first)
	if r := wait(t, queued); r.code != 200 {
		t.Fatalf("queued request after the slot freed: %d %s", r.code, r.body)
	}
}

func TestRequestsWaitForTheirModel(t *testing.T) {
	up := startFake(t, "alpha")
	m := ready("alpha", "alpha", up.base)
	m.State, m.Reason = "starting", "loading"
	stub := newStub(m)
	clock := &manualTimer{}
	s := startGateway(t, stub, defaultSettings(), clock.timer)
	alpha := map[string]string{"model": "alpha"}
	body := `{"model":"alpha","max_tokens":2}`

	// starting, backoff, unhealthy, pending: held, then through once ready.
	for _, state := range []string{"starting", "backoff", "unhealthy", "pending"} {
		s.setAndWait(t, stub, "alpha", state, "because")
		r := async(t, context.Background(), s.url+"/v1/chat/completions", body)
		waitFor(t, 5*time.Second, "the request held", func() bool { return s.value(t, "citadel_gateway_queue_depth", alpha) == 1 })
		s.setAndWait(t, stub, "alpha", "ready", "")
		if got := wait(t, r); got.code != 200 {
			t.Fatalf("%s then ready: %d %s", state, got.code, got.body)
		}
	}

	// Held past max_wait while loading: 503 with the model's reason.
	s.setAndWait(t, stub, "alpha", "starting", "loading")
	r := async(t, context.Background(), s.url+"/v1/chat/completions", body)
	waitFor(t, 5*time.Second, "the request held", func() bool { return s.value(t, "citadel_gateway_queue_depth", alpha) == 1 })
	clock.fire()
	got := wait(t, r)
	if msg, _, _ := apiErr(t, got.body); got.code != 503 || got.retryAfter != "3" || !strings.Contains(msg, "model alpha is starting: loading") {
		t.Errorf("max_wait while starting: %d Retry-After %q %q", got.code, got.retryAfter, msg)
	}

	// Failed: refused at once, and the waiting ones too, with the reason.
	r = async(t, context.Background(), s.url+"/v1/chat/completions", body)
	waitFor(t, 5*time.Second, "the request held", func() bool { return s.value(t, "citadel_gateway_queue_depth", alpha) == 1 })
	s.setAndWait(t, stub, "alpha", "failed", "start limit: 5 starts within 30m0s; last: exited (exit code 1)")
	for i, ch := range []<-chan result{r, async(t, context.Background(), s.url+"/v1/chat/completions", body)} {
		got := wait(t, ch)
		msg, _, code := apiErr(t, got.body)
		if got.code != 503 || code != "model_unavailable" || !strings.Contains(msg, "model alpha is failed: start limit") {
			t.Errorf("request %d for a failed model: %d %q %q", i, got.code, code, msg)
		}
	}
	s.setAndWait(t, stub, "alpha", "stopped", "held stopped by operator")
	got = wait(t, async(t, context.Background(), s.url+"/v1/chat/completions", body))
	if msg, _, _ := apiErr(t, got.body); got.code != 503 || !strings.Contains(msg, "held stopped by operator") {
		t.Errorf("stopped model: %d %q", got.code, msg)
	}
	if got := s.value(t, "citadel_gateway_rejected_total", map[string]string{"model": "alpha", "reason": "unavailable"}); got != 3 {
		t.Errorf("rejected_total{reason=unavailable} = %v, want 3", got)
	}
}
