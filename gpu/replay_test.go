package gpu

import (
	"container/heap"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"citadel-supervisor/config"
)

// The trace replay: requests for on-demand models arrive on a simulated
// clock; a small scheduler does what supervisor/schedule does with
// gpu.Decide's answers (starts, wakes, sleeps, stops, min_awake), and the
// models take the time real ones take. The eviction order is the only thing
// that differs between runs, so the replay compares policies on the same
// requests: the shipped one (EvictionOrder), LRU (LRUOrder, the rule before
// it), an offline reference that knows the future (Belady's rule), and
// llama-swap's. TestEvictionReplay checks the targets; the benchdriver
// TestBenchEviction prints the table of docs/performance.md.

// replayModel is one model of the replay, with the time its wake and cold
// start take.
type replayModel struct {
	name        string
	tp          int
	util        float64
	wake, start time.Duration
}

// referenceModels are the seven models of the reference host (their
// tensor_parallel and gpu_memory_utilization) on two 80 GiB GPUs, with wake
// and cold-start times from vLLM's published sleep-mode measurements
// (blog.vllm.ai 2025-10-26, "Zero-reload model switching with vLLM sleep
// mode": level-1 wakes of 0.1-6 s, cold starts of 30-100+ s, 18-200x a
// wake), placed in those ranges by each model's weight size: a wake copies
// the weights back from pinned host memory, a cold start loads them from
// disk and captures CUDA graphs again.
var referenceModels = []replayModel{
	{"mixtral", 2, 0.90, 6 * time.Second, 150 * time.Second},         // 47B MoE, 93 GB bf16
	{"hermes", 2, 0.90, 6 * time.Second, 150 * time.Second},          // the same architecture
	{"openchat", 1, 0.70, 1200 * time.Millisecond, 45 * time.Second}, // 7B, 14 GB
	{"phi3", 1, 0.60, 600 * time.Millisecond, 35 * time.Second},      // 3.8B, 8 GB
	{"yi34b", 2, 0.85, 4500 * time.Millisecond, 120 * time.Second},   // 34B, 69 GB
	{"coder", 1, 0.80, 2500 * time.Millisecond, 75 * time.Second},    // 14B, 30 GB
	{"vision", 1, 0.70, 1500 * time.Millisecond, 60 * time.Second},   // 7B with a vision encoder
}

// replayConfig is what every replayed model shares: the shipped defaults
// where they matter (min_awake 1m, sleep level 1) and what a sleeper keeps
// on each GPU (docs/on-demand.md's 2 GiB).
type replayConfig struct {
	minAwake time.Duration
	residue  config.ByteSize
	stop     time.Duration // a stop takes this long
}

var defaultReplay = replayConfig{minAwake: time.Minute, residue: 2 * config.GiB, stop: 3 * time.Second}

// arrival is one request of a trace.
type arrival struct {
	at    time.Duration // since the trace began
	model int           // index into the models
}

// replayResult is what a replay counts.
type replayResult struct {
	requests, wakes, starts, sleeps, stops int
	wait                                   time.Duration // the sum of every request's wait
	maxWait                                time.Duration
}

// replayState is where a replayed model stands.
type replayState int

const (
	rOff replayState = iota
	rStarting
	rAwake
	rSleeping // going to sleep
	rAsleep
	rWaking
	rStopping
)

type simModel struct {
	replayModel
	idx       int
	state     replayState
	pid       int
	doneAt    time.Time
	waiting   []time.Time // arrivals waiting for it
	wanted    bool        // a want is with the scheduler
	askedAt   time.Time   // when the start or wake in progress was asked for
	awakeAt   time.Time
	lastUsed  time.Time
	uses      Uses
	startups  []time.Duration
	wakeTimes []time.Duration
}

// simEvent is something that happens at a time: an arrival, or the end of
// a model's start, wake, sleep or stop, or a moment to decide again.
type simEvent struct {
	at    time.Time
	seq   int
	model int // -1: decide again
	req   bool
}

type simQueue []simEvent

func (q simQueue) Len() int { return len(q) }
func (q simQueue) Less(i, j int) bool {
	if !q[i].at.Equal(q[j].at) {
		return q[i].at.Before(q[j].at)
	}
	return q[i].seq < q[j].seq
}
func (q simQueue) Swap(i, j int) { q[i], q[j] = q[j], q[i] }
func (q *simQueue) Push(x any)   { *q = append(*q, x.(simEvent)) }
func (q *simQueue) Pop() any {
	old := *q
	e := old[len(old)-1]
	*q = old[:len(old)-1]
	return e
}

// replayer runs one trace under one eviction order.
type replayer struct {
	cfg    replayConfig
	models []*simModel
	order  func([]Victim, time.Time)
	devs   []Device
	claims map[string]Claim
	wants  map[string]Want
	now    time.Time
	readAt time.Time
	q      simQueue
	seq    int
	pids   int
	res    replayResult
	tick   time.Time // the next reading while wants wait
}

// replayStart is the simulated clock's origin: a Monday, midnight.
var replayStart = time.Date(2026, 3, 2, 0, 0, 0, 0, time.UTC)

func replay(models []replayModel, trace []arrival, cfg replayConfig, order func([]Victim, time.Time)) replayResult {
	r := &replayer{cfg: cfg, order: order, claims: map[string]Claim{}, wants: map[string]Want{}, now: replayStart}
	for i, m := range models {
		r.models = append(r.models, &simModel{replayModel: m, idx: i})
	}
	for i := range 2 {
		r.devs = append(r.devs, Device{Index: i, UUID: fmt.Sprintf("GPU-%d", i), MemoryTotal: uint64(80 * config.GiB), Up: true})
	}
	for _, a := range trace {
		r.push(replayStart.Add(a.at), a.model, true)
	}
	for r.q.Len() > 0 {
		e := heap.Pop(&r.q).(simEvent)
		r.now = e.at
		r.handle(e)
		// Everything due at the same instant, then one decision.
		for r.q.Len() > 0 && r.q[0].at.Equal(r.now) {
			r.handle(heap.Pop(&r.q).(simEvent))
		}
		r.decide()
		r.tickWhileWaiting()
	}
	for _, m := range r.models {
		if len(m.waiting) > 0 {
			panic(fmt.Sprintf("replay: %s still has %d requests waiting at the end (state %d)", m.name, len(m.waiting), m.state))
		}
	}
	return r.res
}

func (r *replayer) push(at time.Time, model int, req bool) {
	r.seq++
	heap.Push(&r.q, simEvent{at: at, seq: r.seq, model: model, req: req})
}

func (r *replayer) handle(e simEvent) {
	if e.model < 0 {
		return
	}
	m := r.models[e.model]
	if e.req {
		r.arrive(m)
		return
	}
	if !m.doneAt.Equal(r.now) {
		return // an earlier operation's end
	}
	switch m.state {
	case rStarting, rWaking:
		took := r.now.Sub(m.askedAt)
		if m.state == rStarting {
			m.startups = Recent(m.startups, took)
		} else {
			m.wakeTimes = Recent(m.wakeTimes, took)
		}
		m.state, m.awakeAt = rAwake, r.now
		if c, ok := r.claims[m.name]; ok {
			c.Phase, c.Since = Running, r.now
			r.claims[m.name] = c
		}
		for _, at := range m.waiting {
			w := r.now.Sub(at)
			r.res.wait += w
			r.res.maxWait = max(r.res.maxWait, w)
			r.res.requests++
		}
		m.waiting = nil
		r.push(r.now.Add(r.cfg.minAwake), -1, false)
	case rSleeping:
		m.state = rAsleep
		if c, ok := r.claims[m.name]; ok {
			c.Phase, c.Since, c.Evicting = Asleep, r.now, false
			r.claims[m.name] = c
		}
		// The scheduler reads the GPUs again once a model fell asleep.
		r.push(r.now.Add(time.Millisecond), -1, false)
		if len(m.waiting) > 0 {
			r.want(m)
		}
	case rStopping:
		m.state = rOff
		if c, ok := r.claims[m.name]; ok {
			c.Phase, c.Since, c.PIDs, c.Keep, c.Evicting = Releasing, r.now, []int{m.pid}, false, false
			r.claims[m.name] = c
		}
		m.pid = 0
		r.push(r.now.Add(time.Millisecond), -1, false)
		if len(m.waiting) > 0 {
			r.want(m)
		}
	}
}

func (r *replayer) arrive(m *simModel) {
	m.uses = m.uses.Add(r.now)
	m.lastUsed = r.now
	switch m.state {
	case rAwake:
		r.res.requests++
		return
	case rOff, rAsleep:
		m.waiting = append(m.waiting, r.now)
		if !m.wanted {
			m.askedAt = r.now
			r.want(m)
		}
		return
	}
	// Starting, waking: served once ready. Going to sleep or stopping:
	// woken or started once that is done.
	if len(m.waiting) == 0 && (m.state == rSleeping || m.state == rStopping) {
		m.askedAt = r.now
	}
	m.waiting = append(m.waiting, r.now)
}

func (r *replayer) want(m *simModel) {
	if m.askedAt.IsZero() || m.state == rAwake {
		m.askedAt = r.now
	}
	m.wanted = true
	r.wants[m.name] = Want{Request: Request{Name: m.name, TP: m.tp, Util: m.util, OnDemand: true}}
}

// readings are the GPUs as a driver shows them now: each model's process
// holds its share while it loads, is awake or goes to sleep, and its residue
// while asleep.
func (r *replayer) readings() []Device {
	devs := slices.Clone(r.devs)
	for i := range devs {
		d := &devs[i]
		d.Processes = nil
		for _, m := range r.models {
			c, ok := r.claims[m.name]
			if m.pid == 0 || !ok || !slices.Contains(c.UUIDs, d.UUID) {
				continue
			}
			held := Share(m.util, d.MemoryTotal)
			if m.state == rAsleep || (m.state == rStopping && c.Phase == Asleep) {
				held = uint64(r.cfg.residue)
			}
			d.Processes = append(d.Processes, Process{PID: m.pid, UsedMemory: held})
			d.MemoryUsed += held
		}
		d.MemoryFree = d.MemoryTotal - min(d.MemoryUsed, d.MemoryTotal)
	}
	return devs
}

func (r *replayer) decide() {
	in := Input{
		Devices: r.readings(), ReadAt: r.now, Headroom: config.GiB, ReleaseTimeout: time.Minute,
		Now: r.now, order: r.order,
	}
	for _, w := range r.wants {
		in.Wants = append(in.Wants, w)
	}
	slices.SortFunc(in.Wants, func(a, b Want) int { return strings.Compare(a.Name, b.Name) })
	for _, m := range r.models {
		c, ok := r.claims[m.name]
		if !ok {
			continue
		}
		if c.Phase != Releasing {
			c.PIDs = nil
			if m.pid != 0 {
				c.PIDs = []int{m.pid}
			}
		}
		// As supervisor/schedule fills them (usage.go): min_awake from the ready
		// instant, the requests in its queue, its GPUs' memory changing
		// while it goes to sleep or stops.
		c.OnDemand, c.LastUsed, c.Protected, c.AwakeAt = true, m.lastUsed, "", m.awakeAt
		c.Waiting = len(m.waiting)
		c.Changing = m.state == rSleeping || m.state == rStopping
		if m.awakeAt.After(c.LastUsed) {
			c.LastUsed = m.awakeAt
		}
		if c.Phase == Running && r.now.Sub(m.awakeAt) < r.cfg.minAwake {
			c.Protected = "min_awake"
		}
		c.Cost = Cost{Wake: Typical(m.wakeTimes), Start: Typical(m.startups), Level: 1, Uses: m.uses}
		in.Claims = append(in.Claims, c)
	}
	out := Decide(in)
	r.claims = map[string]Claim{}
	for _, c := range out.Claims {
		r.claims[c.Name] = c
	}
	for name, gpus := range out.Grants {
		m := r.byName(name)
		delete(r.wants, name)
		m.wanted = false
		switch m.state {
		case rAsleep:
			m.state, m.doneAt = rWaking, r.now.Add(m.wake)
			r.res.wakes++
		case rOff:
			r.pids++
			m.pid = r.pids
			m.state, m.doneAt = rStarting, r.now.Add(m.start)
			r.res.starts++
		default:
			panic(fmt.Sprintf("replay: %s granted %v while %d", name, gpus, m.state))
		}
		r.push(m.doneAt, m.idx, false)
	}
	for victim := range out.Evict {
		m := r.byName(victim)
		switch m.state {
		case rAwake:
			if r.now.Sub(m.awakeAt) < r.cfg.minAwake {
				panic(fmt.Sprintf("replay: %s put to sleep %s after it woke, within min_awake", victim, r.now.Sub(m.awakeAt)))
			}
			// Going to sleep takes about half a wake (the weights are
			// copied out instead of in).
			m.state, m.doneAt = rSleeping, r.now.Add(m.wake/2)
			r.res.sleeps++
		case rAsleep:
			if m.wanted {
				// Waking (waiting for its memory): it declines, as the
				// runner does.
				c := r.claims[victim]
				c.Evicting = false
				r.claims[victim] = c
				continue
			}
			m.state, m.doneAt = rStopping, r.now.Add(r.cfg.stop)
			r.res.stops++
		default:
			// As the runner does (machine.onEvict): it declines, and the
			// scheduler looks again.
			if c, ok := r.claims[victim]; ok {
				c.Evicting = false
				r.claims[victim] = c
			}
			continue
		}
		r.push(m.doneAt, m.idx, false)
	}
}

// The scheduler reads the GPUs every second while a want waits (and
// decides again on each reading).
func (r *replayer) tickWhileWaiting() {
	if len(r.wants) > 0 && !r.tick.After(r.now) {
		r.tick = r.now.Add(time.Second)
		r.push(r.tick, -1, false)
	}
}

func (r *replayer) byName(name string) *simModel {
	for _, m := range r.models {
		if m.name == name {
			return m
		}
	}
	panic("replay: no model " + name)
}

// The traces. Each is seeded; the same seed gives the same requests.

// roundRobinTrace asks each of models in turn, one request every gap: LRU's
// worst case when they do not all fit.
func roundRobinTrace(models []int, gap, length time.Duration) []arrival {
	var out []arrival
	for i, at := 0, time.Duration(0); at < length; i, at = i+1, at+gap {
		out = append(out, arrival{at: at, model: models[i%len(models)]})
	}
	return out
}

// zipfTrace is Poisson arrivals (mean gap) for n models whose popularity
// follows Zipf's law with exponent s, the most popular first in rank.
func zipfTrace(rng *rand.Rand, rank []int, s float64, gap, length time.Duration) []arrival {
	pick := zipfPicker(rng, rank, s)
	var out []arrival
	for at := expDur(rng, gap); at < length; at += expDur(rng, gap) {
		out = append(out, arrival{at: at, model: pick()})
	}
	return out
}

// sessionTrace is bursty use: sessions begin as a Poisson process (mean
// gap), each on one model (Zipf over rank, exponent s), and send a
// geometric number of requests (mean perSession) with exponential think
// times (mean think).
func sessionTrace(rng *rand.Rand, rank []int, s float64, gap time.Duration, perSession float64, think, length time.Duration) []arrival {
	pick := zipfPicker(rng, rank, s)
	var out []arrival
	for at := expDur(rng, gap); at < length; at += expDur(rng, gap) {
		m := pick()
		t := at
		for {
			out = append(out, arrival{at: t, model: m})
			if rng.Float64() < 1/perSession {
				break
			}
			t += expDur(rng, think)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].at < out[j].at })
	return out
}

// dayNightTrace is sessions whose popularity shifts: rank by day (8:00 to
// 20:00, busier) and night's by night (batch work on other models).
func dayNightTrace(rng *rand.Rand, day, night []int, s float64, length time.Duration) []arrival {
	pickDay, pickNight := zipfPicker(rng, day, s), zipfPicker(rng, night, s)
	var out []arrival
	at := time.Duration(0)
	for at < length {
		h := (at % (24 * time.Hour)).Hours()
		isDay := h >= 8 && h < 20
		gap, pick := 6*time.Minute, pickNight
		if isDay {
			gap, pick = 2*time.Minute, pickDay
		}
		at += expDur(rng, gap)
		m := pick()
		t := at
		for {
			out = append(out, arrival{at: t, model: m})
			if rng.Float64() < 1.0/6 {
				break
			}
			t += expDur(rng, 30*time.Second)
		}
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].at < out[j].at })
	return out
}

func expDur(rng *rand.Rand, mean time.Duration) time.Duration {
	return time.Duration(rng.ExpFloat64() * float64(mean))
}

func zipfPicker(rng *rand.Rand, rank []int, s float64) func() int {
	w := make([]float64, len(rank))
	var sum float64
	for i := range rank {
		w[i] = 1 / math.Pow(float64(i+1), s)
		sum += w[i]
	}
	return func() int {
		x := rng.Float64() * sum
		for i, wi := range w {
			if x < wi {
				return rank[i]
			}
			x -= wi
		}
		return rank[len(rank)-1]
	}
}

// replayTrace is a named trace over the reference models.
type replayTrace struct {
	name    string
	uniform bool // every model equally popular (round-robin)
	trace   []arrival
}

// replayTraces builds the traces, length long, from seed.
func replayTraces(seed uint64, length time.Duration) []replayTrace {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	perm := func() []int { return rng.Perm(len(referenceModels)) }
	// The four one-GPU models: two fit at a time.
	small := []int{2, 3, 5, 6}
	day, night := perm(), perm()
	return []replayTrace{
		{name: "round-robin, 4 one-GPU models, 2 fit", uniform: true, trace: roundRobinTrace(small, 90*time.Second, length)},
		{name: "round-robin, all 7", uniform: true, trace: roundRobinTrace([]int{0, 1, 2, 3, 4, 5, 6}, 90*time.Second, length)},
		{name: "Zipf popularity (s=1.1), Poisson", trace: zipfTrace(rng, perm(), 1.1, 45*time.Second, length)},
		{name: "bursty sessions (Zipf s=0.8)", trace: sessionTrace(rng, perm(), 0.8, 4*time.Minute, 8, 20*time.Second, length)},
		{name: "day/night shift", trace: dayNightTrace(rng, day, night, 1.0, length)},
	}
}

// Offline references and llama-swap's rule, as eviction orders.

// beladyOrder puts first the model asked for again furthest in the future
// (never again: first of all), knowing the trace: Belady's rule. With sizes
// and costs that differ it is a reference, not an optimum.
func beladyOrder(models []replayModel, trace []arrival) func([]Victim, time.Time) {
	next := nextUse(models, trace)
	return func(vs []Victim, now time.Time) {
		slices.SortStableFunc(vs, func(a, b Victim) int {
			if a.Req.Priority != b.Req.Priority {
				return a.Req.Priority - b.Req.Priority
			}
			return next(b.Name, now).Compare(next(a.Name, now))
		})
	}
}

// costBeladyOrder weighs Belady's distance by cost: the model whose next
// use is furthest per second of wait it will cause goes first.
func costBeladyOrder(models []replayModel, trace []arrival) func([]Victim, time.Time) {
	next := nextUse(models, trace)
	cost := func(v Victim) float64 {
		for _, m := range models {
			if m.name == v.Name {
				if v.Phase == Asleep {
					return (m.start - m.wake).Seconds()
				}
				return m.wake.Seconds()
			}
		}
		return 1
	}
	return func(vs []Victim, now time.Time) {
		key := func(v Victim) float64 { return cost(v) / next(v.Name, now).Sub(now).Seconds() }
		slices.SortStableFunc(vs, func(a, b Victim) int {
			if a.Req.Priority != b.Req.Priority {
				return a.Req.Priority - b.Req.Priority
			}
			ka, kb := key(a), key(b)
			switch {
			case ka < kb:
				return -1
			case ka > kb:
				return 1
			}
			return 0
		})
	}
}

// nextUse answers when a model is next asked for after now (far in the
// future when never again).
func nextUse(models []replayModel, trace []arrival) func(string, time.Time) time.Time {
	at := map[string][]time.Time{}
	for _, a := range trace {
		n := models[a.model].name
		at[n] = append(at[n], replayStart.Add(a.at))
	}
	never := replayStart.Add(1000 * 24 * time.Hour)
	return func(name string, now time.Time) time.Time {
		ts := at[name]
		i := sort.Search(len(ts), func(i int) bool { return ts[i].After(now) })
		if i == len(ts) {
			return never
		}
		return ts[i]
	}
}

// llamaSwapOrder models llama-swap's matrix solver (internal/matrix
// program.go Solve, evict_costs left at their default 1) over the sets an
// operator would write for this host (every pair of one-GPU models, each
// two-GPU model alone, in the order the models are configured): of the
// sets that hold the target, the first that evicts the fewest running
// models. That keeps whichever running model comes first in the
// configuration and evicts the later ones, whatever their traffic.
func llamaSwapOrder(models []replayModel) func([]Victim, time.Time) {
	pos := map[string]int{}
	for i, m := range models {
		pos[m.name] = i
	}
	return func(vs []Victim, _ time.Time) {
		slices.SortStableFunc(vs, func(a, b Victim) int {
			if a.Req.Priority != b.Req.Priority {
				return a.Req.Priority - b.Req.Priority
			}
			return pos[b.Name] - pos[a.Name]
		})
	}
}

// replayRow is one trace replayed under each policy.
type replayRow struct {
	trace                              replayTrace
	policy, lru, belady, cost, llamaSw replayResult
}

func (r replayRow) bound() replayResult {
	if r.cost.wait < r.belady.wait {
		return r.cost
	}
	return r.belady
}

func replayAll(seed uint64, length time.Duration) []replayRow {
	traces := replayTraces(seed, length)
	rows := make([]replayRow, len(traces))
	// Each replay is independent: they run side by side.
	var wg sync.WaitGroup
	run := func(into *replayResult, tr replayTrace, order func([]Victim, time.Time)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			*into = replay(referenceModels, tr.trace, defaultReplay, order)
		}()
	}
	for i, tr := range traces {
		row := &rows[i]
		row.trace = tr
		run(&row.policy, tr, EvictionOrder)
		run(&row.lru, tr, LRUOrder)
		run(&row.belady, tr, beladyOrder(referenceModels, tr.trace))
		run(&row.cost, tr, costBeladyOrder(referenceModels, tr.trace))
		run(&row.llamaSw, tr, llamaSwapOrder(referenceModels))
	}
	wg.Wait()
	return rows
}

func (r replayResult) String() string {
	return fmt.Sprintf("%d wakes, %d cold starts, wait %s", r.wakes, r.starts, r.wait.Round(time.Second))
}

// TestEvictionReplay: on a day of every trace of a fixed seed, every
// request is served and the policy's clients never wait longer than LRU's
// (a property of the policy, not a timing: the clock is simulated). The
// targets over a week of three seeds, against the offline reference too,
// are checked by the benchdriver TestBenchEviction (make bench).
func TestEvictionReplay(t *testing.T) {
	for _, tr := range replayTraces(1, 24*time.Hour) {
		p := replay(referenceModels, tr.trace, defaultReplay, EvictionOrder)
		l := replay(referenceModels, tr.trace, defaultReplay, LRUOrder)
		t.Logf("%s: policy %s; LRU %s", tr.name, p, l)
		if p.requests != len(tr.trace) || l.requests != len(tr.trace) {
			t.Errorf("%s: %d and %d of %d requests served", tr.name, p.requests, l.requests, len(tr.trace))
		}
		if p.wait > l.wait {
			t.Errorf("%s (seed 1): the policy's clients waited %s, LRU's %s", tr.name, p.wait, l.wait)
		}
	}
}
