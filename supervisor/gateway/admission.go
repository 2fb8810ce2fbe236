package gateway

import (
	"container/list"
	"context"
	"sync"
	"time"
)

// gate is what a model's state means for the requests that name it.
type gate int

const (
	// gateHold: not ready yet (pending, starting, backoff, unhealthy,
	// stopping, and later sleeping or waking): requests wait in the queue.
	gateHold gate = iota
	// gateOpen: ready; requests go through up to max_concurrency.
	gateOpen
	// gateClosed: failed, held stopped, disabled or removed: requests are
	// refused at once, and those waiting are told why.
	gateClosed
)

// Timer is the clock the queue waits on; tests inject their own.
type Timer func(d time.Duration) (c <-chan time.Time, stop func())

func realTimer(d time.Duration) (<-chan time.Time, func()) {
	t := time.NewTimer(d)
	return t.C, func() { t.Stop() }
}

// admission is one model's door: at most limit requests in flight, then a
// FIFO of waiters up to the queue bound. It is the one place a request
// waits for its model, whatever it waits for (a free slot, or the model
// becoming ready: the supervisor's state changes open and close the gate),
// so waking an on-demand model only has to open the same gate.
//
// It is small and self-contained, so a mutex guards it: every request
// passes here, and a channel round trip to an owning goroutine would cost
// more than the work it protects.
type admission struct {
	mu       sync.Mutex
	gate     gate
	reason   string // why the gate is held or closed, for the client
	limit    int    // max_concurrency; 0 = no cap
	inFlight int
	queue    list.List // of *waiter, oldest first
	// floor is the Seq of the model's state at its last drain: an older
	// state (a snapshot read before the drain began) is ignored, so it
	// cannot reopen the door of a model going to sleep.
	floor uint64
	idle  chan struct{} // closed when inFlight reaches 0; nil when nobody waits
}

// removedSeq closes a removed model's door whatever its last state.
const removedSeq = ^uint64(0)

type waiter struct {
	ready chan struct{} // closed once granted or refused
	err   *apiError     // nil when granted
	done  bool          // granted or refused: no longer in the queue
}

// setState applies the model's new state; it may admit waiters, or refuse
// them all when the gate closes.
func (a *admission) setState(g gate, reason string, limit int, seq uint64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if seq < a.floor {
		return // older than a drain: the model has moved on since
	}
	a.gate, a.reason, a.limit = g, reason, limit
	if g == gateClosed {
		for e := a.queue.Front(); e != nil; e = a.queue.Front() {
			w := a.queue.Remove(e).(*waiter)
			w.done, w.err = true, errUnavailable(reason)
			close(w.ready)
		}
		return
	}
	a.dispatch()
}

// dispatch admits waiters while there is room. Called with mu held.
func (a *admission) dispatch() {
	for a.gate == gateOpen && a.queue.Len() > 0 && (a.limit == 0 || a.inFlight < a.limit) {
		w := a.queue.Remove(a.queue.Front()).(*waiter)
		a.inFlight++
		w.done = true
		close(w.ready)
	}
}

// release gives back a slot taken by acquire.
func (a *admission) release() {
	a.mu.Lock()
	a.inFlight--
	a.dispatch()
	a.wakeDrain()
	a.mu.Unlock()
}

// wakeDrain tells a waiting drain that nothing is in flight. Called with
// mu held.
func (a *admission) wakeDrain() {
	if a.inFlight == 0 && a.idle != nil {
		close(a.idle)
		a.idle = nil
	}
}

// drain holds the door (requests wait in the queue) for the model's state
// seq and older, and returns once no request is in flight, or ctx ends.
// The model's next state (seq+1 or later) opens the door again.
func (a *admission) drain(ctx context.Context, seq uint64, reason string) error {
	a.mu.Lock()
	if seq > a.floor {
		a.floor = seq
	}
	if a.gate == gateOpen {
		a.gate, a.reason = gateHold, reason
	}
	if a.inFlight == 0 {
		a.mu.Unlock()
		return nil
	}
	if a.idle == nil {
		a.idle = make(chan struct{})
	}
	idle := a.idle
	a.mu.Unlock()
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// acquire takes a slot for one request, waiting at most maxWait behind at
// most maxQueue others. On success the caller must call release. waited
// reports whether the request was queued (it then counts in
// queue_wait_seconds whatever the outcome).
func (a *admission) acquire(ctx context.Context, maxQueue int, maxWait time.Duration, timer Timer) (waited bool, err *apiError) {
	a.mu.Lock()
	switch {
	case a.gate == gateClosed:
		reason := a.reason
		a.mu.Unlock()
		return false, errUnavailable(reason)
	case a.gate == gateOpen && a.queue.Len() == 0 && (a.limit == 0 || a.inFlight < a.limit):
		a.inFlight++
		a.mu.Unlock()
		return false, nil
	case a.queue.Len() >= maxQueue:
		busy := a.gate == gateOpen
		a.mu.Unlock()
		return false, errQueueFull(maxQueue, busy)
	}
	w := &waiter{ready: make(chan struct{})}
	e := a.queue.PushBack(w)
	a.mu.Unlock()

	expired, stop := timer(maxWait)
	defer stop()
	select {
	case <-w.ready:
		return true, w.err
	case <-expired:
	case <-ctx.Done():
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if w.done { // granted or refused just as we gave up: honour it
		if w.err == nil && ctx.Err() != nil {
			a.inFlight--
			a.dispatch()
			a.wakeDrain()
			return true, errClientGone
		}
		return true, w.err
	}
	a.queue.Remove(e)
	if ctx.Err() != nil {
		return true, errClientGone
	}
	return true, errMaxWait(maxWait, a.gate != gateOpen, a.reason)
}

// load reports the requests in flight and waiting, for the metrics.
func (a *admission) load() (inFlight, queued int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.inFlight, a.queue.Len()
}

// state is the gate and its reason, for error messages.
func (a *admission) state() (gate, string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.gate, a.reason
}
