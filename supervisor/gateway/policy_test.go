package gateway

import (
	"context"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// fakeClock is the gateway's clock in tests of its limits: time moves
// when the test says.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock { return &fakeClock{t: time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)} }

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// startGatewayOpts is startGateway with the gateway's clock and timer
// given in o (o.Models and o.Settings too).
func startGatewayOpts(t *testing.T, o Options) *site {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	reg := prometheus.NewRegistry()
	o.Logger, o.Registerer = zap.New(core), reg
	gw, err := Listen("127.0.0.1:0", o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- gw.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("gateway Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("gateway Run did not return within 10s of its context ending")
		}
	})
	waitFor(t, 5*time.Second, "gateway serving", func() bool { return gw.Serving() == nil })
	return &site{gw: gw, url: "http://" + gw.Addr(), reg: reg, logs: logs}
}

// keysSite runs a gateway over alpha and beta (fake-vllm) with alice's
// and bob's keys and the given policies, on a clock the test moves.
func keysSite(t *testing.T, pols map[string]Policy, fakeArgs ...string) (*site, *fakeClock) {
	t.Helper()
	alpha := startFake(t, "org/alpha", fakeArgs...)
	beta := startFake(t, "beta", fakeArgs...)
	keys, err := LoadKeys(writeKeys(t, 0o600, "alice "+aliceToken+"\nbob "+bobToken+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	set := defaultSettings()
	set.Keys, set.Policies = keys, pols
	clock := newClock()
	s := startGatewayOpts(t, Options{
		Models:   newStub(ready("alpha", "org/alpha", alpha.base), ready("beta", "beta", beta.base)),
		Settings: set, Now: clock.now,
	})
	return s, clock
}

func modelIDs(t *testing.T, url, token string) []string {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url+"/v1/models", nil)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var out struct{ Data []struct{ ID string } }
	if err := json.Unmarshal([]byte(readAll(t, resp)), &out); err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, d := range out.Data {
		ids = append(ids, d.ID)
	}
	return ids
}

// TestKeyScope: a key scoped to one model gets 403 permission_error for
// another, and sees only its models; an unscoped key sees and uses all.
func TestKeyScope(t *testing.T) {
	s, _ := keysSite(t, map[string]Policy{"alice": {Models: []string{"alpha"}}})
	ctx := context.Background()

	if got := strings.Join(modelIDs(t, s.url, aliceToken), ","); got != "org/alpha" {
		t.Errorf("alice sees %q, want only org/alpha", got)
	}
	if got := strings.Join(modelIDs(t, s.url, bobToken), ","); got != "org/alpha,beta" {
		t.Errorf("bob sees %q, want both", got)
	}
	for _, name := range []string{"alpha", "org/alpha"} {
		if resp := post(t, ctx, s.url+"/v1/completions", `{"model":"`+name+`","max_tokens":1}`, aliceToken); resp.StatusCode != 200 {
			t.Errorf("alice on %s: %d %s", name, resp.StatusCode, readAll(t, resp))
		} else {
			readAll(t, resp)
		}
	}
	resp := post(t, ctx, s.url+"/v1/completions", `{"model":"beta","max_tokens":1}`, aliceToken)
	body := readAll(t, resp)
	msg, typ, code := apiErr(t, body)
	if resp.StatusCode != 403 || typ != "permission_error" || code != "permission_error" || !strings.Contains(msg, "gateway.keys.alice.models") {
		t.Errorf("alice on beta: %d %s %s %q", resp.StatusCode, typ, code, msg)
	}
	if strings.Contains(body, aliceToken) {
		t.Error("the token is in the answer")
	}
	req, _ := http.NewRequest(http.MethodGet, s.url+"/v1/models/beta", nil)
	req.Header.Set("Authorization", "Bearer "+aliceToken)
	if r, err := http.DefaultClient.Do(req); err != nil || r.StatusCode != 403 {
		t.Errorf("GET /v1/models/beta as alice: %v %v", r, err)
	} else {
		readAll(t, r)
	}
	if resp := post(t, ctx, s.url+"/v1/completions", `{"model":"beta","max_tokens":1}`, bobToken); resp.StatusCode != 200 {
		t.Errorf("bob on beta: %d", resp.StatusCode)
	} else {
		readAll(t, resp)
	}
	if got := s.value(t, "citadel_gateway_rejected_total", map[string]string{"model": "beta", "reason": "scope"}); got != 2 {
		t.Errorf("rejected_total{reason=scope} = %v, want 2 (the POST and the GET)", got)
	}
}

// TestKeyRequestsPerMinute: a key at 5 requests a minute gets its sixth
// answered 429 rate_limit_exceeded, with Retry-After from the limiter and
// OpenAI's x-ratelimit-* headers on every answer; the bucket refills at 5
// a minute, and another key is not limited.
func TestKeyRequestsPerMinute(t *testing.T) {
	s, clock := keysSite(t, map[string]Policy{"alice": {RequestsPerMinute: 5}})
	ctx := context.Background()
	body := `{"model":"alpha","max_tokens":1}`
	for i := 1; i <= 5; i++ {
		resp := post(t, ctx, s.url+"/v1/completions", body, aliceToken)
		readAll(t, resp)
		h := resp.Header
		if resp.StatusCode != 200 || h.Get("X-Ratelimit-Limit-Requests") != "5" || h.Get("X-Ratelimit-Remaining-Requests") != strconv.Itoa(5-i) {
			t.Fatalf("request %d: %d limit %q remaining %q", i, resp.StatusCode, h.Get("X-Ratelimit-Limit-Requests"), h.Get("X-Ratelimit-Remaining-Requests"))
		}
		if want := (time.Duration(i) * 12 * time.Second).String(); h.Get("X-Ratelimit-Reset-Requests") != want {
			t.Errorf("request %d: reset %q, want %q", i, h.Get("X-Ratelimit-Reset-Requests"), want)
		}
		if h.Get("X-Ratelimit-Limit-Tokens") != "" {
			t.Error("no tokens_per_minute: no -tokens headers")
		}
	}
	resp := post(t, ctx, s.url+"/v1/completions", body, aliceToken)
	msg, typ, code := apiErr(t, readAll(t, resp))
	h := resp.Header
	if resp.StatusCode != 429 || code != "rate_limit_exceeded" || typ != "requests" {
		t.Fatalf("sixth: %d %s %s %q", resp.StatusCode, typ, code, msg)
	}
	if h.Get("Retry-After") != "12" || h.Get("Retry-After-Ms") != "12000" || h.Get("X-Ratelimit-Remaining-Requests") != "0" || h.Get("X-Ratelimit-Reset-Requests") != "1m0s" {
		t.Errorf("sixth's headers: Retry-After %q (ms %q) remaining %q reset %q", h.Get("Retry-After"), h.Get("Retry-After-Ms"),
			h.Get("X-Ratelimit-Remaining-Requests"), h.Get("X-Ratelimit-Reset-Requests"))
	}
	if !strings.Contains(msg, "requests_per_minute") || !strings.Contains(msg, "12s") {
		t.Errorf("message %q", msg)
	}
	// Every answer to the limited key says where it stands, also those
	// that took nothing from its bucket.
	for _, path := range []string{"/v1/models", "/v1/models/nope"} {
		req, _ := http.NewRequest(http.MethodGet, s.url+path, nil)
		req.Header.Set("Authorization", "Bearer "+aliceToken)
		r, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		readAll(t, r)
		if r.Header.Get("X-Ratelimit-Remaining-Requests") != "0" || r.Header.Get("X-Ratelimit-Limit-Requests") != "5" {
			t.Errorf("GET %s as alice: %d, headers %v", path, r.StatusCode, r.Header)
		}
	}
	if resp := post(t, ctx, s.url+"/v1/completions", body, bobToken); resp.StatusCode != 200 || resp.Header.Get("X-Ratelimit-Limit-Requests") != "" {
		t.Errorf("bob: %d, headers %v", resp.StatusCode, resp.Header)
	} else {
		readAll(t, resp)
	}
	clock.add(12 * time.Second)
	if resp := post(t, ctx, s.url+"/v1/completions", body, aliceToken); resp.StatusCode != 200 {
		t.Errorf("12 s later: %d", resp.StatusCode)
	} else {
		readAll(t, resp)
	}
	if got := s.value(t, "citadel_gateway_rejected_total", map[string]string{"model": "alpha", "reason": "rate_limit"}); got != 1 {
		t.Errorf("rejected_total{reason=rate_limit} = %v, want 1", got)
	}
	if got := s.value(t, "citadel_gateway_rate_limited_total", map[string]string{"key": "alice", "limit": "requests"}); got != 1 {
		t.Errorf("rate_limited_total{key=alice,limit=requests} = %v, want 1", got)
	}

	// A reload keeps what the key spent: it does not get a fresh minute.
	keys, _ := LoadKeys(writeKeys(t, 0o600, "alice "+aliceToken+"\nbob "+bobToken+"\n"))
	set := defaultSettings()
	set.Keys, set.Policies = keys, map[string]Policy{"alice": {RequestsPerMinute: 6}}
	s.gw.Apply(set)
	resp = post(t, ctx, s.url+"/v1/completions", body, aliceToken)
	readAll(t, resp)
	if resp.StatusCode != 429 || resp.Header.Get("X-Ratelimit-Limit-Requests") != "6" {
		t.Errorf("after a reload to 6/min: %d limit %q", resp.StatusCode, resp.Header.Get("X-Ratelimit-Limit-Requests"))
	}
	// A reload that lifts the limit lifts it.
	set.Policies = nil
	s.gw.Apply(set)
	if resp := post(t, ctx, s.url+"/v1/completions", body, aliceToken); resp.StatusCode != 200 {
		t.Errorf("limit removed: %d", resp.StatusCode)
	} else {
		readAll(t, resp)
	}
}

// streamAs posts a streaming chat request as token and returns the
// answer's status, headers and body.
func streamAs(t *testing.T, url, token, extra string) (int, http.Header, string) {
	t.Helper()
	resp := post(t, context.Background(), url+"/v1/chat/completions",
		`{"messages":[{"role":"user","content":"hi"}],"model":"alpha","max_tokens":20,"stream":true`+extra+`}`, token)
	return resp.StatusCode, resp.Header, readAll(t, resp)
}

// TestKeyTokensPerMinute: a key at 30 tokens a minute is limited by the
// tokens its streams used, counted though they never asked for usage and
// without the usage chunk reaching the client; a client that asks for
// usage gets its chunk.
func TestKeyTokensPerMinute(t *testing.T) {
	s, clock := keysSite(t, map[string]Policy{"alice": {TokensPerMinute: 30}})
	tokens := func(kind string) float64 {
		return s.value(t, "citadel_gateway_tokens_total", map[string]string{"model": "alpha", "key": "alice", "kind": kind})
	}

	// 1 prompt + 20 completion tokens a stream: the first leaves 9, the
	// second is admitted (the budget is positive) and leaves -12.
	for i := range 2 {
		code, h, body := streamAs(t, s.url, aliceToken, "")
		if code != 200 || strings.Count(body, "data: ") != 22 || !strings.HasSuffix(body, "data: [DONE]\n\n") {
			t.Fatalf("stream %d: %d\n%s", i, code, body)
		}
		if strings.Contains(body, `"usage"`) {
			t.Fatalf("stream %d: the client did not ask for usage and got it:\n%s", i, body)
		}
		if want := []string{"30", "9"}[i]; h.Get("X-Ratelimit-Remaining-Tokens") != want {
			t.Errorf("stream %d: remaining tokens %q before it, want %s", i, h.Get("X-Ratelimit-Remaining-Tokens"), want)
		}
		waitFor(t, 5*time.Second, "the stream's tokens counted", func() bool { return tokens("completion") == float64(20*(i+1)) })
	}
	if p := tokens("prompt"); p != 2 {
		t.Errorf("prompt tokens %v, want 2", p)
	}
	code, h, body := streamAs(t, s.url, aliceToken, "")
	msg, typ, ecode := apiErr(t, body)
	if code != 429 || typ != "tokens" || ecode != "rate_limit_exceeded" || h.Get("Retry-After") != "25" || h.Get("X-Ratelimit-Remaining-Tokens") != "0" {
		t.Fatalf("third stream: %d %s %s %q Retry-After %q remaining %q", code, typ, ecode, msg, h.Get("Retry-After"), h.Get("X-Ratelimit-Remaining-Tokens"))
	}
	if got := s.value(t, "citadel_gateway_rate_limited_total", map[string]string{"key": "alice", "limit": "tokens"}); got != 1 {
		t.Errorf("rate_limited_total{key=alice,limit=tokens} = %v, want 1", got)
	}
	// 12 tokens of debt refill in 24 s.
	clock.add(24*time.Second + time.Millisecond)
	code, _, body = streamAs(t, s.url, aliceToken, `,"stream_options":{"include_usage":true}`)
	if code != 200 || !strings.Contains(body, `"usage":{"completion_tokens":20,"prompt_tokens":1,"total_tokens":21}`) {
		t.Fatalf("a client that asks for usage gets its chunk: %d\n%s", code, body)
	}
	waitFor(t, 5*time.Second, "the third stream's tokens counted", func() bool { return tokens("completion") == 60 })
	if got := s.value(t, "citadel_gateway_time_per_output_token_seconds", map[string]string{"model": "alpha"}); got != 3 {
		t.Errorf("time_per_output_token observations %v, want 3", got)
	}
	// bob has no limit and is counted apart.
	if code, h, _ := streamAs(t, s.url, bobToken, ""); code != 200 || h.Get("X-Ratelimit-Limit-Tokens") != "" {
		t.Errorf("bob: %d %v", code, h)
	}
}

// TestKeyBurst: twenty requests of one key at once against 5 a minute:
// exactly five go through, whatever their order.
func TestKeyBurst(t *testing.T) {
	s, _ := keysSite(t, map[string]Policy{"alice": {RequestsPerMinute: 5}})
	codes := make(chan int, 20)
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() {
			resp := post(t, context.Background(), s.url+"/v1/completions", `{"model":"alpha","max_tokens":1}`, aliceToken)
			readAll(t, resp)
			codes <- resp.StatusCode
		})
	}
	wg.Wait()
	close(codes)
	n := map[int]int{}
	for c := range codes {
		n[c]++
	}
	if n[200] != 5 || n[429] != 15 {
		t.Errorf("answers %v, want five 200 and fifteen 429", n)
	}
}
