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
		_, err := a.acquire(ctx, maxQueue, time.Minute, clock.timer)
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
	a.setState(gateOpen, "", 1)
	clock := &manualTimer{}
	if _, err := a.acquire(context.Background(), 2, time.Minute, clock.timer); err != nil {
		t.Fatal(err)
	}
	first := try(a, context.Background(), 2, clock)
	queued(t, a, 1)
	second := try(a, context.Background(), 2, clock)
	queued(t, a, 2)
	if _, err := a.acquire(context.Background(), 2, time.Minute, clock.timer); err == nil || err.status != 429 {
		t.Fatalf("third waiter with max_queue 2: %v", err)
	}
	a.release()
	if err := outcome(t, first); err != nil {
		t.Fatalf("oldest waiter: %v", err)
	}
	select {
	case <-second:
		t.Fatal("the second waiter got the slot too: max_concurrency 1")
	default:
	}
	a.release()
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
	a.setState(gateHold, "model m is starting: loading", 0)
	w := try(a, context.Background(), 4, clock)
	queued(t, a, 1)
	a.setState(gateOpen, "", 0)
	if err := outcome(t, w); err != nil {
		t.Fatalf("ready admits the waiter: %v", err)
	}
	a.release()

	a.setState(gateHold, "model m is backoff", 0)
	w = try(a, context.Background(), 4, clock)
	queued(t, a, 1)
	clock.fire()
	if err := outcome(t, w); err == nil || err.status != 503 || err.retryAfter != retryLoading || err.reject != RejectMaxWait {
		t.Fatalf("max_wait while held: %+v", err)
	}

	w = try(a, context.Background(), 4, clock)
	queued(t, a, 1)
	a.setState(gateClosed, "model m is failed: start limit", 0)
	if err := outcome(t, w); err == nil || err.status != 503 || err.msg != "model m is failed: start limit" {
		t.Fatalf("closing refuses waiters with the reason: %+v", err)
	}
	if _, err := a.acquire(context.Background(), 4, time.Minute, clock.timer); err == nil || err.reject != RejectUnavailable {
		t.Fatalf("closed: %+v", err)
	}

	a.setState(gateHold, "", 0)
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
