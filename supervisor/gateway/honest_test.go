package gateway

import (
	"bufio"
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestRequestID: every answer carries X-Request-Id, the client's when
// usable, else a new one; the model receives the same id, and the access
// log names it.
func TestRequestID(t *testing.T) {
	var mu sync.Mutex
	var seen []string
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("X-Request-Id"))
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"usage":{"prompt_tokens":1,"completion_tokens":1}}`)) //nolint:errcheck // test
	}))
	defer up.Close()
	keys, err := LoadKeys(writeKeys(t, 0o600, "alice "+aliceToken+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	set := defaultSettings()
	set.Keys, set.Policies = keys, map[string]Policy{"alice": {RequestsPerMinute: 1}}
	s := startGateway(t, newStub(ready("alpha", "alpha", up.URL)), set, nil)

	do := func(method, path, body, token, id string) *http.Response {
		req, _ := http.NewRequest(method, s.url+path, strings.NewReader(body))
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		if id != "" {
			req.Header.Set("X-Request-Id", id)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		readAll(t, resp)
		return resp
	}
	ids := map[string]bool{}
	for _, tc := range []struct {
		name, method, path, body, token, id string
		code                                int
		keep                                bool // the client's id comes back
	}{
		{"forwarded, client's id", "POST", "/v1/completions", `{"model":"alpha"}`, aliceToken, "my-trace-0001", 200, true},
		{"rate limited", "POST", "/v1/completions", `{"model":"alpha"}`, aliceToken, "", 429, false},
		{"no key", "POST", "/v1/completions", `{"model":"alpha"}`, "", "", 401, false},
		{"unknown model", "GET", "/v1/models/nope", "", aliceToken, "", 404, false},
		{"never forwarded", "POST", "/sleep", "", aliceToken, "", 404, false},
		{"models", "GET", "/v1/models", "", aliceToken, "abc", 200, true},
		{"an id with a space is replaced", "GET", "/v1/models", "", aliceToken, "a b", 200, false},
		{"an id too long is replaced", "GET", "/v1/models", "", aliceToken, strings.Repeat("x", 200), 200, false},
	} {
		resp := do(tc.method, tc.path, tc.body, tc.token, tc.id)
		got := resp.Header.Get("X-Request-Id")
		switch {
		case resp.StatusCode != tc.code:
			t.Errorf("%s: %d, want %d", tc.name, resp.StatusCode, tc.code)
		case tc.keep && got != tc.id:
			t.Errorf("%s: X-Request-Id %q, want the client's %q", tc.name, got, tc.id)
		case !tc.keep && (!strings.HasPrefix(got, "req_") || ids[got]):
			t.Errorf("%s: X-Request-Id %q, want a new one", tc.name, got)
		}
		ids[got] = true
	}
	mu.Lock()
	if len(seen) != 1 || seen[0] != "my-trace-0001" {
		t.Errorf("the model saw %q, want the client's id", seen)
	}
	mu.Unlock()
	found := false
	for _, e := range s.logs.FilterMessage("request").All() {
		if e.ContextMap()["request_id"] == "my-trace-0001" {
			found = true
		}
	}
	if !found {
		t.Error("no access log line names the request id")
	}
}

// TestRetryAfterFromLoading: a request refused for a model that starts or
// wakes is told how long it will likely still take, from the model's
// recent starts or wakes; without history, as long again as it took so
// far, at least a few seconds. A 503 that only an operator can fix says
// x-should-retry: false.
func TestRetryAfterFromLoading(t *testing.T) {
	up := startFake(t, "alpha")
	clock := newClock()
	m := ready("alpha", "alpha", up.base)
	m.State = "starting"
	stub := newStub(m)
	set := defaultSettings()
	set.MaxQueue = 0 // every request that would wait is refused at once
	s := startGatewayOpts(t, Options{Models: stub, Settings: set, Now: clock.now})
	body := `{"model":"alpha","max_tokens":1}`
	setLoading := func(l Loading) {
		stub.mu.Lock()
		stub.models[0].Loading = l
		stub.mu.Unlock()
		stub.set("alpha", "starting", "loading "+l.Began.String())
		waitFor(t, 5*time.Second, "the gateway to see the loading", func() bool {
			a := s.gw.table.Load().byName["alpha"].up.adm
			a.mu.Lock()
			defer a.mu.Unlock()
			return a.loading == l
		})
	}
	for _, tc := range []struct {
		name     string
		l        Loading
		ms, secs string
	}{
		{"a start of 40s, 15s in, probed every second", Loading{Began: clock.now().Add(-15 * time.Second), Typical: 40 * time.Second, Bound: time.Hour, Poll: time.Second}, "30000", "30"},
		{"a wake of 4.5s, just begun", Loading{Waking: true, Level: 1, Began: clock.now(), Typical: 4500 * time.Millisecond}, "4950", "5"},
		{"late: a second", Loading{Began: clock.now().Add(-time.Minute), Typical: 40 * time.Second}, "1000", "1"},
		{"no history, 20s in: 20s more", Loading{Began: clock.now().Add(-20 * time.Second), Bound: time.Hour}, "20000", "20"},
		{"no history, not begun: a few seconds", Loading{Bound: time.Hour}, "3000", "3"},
		{"never past startup_timeout", Loading{Began: clock.now().Add(-50 * time.Second), Bound: time.Minute}, "10000", "10"},
	} {
		setLoading(tc.l)
		resp := post(t, context.Background(), s.url+"/v1/completions", body, "")
		_, _, code := apiErr(t, readAll(t, resp))
		if resp.StatusCode != 429 || code != "queue_full" || resp.Header.Get("Retry-After-Ms") != tc.ms || resp.Header.Get("Retry-After") != tc.secs {
			t.Errorf("%s: %d %s Retry-After %q (ms %q), want %s (%s)", tc.name, resp.StatusCode, code,
				resp.Header.Get("Retry-After"), resp.Header.Get("Retry-After-Ms"), tc.secs, tc.ms)
		}
		if resp.Header.Get("X-Should-Retry") != "" {
			t.Errorf("%s: x-should-retry on a retryable answer", tc.name)
		}
	}

	for _, state := range []string{"failed", "stopped"} {
		s.setAndWait(t, stub, "alpha", state, "start limit")
		resp := post(t, context.Background(), s.url+"/v1/completions", body, "")
		readAll(t, resp)
		if resp.StatusCode != 503 || resp.Header.Get("X-Should-Retry") != "false" || resp.Header.Get("Retry-After") != "" {
			t.Errorf("%s: %d x-should-retry %q Retry-After %q", state, resp.StatusCode, resp.Header.Get("X-Should-Retry"), resp.Header.Get("Retry-After"))
		}
	}
}

// TestHeldStreamComments: a streaming request held while its model wakes
// gets SSE comment lines until the model's first event, then the model's
// stream; one still held when its model fails gets an error event and
// [DONE].
func TestHeldStreamComments(t *testing.T) {
	up := startFake(t, "alpha")
	m := ready("alpha", "alpha", up.base)
	m.State, m.OnDemand = "waking", true
	m.Loading = Loading{Waking: true, Level: 1, Began: time.Now()}
	stub := newStub(m)
	s := startGatewayOpts(t, Options{Models: stub, Settings: defaultSettings(), HoldEvery: 20 * time.Millisecond})

	open := func() (*http.Response, *bufio.Reader) {
		resp := post(t, context.Background(), s.url+"/v1/chat/completions", `{"model":"alpha","messages":[],"max_tokens":3,"stream":true}`, "")
		if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" || resp.Header.Get("X-Request-Id") == "" {
			t.Fatalf("held stream: %d %v", resp.StatusCode, resp.Header)
		}
		return resp, bufio.NewReader(resp.Body)
	}
	// line reads one line, within a deadline.
	line := func(r *bufio.Reader) string {
		t.Helper()
		ch := make(chan string, 1)
		go func() {
			l, _ := r.ReadString('\n')
			ch <- l
		}()
		select {
		case l := <-ch:
			return l
		case <-time.After(10 * time.Second):
			t.Fatal("no line within 10s")
		}
		return ""
	}

	resp, r := open()
	for i := range 3 {
		if l := line(r); !strings.HasPrefix(l, ": waking alpha (level 1), ") {
			t.Fatalf("comment %d: %q", i, l)
		}
		if l := line(r); l != "\n" {
			t.Fatalf("a comment ends with a blank line: %q", l)
		}
	}
	s.setAndWait(t, stub, "alpha", "ready", "")
	var events []string
	for {
		l := line(r)
		if strings.HasPrefix(l, ":") || l == "\n" {
			continue // comments written before the model was seen ready
		}
		events = append(events, l)
		if l == "data: [DONE]\n" || l == "" {
			break
		}
	}
	resp.Body.Close()
	if len(events) != 5 || strings.Contains(strings.Join(events, ""), `"usage"`) {
		t.Errorf("after the comments, the model's stream (the role chunk, three tokens, [DONE]) without a usage chunk: %q", events)
	}
	if got := s.value(t, "citadel_gateway_time_to_first_byte_seconds", map[string]string{"model": "alpha"}); got != 1 {
		t.Errorf("ttfb observations %v", got)
	}

	// Held, then the model fails: an error event and [DONE].
	s.setAndWait(t, stub, "alpha", "waking", "")
	resp, r = open()
	if l := line(r); !strings.HasPrefix(l, ": waking alpha") {
		t.Fatalf("comment: %q", l)
	}
	s.setAndWait(t, stub, "alpha", "failed", "wake failed twice")
	var rest []string
	for {
		l := line(r)
		if l == "" || l == "data: [DONE]\n" {
			rest = append(rest, l)
			break
		}
		if !strings.HasPrefix(l, ":") && l != "\n" {
			rest = append(rest, l)
		}
	}
	resp.Body.Close()
	if len(rest) != 2 || !strings.HasPrefix(rest[0], `data: {"error":{"message":"model alpha is failed: wake failed twice"`) || !strings.Contains(rest[0], `"code":"model_unavailable"`) {
		t.Errorf("after a failure while held: %q", rest)
	}
	waitFor(t, 5*time.Second, "the failure counted as a 503", func() bool {
		return s.value(t, "citadel_gateway_requests_total", map[string]string{"model": "alpha", "code": "503"}) == 1
	})
}

// TestHeldLargeStreamComments: a streaming request whose body is too large
// for the heap (an image, held in a mapping or a file) is told why it
// waits too: the body arrives whole before it waits, and its scan says it
// streams.
func TestHeldLargeStreamComments(t *testing.T) {
	up := startFake(t, "alpha")
	m := ready("alpha", "alpha", up.base)
	m.State, m.OnDemand = "waking", true
	m.Loading = Loading{Waking: true, Level: 1, Began: time.Now()}
	stub := newStub(m)
	s := startGatewayOpts(t, Options{Models: stub, Settings: defaultSettings(), HoldEvery: 20 * time.Millisecond})
	image := strings.Repeat("A", heapBody+1000)
	body := `{"model":"alpha","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,` + image + `"}}]}],"max_tokens":3,"stream":true}`
	resp := post(t, context.Background(), s.url+"/v1/chat/completions", body, "")
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("held large stream: %d %v", resp.StatusCode, resp.Header)
	}
	first := make(chan string, 1)
	go func() {
		l, _ := bufio.NewReader(resp.Body).ReadString('\n')
		first <- l
	}()
	select {
	case l := <-first:
		if !strings.HasPrefix(l, ": waking alpha (level 1), ") {
			t.Fatalf("first line %q, want a comment", l)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no comment within 10s")
	}
	s.setAndWait(t, stub, "alpha", "ready", "")
}
