package gateway

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// gated is a model that records which request (by X-Request-Id) reached
// it, in order, and holds each until the test lets one go.
type gated struct {
	srv     *httptest.Server
	mu      sync.Mutex
	arrived []string
	more    chan struct{} // closed and replaced at each arrival
	release chan struct{}
}

func newGated(t *testing.T) *gated {
	g := &gated{more: make(chan struct{}), release: make(chan struct{})}
	g.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.mu.Lock()
		g.arrived = append(g.arrived, r.Header.Get("X-Request-Id"))
		close(g.more)
		g.more = make(chan struct{})
		g.mu.Unlock()
		select {
		case <-g.release:
		case <-r.Context().Done():
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}`)
	}))
	t.Cleanup(g.srv.Close)
	return g
}

// next lets one held request finish and returns the id of the one that
// reaches the model after it (within d).
func (g *gated) next(t *testing.T, d time.Duration) string {
	t.Helper()
	g.mu.Lock()
	n, more := len(g.arrived), g.more
	g.mu.Unlock()
	select {
	case g.release <- struct{}{}:
	case <-time.After(d):
		t.Fatal("no request held at the model")
	}
	for {
		select {
		case <-more:
		case <-time.After(d):
			t.Fatalf("no request reached the model within %s after a slot freed", d)
		}
		g.mu.Lock()
		if len(g.arrived) > n {
			id := g.arrived[n]
			g.mu.Unlock()
			return id
		}
		more = g.more
		g.mu.Unlock()
	}
}

func (g *gated) waitArrived(t *testing.T, n int) {
	t.Helper()
	waitFor(t, 10*time.Second, fmt.Sprintf("%d requests at the model", n), func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		return len(g.arrived) >= n
	})
}

// postID posts as token with X-Request-Id id, in the background.
func postID(t *testing.T, url, token, id, model string) <-chan int {
	ch := make(chan int, 1)
	go func() {
		req, _ := http.NewRequest(http.MethodPost, url+"/v1/completions", strings.NewReader(`{"model":"`+model+`","max_tokens":1}`))
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("X-Request-Id", id)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			ch <- -1
			return
		}
		readAll(t, resp)
		ch <- resp.StatusCode
	}()
	return ch
}

// TestFairShareOverHTTP: with max_concurrency 1, alice queues twelve
// requests behind one in flight and bob then sends one: bob's is served
// within the next two slots, and every request succeeds.
func TestFairShareOverHTTP(t *testing.T) {
	up := newGated(t)
	keys, err := LoadKeys(writeKeys(t, 0o600, "alice "+aliceToken+"\nbob "+bobToken+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	set := defaultSettings()
	set.MaxQueue, set.Keys = 64, keys
	m := ready("alpha", "alpha", up.srv.URL)
	m.MaxConcurrency = 1
	s := startGateway(t, newStub(m), set, nil)
	alpha := map[string]string{"model": "alpha"}

	var answers []<-chan int
	answers = append(answers, postID(t, s.url, aliceToken, "alice-0", "alpha"))
	up.waitArrived(t, 1)
	for i := 1; i <= 12; i++ {
		answers = append(answers, postID(t, s.url, aliceToken, fmt.Sprintf("alice-%d", i), "alpha"))
		waitFor(t, 10*time.Second, "alice's requests queued in order", func() bool { return s.value(t, "citadel_gateway_queue_depth", alpha) == float64(i) })
	}
	answers = append(answers, postID(t, s.url, bobToken, "bob-1", "alpha"))
	waitFor(t, 10*time.Second, "bob's request queued", func() bool { return s.value(t, "citadel_gateway_queue_depth", alpha) == 13 })

	var order []string
	for range 13 {
		order = append(order, up.next(t, 10*time.Second))
	}
	up.release <- struct{}{}
	if i := indexOf(order, "bob-1"); i < 0 || i > 1 {
		t.Errorf("order %v: bob's request in slot %d, want within the next two", order, i+1)
	}
	for i, ch := range answers {
		select {
		case code := <-ch:
			if code != 200 {
				t.Errorf("request %d: %d", i, code)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("request %d unanswered", i)
		}
	}
}

func indexOf(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}

// TestKeyMaxConcurrency: a key at its max_concurrency waits in the queue
// while another key's requests go through, and its next request goes as
// soon as one of its own ends, also when that one was for another model.
func TestKeyMaxConcurrency(t *testing.T) {
	alphaUp, betaUp := newGated(t), newGated(t)
	keys, err := LoadKeys(writeKeys(t, 0o600, "alice "+aliceToken+"\nbob "+bobToken+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	set := defaultSettings()
	set.Keys, set.Policies = keys, map[string]Policy{"alice": {MaxConcurrency: 1}}
	s := startGateway(t, newStub(ready("alpha", "alpha", alphaUp.srv.URL), ready("beta", "beta", betaUp.srv.URL)), set, nil)

	a1 := postID(t, s.url, aliceToken, "alice-1", "beta")
	betaUp.waitArrived(t, 1)
	a2 := postID(t, s.url, aliceToken, "alice-2", "alpha")
	waitFor(t, 10*time.Second, "alice's second request held by her max_concurrency", func() bool {
		return s.value(t, "citadel_gateway_queue_depth", map[string]string{"model": "alpha"}) == 1
	})
	b1 := postID(t, s.url, bobToken, "bob-1", "alpha")
	alphaUp.waitArrived(t, 1)
	alphaUp.mu.Lock()
	first := alphaUp.arrived[0]
	alphaUp.mu.Unlock()
	if first != "bob-1" {
		t.Fatalf("alpha got %s first; bob is not limited", first)
	}
	// alice's request to beta ends: her queued one for alpha goes.
	betaUp.release <- struct{}{}
	alphaUp.waitArrived(t, 2)
	alphaUp.mu.Lock()
	second := alphaUp.arrived[1]
	alphaUp.mu.Unlock()
	if second != "alice-2" {
		t.Fatalf("alpha's second request %s, want alice-2", second)
	}
	alphaUp.release <- struct{}{}
	alphaUp.release <- struct{}{}
	for i, ch := range []<-chan int{a1, a2, b1} {
		if code := <-ch; code != 200 {
			t.Errorf("request %d: %d", i, code)
		}
	}
	if n := s.gw.key("alice").inFlight.Load(); n != 0 {
		t.Errorf("alice's in flight after all ended: %d", n)
	}
}

// TestClientLeavesQueueUnwanted: a request that leaves the queue of a
// model it was waking, leaving nobody waiting, tells the supervisor the
// wake is unwanted; a request that arrives after asks for it again.
func TestClientLeavesQueueUnwanted(t *testing.T) {
	up := startFake(t, "alpha")
	m := ready("alpha", "alpha", up.base)
	m.State, m.OnDemand = "sleeping", true
	stub := newStub(m)
	s := startGateway(t, stub, defaultSettings(), nil)
	alpha := map[string]string{"model": "alpha"}

	ctx, cancel := context.WithCancel(context.Background())
	r1 := async(t, ctx, s.url+"/v1/completions", `{"model":"alpha","max_tokens":1}`)
	r2ctx, cancel2 := context.WithCancel(context.Background())
	r2 := async(t, r2ctx, s.url+"/v1/completions", `{"model":"alpha","max_tokens":1}`)
	waitFor(t, 5*time.Second, "two requests held", func() bool { return s.value(t, "citadel_gateway_queue_depth", alpha) == 2 })
	cancel()
	wait(t, r1)
	waitFor(t, 5*time.Second, "one left", func() bool { return s.value(t, "citadel_gateway_queue_depth", alpha) == 1 })
	if _, u := stub.calls("alpha"); u != 0 {
		t.Fatalf("Unwanted with a request still waiting: %d", u)
	}
	cancel2()
	wait(t, r2)
	waitFor(t, 5*time.Second, "Unwanted once the last left", func() bool { _, u := stub.calls("alpha"); return u == 1 })
	d, _ := stub.calls("alpha")
	r3 := async(t, context.Background(), s.url+"/v1/completions", `{"model":"alpha","max_tokens":1}`)
	waitFor(t, 5*time.Second, "the next request demands it again", func() bool { d2, _ := stub.calls("alpha"); return d2 > d })
	s.setAndWait(t, stub, "alpha", "ready", "")
	if got := wait(t, r3); got.code != 200 {
		t.Fatalf("after the wake: %d %s", got.code, got.body)
	}
	if _, u := stub.calls("alpha"); u != 1 {
		t.Errorf("Unwanted calls %d, want 1", u)
	}
}
