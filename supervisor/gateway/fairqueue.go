package gateway

import "container/list"

// fairQueue holds one model's waiting requests: a FIFO per API key, and
// across keys start-time fair queueing (Goyal, Vin and Cheng's SFQ, the
// scheme of llm-d's flow control and of most weighted fair queues): each
// key's head request carries a virtual start time, the queue serves the
// smallest, and a key's next request starts 1/weight after its last one.
// A key that was idle starts at the queue's current virtual time, so it
// neither saved up credit while away nor waits behind another key's
// backlog: one key's burst of a hundred requests cannot delay another
// key's single request by more than one slot (two with a request of the
// burst already being dispatched).
//
// Memory is bounded per model by max_queue, and per key fairly: when the
// queue is full, a request from a key with fewer waiting (by weight) than
// the longest pushes out that key's newest waiter (longest queue drop), so
// a key cannot hold the whole queue against the others.
//
// Requests without a key (no api_keys_file) are one key. The admission's
// mutex guards the queue.
type fairQueue struct {
	flows map[*keyState]*flow
	n     int     // waiters over all flows
	vtime float64 // the start time of the request served last
	seq   uint64  // arrival order, to break ties between equal start times
}

// flow is one key's waiters in one model's queue.
type flow struct {
	key     *keyState
	waiters list.List // of *waiter, oldest first
	start   float64   // the head waiter's virtual start time
}

func (q *fairQueue) Len() int { return q.n }

// push appends w to its key's FIFO.
func (q *fairQueue) push(w *waiter) {
	if q.flows == nil {
		q.flows = map[*keyState]*flow{}
	}
	f := q.flows[w.key]
	if f == nil {
		f = &flow{key: w.key, start: q.vtime}
		q.flows[w.key] = f
	} else if f.waiters.Len() == 0 && f.start < q.vtime {
		f.start = q.vtime // idle: no credit saved up
	}
	q.seq++
	w.seq = q.seq
	w.elem = f.waiters.PushBack(w)
	q.n++
}

// remove takes out a waiter that gives up (its client left, or max_wait).
// Its key keeps its place: the next waiter inherits the start time.
func (q *fairQueue) remove(w *waiter) {
	f := q.flows[w.key]
	if f == nil || w.elem == nil {
		return
	}
	f.waiters.Remove(w.elem)
	w.elem = nil
	q.n--
	q.forget(f)
}

// forget drops an empty flow once it has no finish time ahead of the
// queue's: it would restart at the queue's time anyway.
func (q *fairQueue) forget(f *flow) {
	if f.waiters.Len() == 0 && f.start <= q.vtime {
		delete(q.flows, f.key)
	}
}

// pop takes the waiter to serve next: the head of the flow with the
// smallest start time whose key can take a slot now (take is asked, and
// takes it), or nil when no key can.
func (q *fairQueue) pop(take func(*keyState) bool) *waiter {
	var skipped map[*flow]bool
	for {
		var best *flow
		for _, f := range q.flows {
			if f.waiters.Len() == 0 || skipped[f] {
				continue
			}
			if best == nil || f.start < best.start || (f.start == best.start && head(f).seq < head(best).seq) {
				best = f
			}
		}
		if best == nil {
			return nil
		}
		if !take(best.key) {
			if skipped == nil {
				skipped = map[*flow]bool{}
			}
			skipped[best] = true
			continue
		}
		w := best.waiters.Remove(best.waiters.Front()).(*waiter)
		w.elem = nil
		q.n--
		q.vtime = best.start
		best.start += 1 / float64(best.key.weight())
		for _, f := range q.flows {
			q.forget(f)
		}
		return w
	}
}

func head(f *flow) *waiter { return f.waiters.Front().Value.(*waiter) }

// victim is the waiter to push out so that a request of key k can wait in
// a full queue: the newest waiter of the key holding the most of the queue
// for its weight, if that is more than k would hold with one more.
// nil: k itself holds the most, so its new request is the one refused.
func (q *fairQueue) victim(k *keyState) *waiter {
	mine := 1.0
	if f := q.flows[k]; f != nil {
		mine += float64(f.waiters.Len())
	}
	mine /= float64(k.weight())
	var worst *flow
	var most float64
	for _, f := range q.flows {
		if f.key == k || f.waiters.Len() == 0 {
			continue
		}
		if share := float64(f.waiters.Len()) / float64(f.key.weight()); share > most {
			worst, most = f, share
		}
	}
	if worst == nil || most <= mine {
		return nil
	}
	return worst.waiters.Back().Value.(*waiter)
}

// each calls fn on every waiter, oldest key flow order aside.
func (q *fairQueue) each(fn func(*waiter)) {
	for _, f := range q.flows {
		for e := f.waiters.Front(); e != nil; e = e.Next() {
			fn(e.Value.(*waiter))
		}
	}
}

// clear empties the queue, calling fn on every waiter taken out.
func (q *fairQueue) clear(fn func(*waiter)) {
	q.each(func(w *waiter) {
		w.elem = nil
		fn(w)
	})
	q.flows = nil
	q.n = 0
}
