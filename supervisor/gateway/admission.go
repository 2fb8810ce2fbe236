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
// fair queue of waiters (fairqueue.go: FIFO per key, weighted across keys)
// up to the queue bound. It is the one place a request
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
	queue    fairQueue
	// floor is the Seq of the model's state at its last drain: an older
	// state (a snapshot read before the drain began) is ignored, so it
	// cannot reopen the door of a model going to sleep.
	floor uint64
	idle  chan struct{} // closed when inFlight reaches 0; nil when nobody waits

	// loading is how long the model's start or wake will likely take, for
	// the Retry-After of a request it refuses (eta.go).
	loading Loading
	now     func() time.Time
	// demand and unwanted tell the supervisor that a request waits for
	// the model, and that none waits any more (Models.Demand and
	// Models.Unwanted). Called with mu held, so the supervisor sees them
	// in the queue's order.
	demand, unwanted func()
}

// removedSeq closes a removed model's door whatever its last state.
const removedSeq = ^uint64(0)

type waiter struct {
	ready chan struct{} // closed once granted or refused
	err   *apiError     // nil when granted
	done  bool          // granted or refused: no longer in the queue
	key   *keyState
	elem  *list.Element // in its key's flow, while queued
	seq   uint64        // arrival order in the queue
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
		a.queue.clear(func(w *waiter) {
			w.done, w.err = true, errUnavailable(reason)
			close(w.ready)
		})
		return
	}
	a.dispatch()
}

// dispatch admits waiters while there is room, the next by the fair
// queue among keys below their max_concurrency. Called with mu held.
func (a *admission) dispatch() {
	for a.gate == gateOpen && a.queue.Len() > 0 && (a.limit == 0 || a.inFlight < a.limit) {
		w := a.queue.pop((*keyState).tryOrBlock)
		if w == nil {
			return // every waiting key is at its max_concurrency
		}
		a.inFlight++
		w.done = true
		close(w.ready)
	}
}

// redispatch looks at the queue again: a key it skipped has a free slot.
func (a *admission) redispatch() {
	a.mu.Lock()
	a.dispatch()
	a.mu.Unlock()
}

// release gives back the slots (the model's and the key's) taken by
// acquire.
func (a *admission) release(k *keyState) {
	a.mu.Lock()
	a.inFlight--
	k.inFlight.Add(-1)
	a.dispatch()
	a.wakeDrain()
	a.mu.Unlock()
	k.unblock()
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
//
// k is the request's key (keyless requests share one): the queue is fair
// across keys, and the key's max_concurrency counts the slot too. hold,
// when not nil, is told while the request waits (held.go).
func (a *admission) acquire(ctx context.Context, k *keyState, maxQueue int, maxWait time.Duration, timer Timer, hold *holder) (waited bool, err *apiError) {
	a.mu.Lock()
	switch {
	case a.gate == gateClosed:
		reason := a.reason
		a.mu.Unlock()
		return false, errUnavailable(reason)
	case a.gate == gateOpen && a.queue.Len() == 0 && (a.limit == 0 || a.inFlight < a.limit) && k.tryAcquire():
		a.inFlight++
		a.mu.Unlock()
		return false, nil
	}
	if a.queue.Len() >= maxQueue {
		// Full: a key holding more than its share gives up its newest
		// waiter to this one (fairqueue.go); else this one is refused.
		v := a.queue.victim(k)
		if v == nil {
			e := errQueueFull(maxQueue, a.gate == gateOpen, a.retryAfter())
			a.mu.Unlock()
			return false, e
		}
		a.queue.remove(v)
		v.done, v.err = true, errQueueFull(maxQueue, a.gate == gateOpen, a.retryAfter())
		close(v.ready)
	}
	w := &waiter{ready: make(chan struct{}), key: k}
	a.queue.push(w)
	a.dispatch() // a free slot that only a blocked key's waiters could not take
	if w.done {
		a.mu.Unlock()
		return false, w.err
	}
	if a.gate == gateHold && a.demand != nil {
		a.demand()
	}
	a.mu.Unlock()

	expired, stop := timer(maxWait)
	defer stop()
	var tick <-chan time.Time
	if hold != nil {
		tick = hold.start(timer)
		defer hold.stop()
	}
	for {
		select {
		case <-w.ready:
			return true, w.err
		case <-tick:
			a.mu.Lock()
			g, reason, load := a.gate, a.reason, a.loading
			a.mu.Unlock()
			tick = hold.tick(g, reason, load, timer)
			continue
		case <-expired:
		case <-ctx.Done():
		}
		break
	}
	a.mu.Lock()
	if w.done { // granted or refused just as we gave up: honour it
		if w.err == nil && ctx.Err() != nil {
			a.inFlight--
			k.inFlight.Add(-1)
			a.dispatch()
			a.wakeDrain()
			a.mu.Unlock()
			k.unblock()
			return true, errClientGone
		}
		a.mu.Unlock()
		return true, w.err
	}
	defer a.mu.Unlock()
	a.queue.remove(w)
	if a.queue.Len() == 0 && a.gate == gateHold && a.inFlight == 0 && a.unwanted != nil {
		a.unwanted() // nobody waits for the start or wake any more
	}
	if ctx.Err() != nil {
		return true, errClientGone
	}
	return true, errMaxWait(maxWait, a.gate != gateOpen, a.reason, a.retryAfter())
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
