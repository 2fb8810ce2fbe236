package gateway

import (
	"context"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// testKey is a key with policy p, as Apply builds one.
func testKey(name string, p Policy) *keyState {
	k := &keyState{name: name}
	k.pol.Store(newPolicy(p, nil, time.Now()))
	return k
}

// noKey stands for requests without a key, in tests of one queue.
var noKey = testKey("", Policy{})

// push queues a new waiter of key k in q.
func pushW(q *fairQueue, k *keyState) *waiter {
	w := &waiter{ready: make(chan struct{}), key: k}
	q.push(w)
	return w
}

func always(*keyState) bool { return true }

// TestFairQueueBurstCannotStarve: one key's twelve queued requests and
// another key's single one arriving after them: the single one is served
// within the next two slots.
func TestFairQueueBurstCannotStarve(t *testing.T) {
	alice, bob := testKey("alice", Policy{}), testKey("bob", Policy{})
	var q fairQueue
	for range 12 {
		pushW(&q, alice)
	}
	b := pushW(&q, bob)
	for slot := 1; ; slot++ {
		w := q.pop(always)
		if w == b {
			if slot > 2 {
				t.Fatalf("bob served in slot %d, want within 2", slot)
			}
			break
		}
		if slot > 2 {
			t.Fatal("bob not served within two slots")
		}
	}
	// Then alice's eleven, in their order.
	var last uint64
	for q.Len() > 0 {
		w := q.pop(always)
		if w.key != alice || w.seq < last {
			t.Fatalf("after bob: %s seq %d after %d", w.key.name, w.seq, last)
		}
		last = w.seq
	}
}

// TestFairQueueWeights: two backlogged keys share the slots by weight.
func TestFairQueueWeights(t *testing.T) {
	heavy, light := testKey("heavy", Policy{Weight: 3}), testKey("light", Policy{})
	var q fairQueue
	for range 40 {
		pushW(&q, heavy)
		pushW(&q, light)
	}
	served := map[*keyState]int{}
	for range 40 {
		served[q.pop(always).key]++
	}
	if served[heavy] != 30 || served[light] != 10 {
		t.Errorf("of 40 slots: heavy %d light %d, want 30 and 10", served[heavy], served[light])
	}
}

// TestFairQueueIdleKeySavesNoCredit: a key that was idle while another was
// served starts at the queue's time, not ahead of the others' backlog.
func TestFairQueueIdleKeySavesNoCredit(t *testing.T) {
	alice, bob := testKey("alice", Policy{}), testKey("bob", Policy{})
	var q fairQueue
	pushW(&q, bob)
	q.pop(always) // bob was served once, long ago
	for range 20 {
		pushW(&q, alice)
	}
	for range 10 {
		q.pop(always)
	}
	for range 5 {
		pushW(&q, bob)
	}
	// Now bob and alice alternate: bob gets no burst of 5 for being away.
	var order []string
	for range 6 {
		order = append(order, q.pop(always).key.name)
	}
	if got := strings.Join(order, " "); got != "alice bob alice bob alice bob" && got != "bob alice bob alice bob alice" {
		t.Errorf("order %q, want alternation", got)
	}
}

// TestFairQueueLongestDrop: a full queue makes room for a key holding
// less than the others by pushing out the newest waiter of the key that
// holds the most; the key holding the most is the one refused.
func TestFairQueueLongestDrop(t *testing.T) {
	alice, bob := testKey("alice", Policy{}), testKey("bob", Policy{Weight: 2})
	var q fairQueue
	var alices []*waiter
	for range 8 {
		alices = append(alices, pushW(&q, alice))
	}
	if v := q.victim(alice); v != nil {
		t.Fatal("alice holds the whole queue: her own ninth is refused, no one pushed out")
	}
	if v := q.victim(bob); v != alices[7] {
		t.Fatalf("bob's first: victim %v, want alice's newest", v)
	}
	// bob at weight 2 may hold twice alice's count.
	for range 5 {
		v := q.victim(bob)
		if v == nil {
			break
		}
		q.remove(v)
		pushW(&q, bob)
	}
	if a, b := q.flows[alice].waiters.Len(), q.flows[bob].waiters.Len(); a != 3 || b != 5 || q.Len() != 8 {
		t.Errorf("alice %d bob %d (total %d), want 3 and 5: shares 3/1 and 5/2 before bob's next would exceed hers", a, b, q.Len())
	}
}

// TestFairQueueRandom runs random pushes, abandons and pops over keys of
// random weights and checks, after every step: each key is served in its
// arrival order; the count is right; a full queue stays within its bound;
// and SFQ's fairness bound: while two keys are both backlogged, the
// service each gets, divided by its weight, differs by at most
// 1/wa + 1/wb. A failure prints the seed; -fairqueue.seed replays it.
func TestFairQueueRandom(t *testing.T) {
	seeds := []int64{*fqSeed}
	if *fqSeed == 0 {
		seeds = nil
		for i := range 50 {
			seeds = append(seeds, time.Now().UnixNano()+int64(i))
		}
	}
	for _, seed := range seeds {
		if !fairQueueRun(t, seed) {
			t.Fatalf("failing seed %d: go test -run TestFairQueueRandom ./supervisor/gateway -fairqueue.seed=%d", seed, seed)
		}
	}
}

var fqSeed = flag.Int64("fairqueue.seed", 0, "replay TestFairQueueRandom with this seed")

func fairQueueRun(t *testing.T, seed int64) bool {
	t.Helper()
	rng := rand.New(rand.NewPCG(uint64(seed), 0))
	const maxQueue = 24
	var keys []*keyState
	for i := range 1 + rng.IntN(5) {
		keys = append(keys, testKey(fmt.Sprintf("k%d", i), Policy{Weight: 1 + rng.IntN(4)}))
	}
	var q fairQueue
	queued := map[*keyState][]*waiter{}
	lastServed := map[*keyState]uint64{}
	// served counts pops per key since both of a pair became backlogged.
	type pair struct{ a, b *keyState }
	since := map[pair][2]int{}
	backlogged := func(k *keyState) bool { return len(queued[k]) > 0 }
	ok := true
	fail := func(format string, args ...any) {
		t.Errorf("seed %d: "+format, append([]any{seed}, args...)...)
		ok = false
	}
	for step := 0; step < 2000 && ok; step++ {
		switch r := rng.IntN(10); {
		case r < 5: // arrive
			k := keys[rng.IntN(len(keys))]
			if q.Len() >= maxQueue {
				v := q.victim(k)
				if v == nil {
					// k must hold the most for its weight.
					mine := float64(len(queued[k])+1) / float64(k.weight())
					for _, o := range keys {
						if o != k && float64(len(queued[o]))/float64(o.weight()) > mine {
							fail("step %d: %s refused though %s holds more", step, k.name, o.name)
						}
					}
					continue
				}
				q.remove(v)
				queued[v.key] = slices.DeleteFunc(queued[v.key], func(w *waiter) bool { return w == v })
			}
			queued[k] = append(queued[k], pushW(&q, k))
		case r < 6: // a waiter gives up
			k := keys[rng.IntN(len(keys))]
			if n := len(queued[k]); n > 0 {
				i := rng.IntN(n)
				q.remove(queued[k][i])
				queued[k] = slices.Delete(queued[k], i, i+1)
			}
		default: // a slot frees
			before := map[*keyState]bool{}
			for _, k := range keys {
				before[k] = backlogged(k)
			}
			w := q.pop(always)
			if w == nil {
				if q.Len() != 0 {
					fail("step %d: nothing served with %d queued", step, q.Len())
				}
				continue
			}
			k := w.key
			if len(queued[k]) == 0 || queued[k][0] != w {
				fail("step %d: %s served out of its order", step, k.name)
				continue
			}
			if w.seq < lastServed[k] {
				fail("step %d: %s served seq %d after %d", step, k.name, w.seq, lastServed[k])
			}
			lastServed[k] = w.seq
			queued[k] = queued[k][1:]
			for _, a := range keys {
				for _, b := range keys {
					if a == b || !before[a] || !before[b] {
						continue
					}
					c := since[pair{a, b}]
					if w.key == a {
						c[0]++
					}
					if w.key == b {
						c[1]++
					}
					since[pair{a, b}] = c
					diff := math.Abs(float64(c[0])/float64(a.weight()) - float64(c[1])/float64(b.weight()))
					if bound := 1/float64(a.weight()) + 1/float64(b.weight()); diff > bound+1e-9 {
						fail("step %d: %s (w%d) served %d and %s (w%d) %d while both waited: over the bound %.2f",
							step, a.name, a.weight(), c[0], b.name, b.weight(), c[1], bound)
					}
				}
			}
		}
		total := 0
		for _, k := range keys {
			total += len(queued[k])
			if !backlogged(k) {
				for _, o := range keys {
					delete(since, pair{k, o})
					delete(since, pair{o, k})
				}
			}
		}
		if total != q.Len() || total > maxQueue {
			fail("step %d: %d queued, the queue says %d (bound %d)", step, total, q.Len(), maxQueue)
		}
	}
	return ok
}

// TestAdmissionRandom runs requests of several keys, some with a
// max_concurrency, through one model's admission while the model's state
// and max_concurrency change and clients give up, and checks what must
// always hold: never more in flight than the model's limit or a key's
// cap, every request answered, and every count back to zero at the end.
// A failure prints the seed; -fairqueue.seed replays the choices.
func TestAdmissionRandom(t *testing.T) {
	seed := *fqSeed
	if seed == 0 {
		seed = time.Now().UnixNano()
	}
	rng := rand.New(rand.NewPCG(uint64(seed), 1))
	defer func() {
		if t.Failed() {
			t.Logf("failing seed %d: go test -run TestAdmissionRandom ./supervisor/gateway -fairqueue.seed=%d", seed, seed)
		}
	}()
	var keys []*keyState
	for i := range 4 {
		k := testKey(fmt.Sprintf("k%d", i), Policy{MaxConcurrency: rng.IntN(3), Weight: 1 + rng.IntN(3)})
		keys = append(keys, k)
	}
	var limit atomic.Int64 // the model's max_concurrency now, 1 to 3
	limit.Store(2)
	a := &admission{}
	a.setState(gateOpen, "", 2, 0)
	var seq uint64
	for _, k := range keys {
		k.poke = a.redispatch
	}
	var model atomic.Int64
	perKey := make([]atomic.Int64, len(keys))
	var wg sync.WaitGroup
	var granted, refused, gone atomic.Int64
	const requests = 400
	plans := make([]struct {
		key    int
		cancel bool
		spin   int
	}, requests)
	for i := range plans {
		plans[i].key, plans[i].cancel, plans[i].spin = rng.IntN(len(keys)), rng.IntN(5) == 0, rng.IntN(50)
	}
	for i := range requests {
		p := plans[i]
		wg.Go(func() {
			k := keys[p.key]
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if p.cancel {
				go func() {
					for range p.spin {
						runtime.Gosched()
					}
					cancel()
				}()
			}
			_, err := a.acquire(ctx, k, 16, time.Hour, realTimer, nil)
			switch {
			case err == errClientGone:
				gone.Add(1)
				return
			case err != nil:
				refused.Add(1)
				return
			}
			granted.Add(1)
			// A lowered limit leaves requests in flight above it; none
			// ever exceeds the highest limit set (3).
			if n := model.Add(1); n > 3 {
				t.Errorf("%d in flight over every limit set (at most 3)", n)
			}
			if n, c := perKey[p.key].Add(1), k.policy().maxConc; c > 0 && n > c {
				t.Errorf("key %s: %d in flight over its max_concurrency %d", k.name, n, c)
			}
			for range p.spin {
				runtime.Gosched()
			}
			perKey[p.key].Add(-1)
			model.Add(-1)
			a.release(k)
		})
	}
	// The model's state changes while they run: busy, closed, back.
	for range 30 {
		seq++
		switch r := rng.IntN(10); {
		case r < 7:
			l := 1 + rng.IntN(3)
			limit.Store(int64(l))
			a.setState(gateOpen, "", l, seq)
		case r < 9:
			a.setState(gateHold, "starting", int(limit.Load()), seq)
		default:
			a.setState(gateClosed, "failed", int(limit.Load()), seq)
		}
		runtime.Gosched()
	}
	seq++
	a.setState(gateOpen, "", int(limit.Load()), seq)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		inFlight, queued := a.load()
		t.Fatalf("requests still waiting after 30s: %d in flight, %d queued", inFlight, queued)
	}
	if inFlight, queued := a.load(); inFlight != 0 || queued != 0 {
		t.Errorf("at the end: %d in flight, %d queued", inFlight, queued)
	}
	for _, k := range keys {
		if n := k.inFlight.Load(); n != 0 {
			t.Errorf("key %s: %d in flight at the end", k.name, n)
		}
	}
	if g, r, c := granted.Load(), refused.Load(), gone.Load(); g+r+c != requests {
		t.Errorf("granted %d + refused %d + gone %d != %d", g, r, c, requests)
	}
}
