package gateway

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// What reaches the model of a request's headers: the client's own, less
// the connection's and the gateway's key.
func TestForwardedHeaders(t *testing.T) {
	got := make(chan http.Header, 1)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- r.Header.Clone()
		w.Header().Set("Keep-Alive", "timeout=5")
		w.Header().Set("X-Request-Id", "r1")
		w.Write([]byte(`{}`)) //nolint:errcheck // test
	}))
	defer up.Close()
	keys, err := LoadKeys(writeKeys(t, 0o600, "alice "+aliceToken+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	set := defaultSettings()
	set.Keys = keys
	s := startGateway(t, newStub(ready("m", "m", up.URL)), set, nil)
	req, _ := http.NewRequestWithContext(context.Background(), http.MethodPost, s.url+"/v1/completions?x=1", strings.NewReader(`{"model":"m"}`))
	req.Header.Set("Authorization", "Bearer "+aliceToken)
	req.Header.Set("Connection", "X-Hop, keep-alive")
	req.Header.Set("X-Hop", "1")
	req.Header.Set("Keep-Alive", "timeout=5")
	req.Header.Set("OpenAI-Organization", "lab")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	readAll(t, resp)
	h := <-got
	for _, k := range []string{"Authorization", "X-Hop", "Keep-Alive", "Connection"} {
		if v := h.Get(k); v != "" {
			t.Errorf("%s reached the model: %q", k, v)
		}
	}
	if h.Get("Openai-Organization") != "lab" {
		t.Errorf("the client's own header was dropped: %v", h)
	}
	if resp.Header.Get("X-Request-Id") != "r1" || resp.Header.Get("Keep-Alive") != "" {
		t.Errorf("answer headers: %v", resp.Header)
	}
}
