package gateway

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// apiErr decodes an OpenAI-shaped error body, failing on any other shape.
func apiErr(t *testing.T, body string) (msg, typ, code string) {
	t.Helper()
	var e struct {
		Error *struct {
			Message string `json:"message"`
			Type    string `json:"type"`
			Code    string `json:"code"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(body), &e); err != nil || e.Error == nil || e.Error.Message == "" || e.Error.Type == "" {
		t.Fatalf("not an OpenAI-shaped error: %q (%v)", body, err)
	}
	return e.Error.Message, e.Error.Type, e.Error.Code
}

func ready(name, served, upstream string) Model {
	return Model{Name: name, ServedName: served, State: "ready", Upstream: upstream, Enabled: true}
}

func TestRoutingByNameAndServedName(t *testing.T) {
	alpha := startFake(t, "org/alpha-7b")
	beta := startFake(t, "beta")
	off := Model{Name: "off", ServedName: "off", State: "stopped", Reason: "enabled: false", Upstream: beta.base}
	s := startGateway(t, newStub(ready("alpha", "org/alpha-7b", alpha.base), ready("beta", "beta", beta.base), off), defaultSettings(), nil)
	ctx := context.Background()

	cases := []struct {
		name, path, model string
		code              int
		served            string // the model field of the answer
	}{
		{"configured name (rewritten to served_name for vLLM)", "/v1/chat/completions", "alpha", 200, "org/alpha-7b"},
		{"served name", "/v1/chat/completions", "org/alpha-7b", 200, "org/alpha-7b"},
		{"another model", "/v1/completions", "beta", 200, "beta"},
		{"embeddings", "/v1/embeddings", "beta", 200, "beta"},
		{"unknown model", "/v1/chat/completions", "gamma", 404, ""},
		{"disabled model", "/v1/chat/completions", "off", 503, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp := post(t, ctx, s.url+tc.path, fmt.Sprintf(`{"messages":[{"role":"user","content":"hi"}],"model":%q,"max_tokens":3}`, tc.model), "")
			body := readAll(t, resp)
			if resp.StatusCode != tc.code {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.code, body)
			}
			if tc.code != 200 {
				msg, _, code := apiErr(t, body)
				if tc.code == 404 && (code != "model_not_found" || !strings.Contains(msg, "gamma")) {
					t.Errorf("unknown model: %q %q", code, msg)
				}
				if tc.code == 503 && !strings.Contains(msg, "disabled") {
					t.Errorf("disabled model: the reason must say so: %q", msg)
				}
				return
			}
			var out struct{ Model string }
			if err := json.Unmarshal([]byte(body), &out); err != nil || out.Model != tc.served {
				t.Errorf("answered by %q, want %q (%s)", out.Model, tc.served, body)
			}
		})
	}

	resp, err := http.Get(s.url + "/v1/models")
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Object string
		Data   []struct {
			ID      string `json:"id"`
			Object  string `json:"object"`
			Citadel struct{ Name, State string }
		}
	}
	if err := json.Unmarshal([]byte(readAll(t, resp)), &list); err != nil {
		t.Fatal(err)
	}
	got := fmt.Sprint(list)
	if want := "{list [{org/alpha-7b model {alpha ready}} {beta model {beta ready}}]}"; got != want {
		t.Errorf("GET /v1/models = %s, want %s (enabled models only, served names as ids)", got, want)
	}
	for _, id := range []string{"alpha", "org/alpha-7b"} {
		resp, err := http.Get(s.url + "/v1/models/" + id)
		if err != nil {
			t.Fatal(err)
		}
		if body := readAll(t, resp); resp.StatusCode != 200 || !strings.Contains(body, `"id":"org/alpha-7b"`) || !strings.Contains(body, `"state":"ready"`) {
			t.Errorf("GET /v1/models/%s: %d %s", id, resp.StatusCode, body)
		}
	}
	if resp, _ := http.Get(s.url + "/v1/models/gamma"); resp.StatusCode != 404 {
		t.Errorf("GET /v1/models/gamma: %d", resp.StatusCode)
	}
}

// events reads SSE "data:" lines; each is sent as it arrives.
func events(r io.Reader) <-chan string {
	ch := make(chan string, 128)
	go func() {
		defer close(ch)
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			if l := sc.Text(); strings.HasPrefix(l, "data: ") {
				ch <- strings.TrimPrefix(l, "data: ")
			}
		}
	}()
	return ch
}

func next(t *testing.T, ch <-chan string) string {
	t.Helper()
	select {
	case e, ok := <-ch:
		if !ok {
			t.Fatal("stream ended early")
		}
		return e
	case <-time.After(10 * time.Second):
		t.Fatal("no event within 10s")
	}
	return ""
}

func TestStreamsPassEventByEvent(t *testing.T) {
	// 20 tokens, 50 ms apart: a buffering gateway would deliver the first
	// event only with the last, after the model finished.
	up := startFake(t, "alpha", "--fake-token-delay", "50ms")
	s := startGateway(t, newStub(ready("alpha", "alpha", up.base)), defaultSettings(), nil)
	resp := post(t, context.Background(), s.url+"/v1/chat/completions", `{"model":"alpha","stream":true,"max_tokens":20}`, "")
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("X-Accel-Buffering") != "no" || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		t.Fatalf("status %d, headers %v", resp.StatusCode, resp.Header)
	}
	ch := events(resp.Body)
	first := next(t, ch)
	if strings.Contains(first, `"role":"assistant"`) {
		first = next(t, ch) // vLLM's first chat chunk carries the role only
	}
	if !strings.Contains(first, "tok0") {
		t.Fatalf("first event %q", first)
	}
	// The first event is here; the model is still generating the rest.
	if n := up.running(t); n != "1" {
		t.Fatalf("the first event arrived after the model finished (running %s): the stream was buffered", n)
	}
	n := 1
	for e := range ch {
		if e == "[DONE]" {
			break
		}
		n++
	}
	if n != 20 {
		t.Errorf("%d events, want 20", n)
	}
}

func TestClientDisconnectCancelsUpstream(t *testing.T) {
	up := startFake(t, "alpha", "--fake-token-delay", "200ms")
	s := startGateway(t, newStub(ready("alpha", "alpha", up.base)), defaultSettings(), nil)
	for i, stream := range []bool{true, false} {
		t.Run(fmt.Sprintf("stream=%v", stream), func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan struct{})
			go func() {
				defer close(done)
				resp := post(t, ctx, s.url+"/v1/completions", fmt.Sprintf(`{"model":"alpha","stream":%v,"max_tokens":1000}`, stream), "")
				if resp != nil {
					io.Copy(io.Discard, resp.Body) //nolint:errcheck // cancelled
					resp.Body.Close()
				}
			}()
			waitFor(t, 5*time.Second, "the request in flight at the model", func() bool { return up.running(t) == "1" })
			cancel()
			up.waitLines(t, "cancelled by the client", i+1, 5*time.Second)
			<-done
			waitFor(t, 5*time.Second, "gateway in_flight back to 0", func() bool {
				return s.value(t, "citadel_gateway_in_flight", map[string]string{"model": "alpha"}) == 0
			})
			// The slot is given back before the request's metrics are
			// recorded (the handler's last step): wait for the count.
			waitFor(t, 5*time.Second, fmt.Sprintf("requests_total{code=499} = %d", i+1), func() bool {
				return s.value(t, "citadel_gateway_requests_total", map[string]string{"model": "alpha", "code": "499"}) == float64(i+1)
			})
		})
	}
}
