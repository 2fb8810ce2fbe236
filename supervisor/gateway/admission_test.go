package gateway

import (
	"context"
	"testing"
	"time"
)

// try starts acquire in the background; its outcome arrives on the channel.
func try(a *admission, ctx context.Context, maxQueue int, clock *manualTimer) <-chan *apiError {
	ch := make(chan *apiError, 1)
	go func() {
		_, err := a.acquire(ctx, noKey, maxQueue, time.Minute, clock.timer, nil)
		ch <- err
	}()
	return ch
}

func queued(t *testing.T, a *admission, n int) {
	t.Helper()
	waitFor(t, 5*time.Second, "waiters queued", func() bool { _, q := a.load(); return q == n })
}

func outcome(t *testing.T, ch <-chan *apiError) *apiError {
	t.Helper()
	select {
	case err := <-ch:
		return err
	case <-time.After(5 * time.Second):
		t.Fatal("acquire did not return within 5s")
	}
	return nil
}

func TestAdmissionFIFO(t *testing.T) {
	a := &admission{}
	a.setState(gateOpen, "", 1, 0)
	clock := &manualTimer{}
	if _, err := a.acquire(context.Background(), noKey, 2, time.Minute, clock.timer, nil); err != nil {
		t.Fatal(err)
	}
	first := try(a, context.Background(), 2, clock)
	queued(t, a, 1)
	second := try(a, context.Background(), 2, clock)
	queued(t, a, 2)
	if _, err := a.acquire(context.Background(), noKey, 2, time.Minute, clock.timer, nil); err == nil || err.status != 429 {
		t.Fatalf("third waiter with max_queue 2: %v", err)
	}
	a.release(noKey)
	if err := outcome(t, first); err != nil {
		t.Fatalf("oldest waiter: %v", err)
	}
	select {
	case <-second:
		t.Fatal("the second waiter got the slot too: max_concurrency 1")
	default:
	}
	a.release(noKey)
	if err := outcome(t, second); err != nil {
		t.Fatal(err)
	}
	if f, q := a.load(); f != 1 || q != 0 {
		t.Errorf("in flight %d queued %d", f, q)
	}
}

func TestAdmissionFollowsState(t *testing.T) {
	clock := &manualTimer{}
	a := &admission{}
	a.setState(gateHold, "model m is starting: loading", 0, 0)
	w := try(a, context.Background(), 4, clock)
	queued(t, a, 1)
	a.setState(gateOpen, "", 0, 0)
	if err := outcome(t, w); err != nil {
		t.Fatalf("ready admits the waiter: %v", err)
	}
	a.release(noKey)

	a.setState(gateHold, "model m is backoff", 0, 0)
	w = try(a, context.Background(), 4, clock)
	queued(t, a, 1)
	clock.fire()
	if err := outcome(t, w); err == nil || err.status != 503 || err.retryAfter != minRetryUnknown || err.reject != RejectMaxWait {
		t.Fatalf("max_wait while held: %+v", err)
	}

	w = try(a, context.Background(), 4, clock)
	queued(t, a, 1)
	a.setState(gateClosed, "model m is failed: start limit", 0, 0)
	if err := outcome(t, w); err == nil || err.status != 503 || err.msg != "model m is failed: start limit" {
		t.Fatalf("closing refuses waiters with the reason: %+v", err)
	}
	if _, err := a.acquire(context.Background(), noKey, 4, time.Minute, clock.timer, nil); err == nil || err.reject != RejectUnavailable {
		t.Fatalf("closed: %+v", err)
	}

	a.setState(gateHold, "", 0, 0)
	ctx, cancel := context.WithCancel(context.Background())
	w = try(a, ctx, 4, clock)
	queued(t, a, 1)
	cancel()
	if err := outcome(t, w); err != errClientGone {
		t.Fatalf("client gone: %+v", err)
	}
	if f, q := a.load(); f != 0 || q != 0 {
		t.Errorf("after a client left: in flight %d queued %d", f, q)
	}
	if a.inFlight != 0 {
		t.Error("slot leaked")
	}
}

// TestAdmissionDrain: a drain holds the door, waits for the request in
// flight, and no state older than the drain's reopens the door (a snapshot
// read before the model announced its sleep must not let a request reach
// a sleeping engine); the model's next state does.
func TestAdmissionDrain(t *testing.T) {
	a := &admission{}
	a.setState(gateOpen, "", 0, 4)
	clock := &manualTimer{}
	if _, err := a.acquire(context.Background(), noKey, 8, time.Minute, clock.timer, nil); err != nil {
		t.Fatal(err)
	}
	drained := make(chan error, 1)
	go func() { drained <- a.drain(context.Background(), 5, "model m is going to sleep") }()
	deadline := time.Now().Add(5 * time.Second)
	for g, _ := a.state(); g != gateHold; g, _ = a.state() {
		if time.Now().After(deadline) {
			t.Fatal("the drain did not hold the door within 5s")
		}
		time.Sleep(time.Millisecond)
	}
	// The next request waits: the door is held.
	waiting := try(a, context.Background(), 8, clock)
	queued(t, a, 1)
	select {
	case err := <-drained:
		t.Fatalf("drained with a request in flight: %v", err)
	default:
	}
	a.release(noKey)
	select {
	case err := <-drained:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("drain did not return after the last request")
	}
	a.setState(gateOpen, "", 0, 4) // stale: read before the sleep
	if g, _ := a.state(); g != gateHold {
		t.Fatalf("a state older than the drain reopened the door: %v", g)
	}
	queued(t, a, 1)
	a.setState(gateOpen, "", 0, 6) // awake again
	if err := outcome(t, waiting); err != nil {
		t.Fatalf("after the wake: %v", err)
	}
}

// TestAdmissionDrainGivesUp: a drain bounded by ctx returns its error while
// a request is still in flight.
func TestAdmissionDrainGivesUp(t *testing.T) {
	a := &admission{}
	a.setState(gateOpen, "", 0, 1)
	if _, err := a.acquire(context.Background(), noKey, 8, time.Minute, (&manualTimer{}).timer, nil); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := a.drain(ctx, 2, "going to sleep"); err == nil {
		t.Fatal("drained with a request in flight")
	}
}
