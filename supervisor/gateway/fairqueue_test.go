package gateway

import (
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"strings"
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
