package gateway

import (
	"context"
	"strings"
	"testing"
	"time"
)

func TestModelCrashMidRequest(t *testing.T) {
	alpha := startFake(t, "alpha", "--fake-token-delay", "100ms")
	beta := startFake(t, "beta")
	stub := newStub(ready("alpha", "alpha", alpha.base), ready("beta", "beta", beta.base))
	s := startGateway(t, stub, defaultSettings(), nil)
	ctx := context.Background()

	// A stream and a plain request in flight when alpha dies.
	resp := post(t, ctx, s.url+"/v1/chat/completions", `{"model":"alpha","stream":true,"max_tokens":1000}`, "")
	defer resp.Body.Close()
	ch := events(resp.Body)
	next(t, ch)
	plain := async(t, ctx, s.url+"/v1/completions", `{"model":"alpha","max_tokens":1000}`)
	waitFor(t, 5*time.Second, "both requests at the model", func() bool { return alpha.running(t) == "2" })
	alpha.kill(t)
	stub.set("alpha", "backoff", "exited (killed by SIGKILL); restarting in 10s")

	var last []string
	for e := range ch {
		last = append(last, e)
	}
	if len(last) < 2 || last[len(last)-1] != "[DONE]" {
		t.Fatalf("the stream did not end cleanly: %q", last)
	}
	if _, _, code := apiErr(t, last[len(last)-2]); code != "upstream_error" {
		t.Errorf("the last event before [DONE] is not an OpenAI-shaped error: %q", last[len(last)-2])
	}
	got := wait(t, plain)
	if msg, _, code := apiErr(t, got.body); got.code != 502 || code != "upstream_error" || !strings.Contains(msg, "model alpha did not answer") {
		t.Errorf("plain request: %d %q %q", got.code, code, msg)
	}

	// The other model is served as before.
	for range 3 {
		if r := post(t, ctx, s.url+"/v1/completions", `{"model":"beta","max_tokens":1}`, ""); r.StatusCode != 200 {
			t.Fatalf("beta after alpha crashed: %d %s", r.StatusCode, readAll(t, r))
		} else {
			readAll(t, r)
		}
	}
}
