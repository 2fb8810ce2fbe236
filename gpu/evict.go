package gpu

import (
	"math"
	"slices"
	"strings"
	"time"
)

// The eviction policy: which on-demand models are put to sleep (or
// stopped) first when a model must make room. docs/on-demand.md explains it
// to operators; this file is its one home.
//
// Two kinds of eviction, ordered apart (awake models go first, sleepers
// only when putting awake ones to sleep is not enough):
//
//   - An awake model put to sleep costs its clients a wake when they come
//     back. Awake models are ordered by a GreedyDual-Size-Frequency worth
//     (Cherkasova, "Improving WWW proxy performance with
//     Greedy-Dual-Size-Frequency caching", HP Labs HPL-98-69):
//
//     rate × wake / size
//
//     the one worth least first: its wake (at the level it sleeps at, or its
//     cold start when it is stopped instead) per byte its sleep gives back,
//     times how often it is asked for. GDSF ages its values with an
//     inflation clock kept between decisions; here the frequency fades
//     instead (an exponentially decayed count of requests, as in Lee et
//     al.'s LRFU, IEEE Trans. Computers 50(12), 2001), and the rate is never
//     taken below what the last request alone implies (1 / time since it):
//     a model in the middle of a session is kept as LRU would keep it.
//
//   - A sleeper stopped for its residue (CUDA graphs, NCCL buffers: about
//     the same for every model) costs its clients a cold start instead of
//     a wake when they come back, minutes instead of seconds. Sleepers are
//     ordered by rate × (start − wake): the ones least likely to be wanted
//     again, and cheapest to start again, first. Size does not enter (the
//     residues are alike), and recency counts for a tenth of what it counts
//     for an awake model (sleeperRecency): a sleeper's session is mostly
//     over; what counts is whether it comes back.
//
// The trace replay (replay_test.go) chose these forms: against LRU it
// measured the sleepers' order as what saves most of the clients' waiting
// (most of it is cold starts), the awake order as about even with LRU.
// Between models of equal worth (same costs, sizes and traffic, or nothing
// known yet) it is least recently used first, as before.

// UseHalfLife is how fast a model's count of requests fades: a request
// counts half as much this long after it came.
const UseHalfLife = 2 * time.Hour

// Uses is a model's requests, counted with exponential decay (UseHalfLife).
// The zero value is no request.
type Uses struct {
	N  float64   // the count as of At
	At time.Time // the last request
}

// Add counts a request at now.
func (u Uses) Add(now time.Time) Uses { return Uses{N: u.Count(now) + 1, At: now} }

// Count is the decayed count at now.
func (u Uses) Count(now time.Time) float64 {
	if u.N == 0 {
		return 0
	}
	d := now.Sub(u.At)
	if d <= 0 {
		return u.N
	}
	return u.N * math.Exp2(-d.Seconds()/UseHalfLife.Seconds())
}

// Rate is the requests per second u implies at now: the decayed count
// spread over its window (UseHalfLife / ln 2).
func (u Uses) Rate(now time.Time) float64 {
	return u.Count(now) * math.Ln2 / UseHalfLife.Seconds()
}

// Cost is what putting a model to sleep (or stopping it) costs its clients
// when it is wanted again, as its recent starts and wakes measured it.
type Cost struct {
	Wake  time.Duration // its typical wake at the level it sleeps at; 0: none yet
	Start time.Duration // its typical cold start; 0: none yet
	Level int           // the level it sleeps at when evicted; 0: it is stopped
	Uses  Uses          // its requests
}

// Victim is an on-demand model that may make room: awake (to be put to
// sleep) or asleep (to be stopped for its residue).
type Victim struct {
	*Claim
	// Frees is the memory it gives back on its GPUs: an awake model its
	// share, a sleeper what it still holds.
	Frees uint64
}

// EvictionOrder sorts vs (all awake, or all asleep), the first to go
// first: lower priority first, then one that no request waits for, then
// the least worth keeping (above), then least recently used, then by name. A cost not measured yet is taken in
// proportion to the model's size, at the mean cost per byte of the measured
// ones of its kind among vs (a wake, a cold start, a sleeper's stop), or the
// same for every model when none is measured: a model is not evicted first
// merely for being new, nor kept for it.
func EvictionOrder(vs []Victim, now time.Time) {
	perByte := meanCostPerByte(vs)
	worth := make(map[*Claim]float64, len(vs))
	for _, v := range vs {
		cost, known := costOf(v)
		k := kindOf(v)
		pb := perByte[k]
		if known {
			pb = cost / float64(size(v))
		}
		worth[v.Claim] = rateOf(v, now) * pb
	}
	slices.SortStableFunc(vs, func(a, b Victim) int {
		if c := comparePriorityWaiting(a, b); c != 0 {
			return c
		}
		if c := compareWorth(worth[a.Claim], worth[b.Claim]); c != 0 {
			return c
		}
		if c := a.LastUsed.Compare(b.LastUsed); c != 0 {
			return c
		}
		return strings.Compare(a.Name, b.Name)
	})
}

// LRUOrder is the order before costs were known: lower priority first,
// then one no request waits for, then least recently used. The replay
// benchmark compares with it.
func LRUOrder(vs []Victim, _ time.Time) {
	slices.SortStableFunc(vs, func(a, b Victim) int {
		if c := comparePriorityWaiting(a, b); c != 0 {
			return c
		}
		if c := a.LastUsed.Compare(b.LastUsed); c != 0 {
			return c
		}
		return strings.Compare(a.Name, b.Name)
	})
}

// The kinds of cost a victim has: its clients will next wait for a wake,
// a cold start, or (a sleeper stopped) a cold start instead of a wake.
const (
	kindWake = iota
	kindStart
	kindStop
	numKinds
)

func kindOf(v Victim) int {
	switch {
	case v.Phase == Asleep:
		return kindStop
	case v.Cost.Level == 0:
		return kindStart
	}
	return kindWake
}

// costOf is what v's clients will wait for when it is wanted again, in
// seconds, and whether it was measured.
func costOf(v Victim) (float64, bool) {
	wake, start := v.Cost.Wake.Seconds(), v.Cost.Start.Seconds()
	switch kindOf(v) {
	case kindStop:
		// Stopping a sleeper turns its next wake into a cold start.
		if start <= 0 {
			return 0, false
		}
		return max(start-wake, minCost), true
	case kindStart:
		return start, start > 0
	}
	return wake, wake > 0
}

// rateOf is how often v is asked for, in requests per second: its decayed
// count, never less than its last request alone implies (a model asked for
// a moment ago is likely asked again soon, whatever its long-run count
// says: a session in progress): once per time since it for an awake
// model, a tenth of that for a sleeper (sleeperRecency).
func rateOf(v Victim, now time.Time) float64 {
	rate := v.Cost.Uses.Rate(now)
	if !v.LastUsed.IsZero() {
		k := 1.0
		if v.Phase == Asleep {
			k = sleeperRecency
		}
		rate = max(rate, k/max(now.Sub(v.LastUsed).Seconds(), 1))
	}
	return rate
}

// sleeperRecency is how much a sleeper's last request counts against its
// long-run rate: a sleeper is mostly one whose session ended (what counts
// is whether it comes back), but one put to sleep in a pause of a session
// is soon wanted again, and stopping it turns that wake into a cold start.
// The trace replay chose a tenth: with 1 (as awake models) the sleepers
// were ordered almost as LRU orders them and the clients' wait on Zipf
// traffic rose by a fifth; with 0 (the decayed count alone) one bursty
// trace waited longer than under LRU.
const sleeperRecency = 0.1

// size is what v's cost is divided by: an awake model's Frees (at least
// 1 MiB), and 1 for a sleeper (residues are alike: size does not enter).
func size(v Victim) uint64 {
	if v.Phase == Asleep {
		return 1
	}
	return max(v.Frees, 1<<20)
}

// minCost keeps a cost that measured as nothing from making a model free
// to evict.
const minCost = 0.001

// meanCostPerByte is, per kind, the mean measured cost per byte among vs;
// for a kind with none measured, the mean over every kind measured; 1 when
// nothing is.
func meanCostPerByte(vs []Victim) [numKinds]float64 {
	var sum [numKinds]float64
	var n [numKinds]int
	var all float64
	var nall int
	for _, v := range vs {
		if cost, ok := costOf(v); ok {
			k, pb := kindOf(v), cost/float64(size(v))
			sum[k] += pb
			n[k]++
			all += pb
			nall++
		}
	}
	if nall == 0 {
		all, nall = 1, 1
	}
	for k := range sum {
		if n[k] == 0 {
			sum[k], n[k] = all, nall
		}
		sum[k] /= float64(n[k])
	}
	return sum
}

// comparePriorityWaiting puts the lower priority first, then, of equal
// priorities, one that no request waits for: requests waiting in a
// model's queue (they came while it woke) would see its wake wasted and
// wait for the next.
func comparePriorityWaiting(a, b Victim) int {
	if a.Req.Priority != b.Req.Priority {
		return a.Req.Priority - b.Req.Priority
	}
	if (a.Waiting > 0) != (b.Waiting > 0) {
		if a.Waiting > 0 {
			return 1
		}
		return -1
	}
	return 0
}

// compareWorth compares two worths, taking values within a millionth of
// each other as equal (then recency decides, not rounding).
func compareWorth(a, b float64) int {
	if math.Abs(a-b) <= 1e-6*max(math.Abs(a), math.Abs(b)) {
		return 0
	}
	if a < b {
		return -1
	}
	return 1
}

// recentStarts is how many recent starts or wakes of a model its
// estimates use.
const recentStarts = 5

// Recent appends d to a model's last durations (its starts, or its wakes
// from one level), keeping recentStarts.
func Recent(ds []time.Duration, d time.Duration) []time.Duration {
	if len(ds) >= recentStarts {
		ds = append(ds[:0:0], ds[len(ds)-recentStarts+1:]...)
	}
	return append(ds, d)
}

// Typical is the median of ds (0 when empty): the cost a model's next
// start or wake is taken to have. One slow start after a cold cache does
// not make every estimate slow.
func Typical(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}
