package supervisor

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
)

// waiterTTL is how long a pending model's request stays in the plan after
// it last asked; runners ask every recheckInterval while pending.
const waiterTTL = 3 * recheckInterval

// expectGrace bounds how long a model not yet asking (its storage or port
// checks still running, or failing) holds back lower-priority models.
const expectGrace = 5 * time.Second

// allocator owns every GPU claim. Its goroutine is the only one that reads
// or writes claims; runners ask it over a channel. It decides with
// gpu.Plan from fresh readings, so the rules (priority, fit, serialised
// starts, claims in flight) live in one pure, table-tested function.
type allocator struct {
	reader   gpu.Reader // nil: no readings (backend none, or NVML absent)
	why      string     // why there are no readings
	headroom config.ByteSize
	release  time.Duration
	now      func() time.Time
	log      *zap.Logger
	owners   func() map[int]string // pid → model, from the runners' trees
	wake     func(name string)     // nudge a pending model to ask again

	reqs     chan func()
	stopped  chan struct{} // closed when run returns
	claims   map[string]*claim
	waiting  map[string]waiter
	expected map[string]expectation // models that will ask soon: placement waits for them
	notes    map[string]string      // GPU UUID → note for operators
	simUses  atomic.Pointer[[]gpu.SimUse]
	lastRead []gpu.Device
}

var errAllocatorStopped = fmt.Errorf("supervisor shutting down")

type claimPhase int

const (
	phaseStarting  claimPhase = iota // granted, loading: the GPUs are busy
	phaseRunning                     // ready
	phaseReleasing                   // stopped; waiting for its processes to leave the GPUs
	phaseReserved                    // between a crash and its restart: kept for it
)

type claim struct {
	uuids []string
	share map[string]uint64 // per GPU: gpu_memory_utilization × total
	phase claimPhase
	pid   int   // main process while running (the sim backend's usage)
	pids  []int // releasing: processes that must leave the GPUs
	since time.Time
	keep  bool // releasing: stay reserved afterwards (a restart follows)
}

type waiter struct {
	req gpu.Request
	at  time.Time
}

type expectation struct {
	priority int
	until    time.Time
}

// Expect announces models that are about to ask for GPUs. Runners start
// together and ask in whatever order their checks finish; without this the
// first to ask would be planned alone, and a low-priority model could take
// the GPUs a high-priority one needs. A lower-priority model is not placed
// while a higher one is expected (for at most expectGrace).
func (a *allocator) Expect(models []config.Model) {
	if a.reader == nil {
		return // no placement, nothing to order
	}
	a.do(context.Background(), func() { //nolint:errcheck // background never ends
		for _, m := range models {
			if m.Enabled {
				a.expected[m.Name] = expectation{priority: m.Priority, until: a.now().Add(expectGrace)}
			}
		}
	})
}

// awaited names the expected models that outrank m and have not asked yet.
func (a *allocator) awaited(m config.Model) []string {
	a.pruneExpected()
	var out []string
	for name, e := range a.expected {
		if e.priority > m.Priority || (e.priority == m.Priority && name < m.Name) {
			out = append(out, name)
		}
	}
	slices.Sort(out)
	return out
}

// pruneExpected forgets expectations past their grace; true if any went.
func (a *allocator) pruneExpected() bool {
	pruned := false
	for name, e := range a.expected {
		if a.now().After(e.until) {
			delete(a.expected, name)
			pruned = true
		}
	}
	return pruned
}

func newAllocator(cfg *config.Config, reader gpu.Reader, why string, d *deps) *allocator {
	a := &allocator{
		reader:   reader,
		why:      why,
		headroom: cfg.GPU.Headroom,
		release:  cfg.GPU.ReleaseTimeout,
		now:      d.now,
		log:      d.log.Named("gpu"),
		reqs:     make(chan func()),
		stopped:  make(chan struct{}),
		claims:   map[string]*claim{},
		waiting:  map[string]waiter{},
		expected: map[string]expectation{},
		notes:    map[string]string{},
	}
	empty := []gpu.SimUse{}
	a.simUses.Store(&empty)
	return a
}

// run serves requests until ctx ends. While models wait or memory is being
// released it re-reads the GPUs every second, so a model is placed (or a
// release completes) without waiting for its runner's next recheck.
func (a *allocator) run(ctx context.Context) {
	defer close(a.stopped)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case f := <-a.reqs:
			f()
		case <-tick.C:
			if a.reader != nil && (len(a.waiting) > 0 || a.releasing()) {
				a.refresh(ctx)
			}
			if a.pruneExpected() {
				a.wakeWaiters() // a grace ran out: go on without that model
			}
		}
	}
}

// do runs f on the allocator's goroutine and waits for it.
func (a *allocator) do(ctx context.Context, f func()) error {
	done := make(chan struct{})
	select {
	case a.reqs <- func() { f(); close(done) }:
	case <-ctx.Done():
		return ctx.Err()
	case <-a.stopped:
		return errAllocatorStopped
	}
	<-done
	return nil
}

// Place claims GPUs for m, or says why it must wait.
func (a *allocator) Place(ctx context.Context, m config.Model) ([]string, error) {
	var gpus []string
	var err error
	if e := a.do(ctx, func() { gpus, err = a.place(ctx, m) }); e != nil {
		return nil, e
	}
	return gpus, err
}

// Started records the main process of a started model (the sim backend
// counts its share under that pid).
func (a *allocator) Started(name string, pid int) {
	a.do(context.Background(), func() { //nolint:errcheck // background never ends
		if c := a.claims[name]; c != nil {
			c.pid = pid
			a.publishSimUses()
		}
	})
}

// Ready lifts the model's start serialisation on its GPUs.
func (a *allocator) Ready(name string) {
	a.do(context.Background(), func() { //nolint:errcheck // background never ends
		if c := a.claims[name]; c != nil && c.phase == phaseStarting {
			c.phase = phaseRunning
			a.wakeWaiters()
		}
	})
}

// Released says the model's processes were stopped: its GPUs stay busy
// until none of pids is on them any more (or release_timeout passes). With
// keep the claim then stays reserved for the model's restart.
func (a *allocator) Released(name string, pids []int, keep bool) {
	a.do(context.Background(), func() { //nolint:errcheck // background never ends
		c := a.claims[name]
		if c == nil {
			return
		}
		c.phase, c.pids, c.since, c.keep, c.pid = phaseReleasing, pids, a.now(), keep, 0
		a.publishSimUses()
		a.refresh(context.Background())
	})
}

// Drop gives up the model's reservation: it will not restart soon (failed,
// held stopped, removed). A release in progress still completes first.
func (a *allocator) Drop(name string) {
	a.do(context.Background(), func() { //nolint:errcheck // background never ends
		delete(a.waiting, name)
		if _, ok := a.expected[name]; ok {
			delete(a.expected, name)
			a.wakeWaiters()
		}
		c := a.claims[name]
		switch {
		case c == nil:
		case c.phase == phaseReleasing:
			c.keep = false
		default:
			delete(a.claims, name)
			a.publishSimUses()
			a.wakeWaiters()
		}
	})
}

func (a *allocator) place(ctx context.Context, m config.Model) ([]string, error) {
	if a.reader == nil {
		// No readings: no placement and no memory checks. A pinned model
		// gets its pins as written; an unpinned one sees every GPU.
		out := make([]string, 0, len(m.GPUs))
		for _, g := range m.GPUs {
			out = append(out, string(g))
		}
		return out, nil
	}
	slots, err := a.slots(ctx)
	if err != nil {
		return nil, err
	}
	if c := a.claims[m.Name]; c != nil {
		switch c.phase {
		case phaseReleasing:
			return nil, fmt.Errorf("waiting for its previous run's GPU memory to be released (%s)", a.indexes(slots, c.uuids))
		case phaseReserved:
			if a.reservationUsable(c, slots) {
				// Its GPUs were kept through the backoff; start there once
				// no other model is starting on them.
				for _, s := range slots {
					if slices.Contains(c.uuids, s.UUID) && s.Busy != "" {
						return nil, fmt.Errorf("waiting for GPU%d: %s", s.Index, s.Busy)
					}
				}
				c.phase, c.since = phaseStarting, a.now()
				delete(a.waiting, m.Name)
				return slices.Clone(c.uuids), nil
			}
			// A GPU of its reservation went down: place it afresh.
			delete(a.claims, m.Name)
			if slots, err = a.slots(ctx); err != nil {
				return nil, err
			}
		default:
			return slices.Clone(c.uuids), nil
		}
	}

	delete(a.expected, m.Name)
	a.waiting[m.Name] = waiter{req: PlacementRequest(m), at: a.now()}
	if first := a.awaited(m); len(first) > 0 {
		return nil, fmt.Errorf("waiting for higher-priority models to be placed first (%s)", strings.Join(first, ", "))
	}
	var reqs []gpu.Request
	for name, w := range a.waiting {
		if a.now().Sub(w.at) > waiterTTL {
			delete(a.waiting, name)
			continue
		}
		reqs = append(reqs, w.req)
	}
	for _, d := range gpu.Plan(reqs, slots, a.headroom) {
		if d.Name != m.Name {
			continue
		}
		if d.GPUs == nil {
			return nil, fmt.Errorf("%s", d.Reason)
		}
		c := &claim{share: map[string]uint64{}, phase: phaseStarting, since: a.now()}
		for _, i := range d.GPUs {
			c.uuids = append(c.uuids, slots[i].UUID)
			c.share[slots[i].UUID] = gpu.Share(m.GPUMemoryUtilization, slots[i].MemoryTotal)
			delete(a.notes, slots[i].UUID)
		}
		a.claims[m.Name] = c
		delete(a.waiting, m.Name)
		a.log.Info("placed", zap.String("model", m.Name), zap.Strings("gpus", c.uuids))
		return slices.Clone(c.uuids), nil
	}
	return nil, fmt.Errorf("internal: no placement decision for %s", m.Name)
}

// reservationUsable reports whether every GPU of c is still there and up.
func (a *allocator) reservationUsable(c *claim, slots []gpu.Slot) bool {
	up := 0
	for _, s := range slots {
		if slices.Contains(c.uuids, s.UUID) && s.Up {
			up++
		}
	}
	return up == len(c.uuids)
}

// PlacementRequest is what model m asks of the GPUs.
func PlacementRequest(m config.Model) gpu.Request {
	r := gpu.Request{Name: m.Name, Priority: m.Priority, TP: m.TensorParallel, Util: m.GPUMemoryUtilization}
	for _, p := range m.GPUs {
		r.Pins = append(r.Pins, string(p))
	}
	return r
}

// slots reads the GPUs and lays the claims over them. A claim counts only
// for what its processes have not allocated yet, so a loaded model's
// memory is not counted twice.
func (a *allocator) slots(ctx context.Context) ([]gpu.Slot, error) {
	devs, err := a.read(ctx)
	if err != nil {
		return nil, err
	}
	owners := a.owners()
	out := make([]gpu.Slot, len(devs))
	for i, d := range devs {
		out[i] = gpu.Slot{Device: d, Note: a.notes[d.UUID]}
	}
	for name, c := range a.claims {
		for i := range out {
			s := &out[i]
			share, ok := c.share[s.UUID]
			if !ok {
				continue
			}
			var used uint64
			for _, p := range s.Processes {
				// A stopped model's runner no longer lists its pids; the
				// claim remembers the ones it is waiting for.
				if owners[p.PID] == name || slices.Contains(c.pids, p.PID) {
					used += p.UsedMemory
				}
			}
			s.Claimed += share - min(used, share)
			switch c.phase {
			case phaseStarting:
				s.Busy = name + " is starting"
			case phaseReleasing:
				s.Busy = name + "'s memory is being released"
			}
		}
	}
	return out, nil
}

func (a *allocator) read(ctx context.Context) ([]gpu.Device, error) {
	devs, err := a.reader.Read(ctx)
	if err != nil {
		return nil, fmt.Errorf("GPU readings failed: %w", err)
	}
	a.lastRead = devs
	return devs, nil
}

// refresh completes releases whose processes have left the GPUs, or whose
// release_timeout passed.
func (a *allocator) refresh(ctx context.Context) {
	if a.reader == nil || !a.releasing() {
		return
	}
	devs, err := a.read(ctx)
	if err != nil {
		a.log.Warn("GPU readings failed", zap.Error(err))
		return
	}
	changed := false
	for name, c := range a.claims {
		if c.phase != phaseReleasing {
			continue
		}
		left := onGPUs(devs, c.uuids, c.pids)
		timedOut := a.now().Sub(c.since) >= a.release
		if len(left) > 0 && !timedOut {
			continue
		}
		if len(left) > 0 {
			note := fmt.Sprintf("%s's processes %v still held memory after release_timeout %s", name, left, a.release)
			for _, u := range c.uuids {
				a.notes[u] = note
			}
			a.log.Warn("GPU memory not released in time; placing anyway", zap.String("model", name), zap.Ints("pids", left), zap.Duration("release_timeout", a.release))
		}
		if c.keep {
			c.phase, c.pids = phaseReserved, nil
		} else {
			delete(a.claims, name)
		}
		changed = true
	}
	if changed {
		a.wakeWaiters()
		for name, c := range a.claims {
			if c.phase == phaseReserved {
				a.wake(name)
			}
		}
	}
}

// onGPUs returns the pids still holding memory on any of uuids.
func onGPUs(devs []gpu.Device, uuids []string, pids []int) []int {
	var out []int
	for _, d := range devs {
		if !slices.Contains(uuids, d.UUID) {
			continue
		}
		for _, p := range d.Processes {
			if slices.Contains(pids, p.PID) && !slices.Contains(out, p.PID) {
				out = append(out, p.PID)
			}
		}
	}
	slices.Sort(out)
	return out
}

func (a *allocator) releasing() bool {
	for _, c := range a.claims {
		if c.phase == phaseReleasing {
			return true
		}
	}
	return false
}

func (a *allocator) wakeWaiters() {
	for name := range a.waiting {
		a.wake(name)
	}
}

// publishSimUses updates what the sim backend shows as used: every claim
// with a live main process holds its share.
func (a *allocator) publishSimUses() {
	var uses []gpu.SimUse
	for _, c := range a.claims {
		if c.pid == 0 {
			continue
		}
		for _, u := range c.uuids {
			uses = append(uses, gpu.SimUse{PID: c.pid, UUIDs: []string{u}, Bytes: c.share[u]})
		}
	}
	a.simUses.Store(&uses)
}

// SimUses is the sim backend's view of running models. It reads an atomic
// snapshot: the sim is read from the allocator's own goroutine.
func (a *allocator) SimUses() []gpu.SimUse { return *a.simUses.Load() }

func (a *allocator) indexes(slots []gpu.Slot, uuids []string) string {
	var out []string
	for _, s := range slots {
		if slices.Contains(uuids, s.UUID) {
			out = append(out, fmt.Sprintf("GPU%d", s.Index))
		}
	}
	return strings.Join(out, ", ")
}

// GPUView is one GPU with what the supervisor placed on it, for
// `citadelctl gpus`.
type GPUView struct {
	gpu.Device
	Models  []string `json:"models"`
	Claimed uint64   `json:"claimed_bytes"`
	Busy    string   `json:"busy,omitempty"`
	Note    string   `json:"note,omitempty"`
}

// Views reads the GPUs and lists the models placed on each.
func (a *allocator) Views(ctx context.Context) ([]GPUView, error) {
	if a.reader == nil {
		return nil, fmt.Errorf("%s", a.why)
	}
	var out []GPUView
	var err error
	if e := a.do(ctx, func() {
		var slots []gpu.Slot
		if slots, err = a.slots(ctx); err != nil {
			return
		}
		for _, s := range slots {
			v := GPUView{Device: s.Device, Models: []string{}, Claimed: s.Claimed, Busy: s.Busy, Note: s.Note}
			for name, c := range a.claims {
				if slices.Contains(c.uuids, s.UUID) {
					v.Models = append(v.Models, name)
				}
			}
			slices.Sort(v.Models)
			out = append(out, v)
		}
	}); e != nil {
		return nil, e
	}
	return out, err
}
