package supervisor

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
)

// readEvery is how often the GPUs are read while a model waits for them or
// a stopped model's memory is being released.
const readEvery = time.Second

// placement is the scheduler's answer to a want: GPUs, or why it waits.
type placement struct {
	seq    int      // the want it answers
	gpus   []string // granted; nil while waiting
	reason string   // why it waits
}

// scheduler owns every GPU claim and want. Runners tell it what they want
// and what they release; it never waits on them: answers go to each
// runner's mailbox, which holds the latest one. GPU readings are taken on
// a goroutine of their own and sent in, so the deciding loop never waits
// on NVML. Every decision is gpu.Decide, a pure function of the wants, the
// claims and the latest readings.
type scheduler struct {
	reader   gpu.Reader // nil: no readings (backend none, or NVML absent)
	why      string     // why there are no readings
	headroom config.ByteSize
	release  time.Duration
	now      func() time.Time
	log      *zap.Logger
	owners   func() map[int]string // pid → model, from the runners' trees
	deliver  func(name string, p placement)
	// usage says what decides whether a model may be put to sleep to make
	// room (modelUsage).
	usage func(name string) modelUsage
	evict func(victim, forModel string) // tell a model to sleep for another

	inbox   chan func()
	poke    chan struct{} // ask the reading goroutine for a reading now
	stopped chan struct{}
	active  atomic.Bool // wants or releases outstanding: keep reading

	wants   map[string]gpu.Want
	seqs    map[string]int // the seq of each want, echoed in placements
	claims  map[string]gpu.Claim
	devs    []gpu.Device
	readAt  time.Time
	readErr string
	// restoredAt is when claims were last restored (Adopt): nothing is
	// decided on a reading older than that.
	restoredAt time.Time
	// restoring is true from Restoring until Restored: runners are telling
	// what the models taken over hold, and nothing is decided until all
	// have (a GPU not yet known to be busy is not free).
	restoring bool
	// quiet holds the models waiting for quiet GPUs (Quiet), with the seq
	// of their request; quietSaid the last answer sent to each.
	quiet     map[string]int
	quietSaid map[string]string
	// tellQuiet hands a quiet answer to the model's runner.
	tellQuiet func(name string, seq int, ok bool, reason string)
	notes     map[string]string
	answered  map[string]placement // last answer per model: unchanged ones are not re-sent
	snapshot  atomic.Pointer[schedSnapshot]
	indices   atomic.Pointer[[]gpu.Device] // the latest readings, stored before any answer made from them
}

// modelUsage is what the scheduler asks of a model when it may put it to
// sleep for another: on demand, its min_awake (counted from the instant
// its lifecycle saw it ready, which Ready carries), its last request, the
// requests waiting in its queue now, and what putting it to sleep (or
// stopping it) would cost when it is wanted again (the eviction policy's
// data, gpu/evict.go).
type modelUsage struct {
	onDemand    bool
	minAwake    time.Duration
	lastRequest time.Time
	waiting     int
	cost        gpu.Cost
}

// schedSnapshot is what `citadelctl gpus` shows: published after every
// decision, read without touching the loop.
type schedSnapshot struct {
	devs    []gpu.Device
	claims  []gpu.Claim
	notes   map[string]string
	readErr string
}

func newScheduler(cfg *config.Config, reader gpu.Reader, why string, log *zap.Logger, now func() time.Time) *scheduler {
	s := &scheduler{
		reader:    reader,
		why:       why,
		headroom:  cfg.GPU.Headroom,
		release:   cfg.GPU.ReleaseTimeout,
		now:       now,
		log:       log.Named("gpu"),
		owners:    func() map[int]string { return nil },
		deliver:   func(string, placement) {},
		usage:     func(string) modelUsage { return modelUsage{} },
		evict:     func(string, string) {},
		inbox:     make(chan func(), 64),
		poke:      make(chan struct{}, 1),
		stopped:   make(chan struct{}),
		wants:     map[string]gpu.Want{},
		seqs:      map[string]int{},
		claims:    map[string]gpu.Claim{},
		notes:     map[string]string{},
		answered:  map[string]placement{},
		quiet:     map[string]int{},
		quietSaid: map[string]string{},
		tellQuiet: func(string, int, bool, string) {},
	}
	s.snapshot.Store(&schedSnapshot{})
	return s
}

// run decides until ctx ends. It outlives every runner: their last act is
// to release their GPUs.
func (s *scheduler) run(ctx context.Context) {
	defer close(s.stopped)
	if s.reader != nil {
		go s.readLoop(ctx)
	}
	for {
		select {
		case <-ctx.Done():
			return
		case f := <-s.inbox:
			f()
			s.decide()
		}
	}
}

// readLoop reads the GPUs when poked, and every readEvery while something
// waits on them, and sends the readings to the loop.
func (s *scheduler) readLoop(ctx context.Context) {
	tick := time.NewTicker(readEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.poke:
		case <-tick.C:
			if !s.active.Load() {
				continue
			}
		}
		// A reading shows what was there when it began: a model that fell
		// asleep after that is not yet seen to have given memory back.
		at := s.now()
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		devs, err := s.reader.Read(rctx)
		cancel()
		s.send(func() {
			s.readAt = at
			if err != nil {
				if s.readErr == "" {
					s.log.Warn("GPU readings failed", zap.Error(err))
				}
				s.readErr = err.Error()
				return
			}
			s.devs, s.readErr = devs, ""
			s.indices.Store(&devs)
		})
	}
}

// send queues f for the loop. The loop never blocks, so neither does this
// for longer than a decision takes; after the loop ended it is dropped.
func (s *scheduler) send(f func()) {
	select {
	case s.inbox <- f:
	case <-s.stopped:
	}
}

func (s *scheduler) pokeReader() {
	select {
	case s.poke <- struct{}{}:
	default:
	}
}

// Expect declares models whose checks are about to run: lower-priority
// models wait for them (gpu.Want.Checking).
func (s *scheduler) Expect(models []config.Model) {
	if s.reader == nil {
		return
	}
	s.send(func() {
		for _, m := range models {
			// On-demand models start when a request comes, not now.
			if m.Enabled && !m.OnDemand() {
				s.wants[m.Name] = gpu.Want{Request: PlacementRequest(m), Checking: true, Since: s.now()}
			}
		}
	})
}

// Want asks for GPUs for m; the answer, tagged with seq, goes to the
// model's mailbox. A claim granted to an earlier want and never used is
// given back first.
// held, for a wake, is what the model held on each GPU before it slept:
// it is given that much back, not only its share.
func (s *scheduler) Want(m config.Model, seq int, held map[string]uint64) {
	s.send(func() {
		if c, ok := s.claims[m.Name]; ok && (c.Phase == gpu.Starting || c.Phase == gpu.Running) {
			delete(s.claims, m.Name)
		}
		w := gpu.Want{Request: PlacementRequest(m), Since: s.now(), Held: held}
		if old, ok := s.wants[m.Name]; ok && !old.Checking {
			w.Since = old.Since // asked again: its place in line stays
		}
		s.wants[m.Name] = w
		s.seqs[m.Name] = seq
		delete(s.answered, m.Name)
		s.pokeReader()
	})
}

// Ready lifts the model's start serialisation on its GPUs. at is the
// instant its lifecycle saw it ready: min_awake counts from there, not
// from a status published later (a decision in between would put a model
// to sleep in the millisecond it woke).
func (s *scheduler) Ready(name string, at time.Time) {
	s.send(func() {
		if c, ok := s.claims[name]; ok && c.Phase == gpu.Starting {
			c.Phase, c.Since, c.AwakeAt = gpu.Running, s.now(), at
			s.claims[name] = c
		}
	})
}

// Release says the model's processes were stopped: its GPUs stay busy
// until none of pids is on them (or release_timeout passes). With keep the
// claim then stays reserved for the model's restart; without, it goes.
func (s *scheduler) Release(name string, pids []int, keep bool) {
	s.send(func() {
		delete(s.wants, name)
		c, ok := s.claims[name]
		if !ok {
			return
		}
		if c.Phase == gpu.Asleep {
			// A sleeper's memory went to others: there is nothing to keep.
			// Its next start asks for memory as any start does.
			keep = false
		}
		c.Phase, c.PIDs, c.Since, c.Keep, c.Changing = gpu.Releasing, pids, s.now(), keep, false
		s.claims[name] = c
		s.pokeReader()
	})
}

// Slept says the model sleeps on its GPUs: its memory comes back (the
// readings will show how much) and it wakes there.
func (s *scheduler) Slept(name string) {
	s.send(func() {
		if c, ok := s.claims[name]; ok {
			c.Phase, c.Since, c.Evicting, c.Changing = gpu.Asleep, s.now(), false, false
			s.claims[name] = c
			s.pokeReader()
		}
	})
}

// Quiet asks for the model's GPUs to be quiet: no other model starting or
// waking there. The answer (tagged seq) goes to its runner once they are;
// meanwhile, what it waits for. Granted, the model's GPUs count as busy
// (its memory changes) until it sleeps, is released, or Unquiet.
func (s *scheduler) Quiet(name string, seq int) {
	s.send(func() {
		s.quiet[name] = seq
		delete(s.quietSaid, name)
	})
}

// Unquiet withdraws a quiet request, or ends the change it granted (a
// sleep abandoned).
func (s *scheduler) Unquiet(name string) {
	s.send(func() {
		delete(s.quiet, name)
		if c, ok := s.claims[name]; ok {
			c.Changing = false
			s.claims[name] = c
		}
	})
}

// Changing says the model's memory changes from now (a stop begins): its
// GPUs are busy until it is released.
func (s *scheduler) Changing(name string) {
	s.send(func() {
		delete(s.quiet, name)
		if c, ok := s.claims[name]; ok && c.Phase != gpu.Releasing {
			c.Changing = true
			s.claims[name] = c
		}
	})
}

// answerQuiet answers the quiet requests: granted where no other model is
// starting or waking on the model's GPUs. Called after each decision, so
// a start granted in it goes first.
func (s *scheduler) answerQuiet() {
	for _, name := range slices.Sorted(maps.Keys(s.quiet)) {
		seq := s.quiet[name]
		c, ok := s.claims[name]
		busy := ""
		if ok {
			for _, other := range slices.Sorted(maps.Keys(s.claims)) {
				o := s.claims[other]
				if other == name || o.Phase != gpu.Starting {
					continue
				}
				if u := sharedGPU(c.UUIDs, o.UUIDs); u != "" {
					busy = fmt.Sprintf("%s, which is starting or waking on %s", other, s.gpuName(u))
					break
				}
			}
		}
		if busy == "" {
			delete(s.quiet, name)
			delete(s.quietSaid, name)
			if ok {
				c.Changing = true
				s.claims[name] = c
			}
			s.tellQuiet(name, seq, true, "")
			continue
		}
		if s.quietSaid[name] != busy {
			s.quietSaid[name] = busy
			s.tellQuiet(name, seq, false, busy)
		}
	}
}

func sharedGPU(a, b []string) string {
	for _, u := range a {
		if slices.Contains(b, u) {
			return u
		}
	}
	return ""
}

// gpuName is "GPU<index>" for uuid as last read, else the UUID.
func (s *scheduler) gpuName(uuid string) string {
	for _, d := range s.devs {
		if d.UUID == uuid {
			return fmt.Sprintf("GPU%d", d.Index)
		}
	}
	return uuid
}

// Declined says the model could not be put to sleep for another (it was
// not ready, requests would not drain, or a sleep or stop of its own is
// under way): the scheduler looks again. A change of its memory already
// under way stays one (Unquiet, Slept or Release ends it): a decline
// withdraws the eviction, never the busy GPU.
func (s *scheduler) Declined(name string) {
	s.send(func() {
		if c, ok := s.claims[name]; ok {
			c.Evicting = false
			s.claims[name] = c
		}
	})
}

// Drop withdraws the model's want and gives up its claim: it will not
// start soon (failed, held stopped, removed, or its checks failed). A
// release in progress still completes first.
func (s *scheduler) Drop(name string) {
	s.send(func() {
		delete(s.wants, name)
		delete(s.quiet, name)
		c, ok := s.claims[name]
		switch {
		case !ok:
		case c.Phase == gpu.Releasing:
			c.Keep = false
			s.claims[name] = c
		default:
			delete(s.claims, name)
		}
	})
}

// Withdraw takes back a sleeper's want to wake (nobody waits for it any
// more). It stays asleep on its GPUs: a wake granted meanwhile, but not
// begun (the runner ignores the answer), is asleep again.
func (s *scheduler) Withdraw(name string) {
	s.send(func() {
		delete(s.wants, name)
		delete(s.answered, name)
		if c, ok := s.claims[name]; ok && c.Phase == gpu.Starting {
			c.Phase, c.Since = gpu.Asleep, s.now()
			s.claims[name] = c
		}
		s.pokeReader()
	})
}

// Restoring says models are being taken over (an upgrade, or adoption
// after a crash): each runner tells what its model holds (Adopt) in its
// own time. Until Restored, no start, wake or quiet GPU is granted: one
// granted between two runners' Adopts would go to a GPU where a model
// not told yet loads or holds memory.
func (s *scheduler) Restoring() {
	s.send(func() { s.restoring = true })
}

// Restored says every runner has told what it took over.
func (s *scheduler) Restored() {
	s.send(func() {
		s.restoring = false
		s.pokeReader()
	})
}

// decide runs gpu.Decide over the current state, keeps its outcome and
// tells each waiting runner its answer.
func (s *scheduler) decide() {
	if s.restoring {
		return
	}
	defer s.publish()
	defer s.answerQuiet()
	if s.reader == nil {
		// No readings: no placement and no memory checks. A pinned model
		// gets its pins as written; an unpinned one sees every GPU.
		for name, w := range s.wants {
			if w.Checking {
				continue
			}
			pins := slices.Clone(w.Pins)
			if pins == nil {
				pins = []string{}
			}
			delete(s.wants, name)
			s.deliver(name, placement{seq: s.seqs[name], gpus: pins})
		}
		return
	}
	owners := s.owners()
	in := gpu.Input{
		Devices: s.devs, ReadAt: s.readAt, ReadErr: s.readErr, Headroom: s.headroom, ReleaseTimeout: s.release,
		Now: s.now(), Notes: s.notes, NotBefore: s.restoredAt,
	}
	for _, w := range s.wants {
		in.Wants = append(in.Wants, w)
	}
	for name, c := range s.claims {
		if c.Phase != gpu.Releasing {
			// A stopped model no longer lists its pids; a releasing claim
			// remembers the ones it waits for.
			c.PIDs = pidsOf(owners, name)
		}
		u := s.usage(name)
		c.OnDemand, c.Waiting, c.LastUsed, c.Protected = u.onDemand, u.waiting, u.lastRequest, ""
		if c.AwakeAt.After(c.LastUsed) {
			c.LastUsed = c.AwakeAt
		}
		if awake := in.Now.Sub(c.AwakeAt); c.Phase == gpu.Running && u.onDemand && awake < u.minAwake {
			c.Protected = fmt.Sprintf("awake for %s (min_awake %s)", roundDuration(awake), u.minAwake)
		}
		c.Cost = u.cost
		in.Claims = append(in.Claims, c)
	}
	out := gpu.Decide(in)
	for _, l := range out.Log {
		s.log.Warn(l)
	}
	s.notes = out.Notes
	s.claims = map[string]gpu.Claim{}
	for _, c := range out.Claims {
		s.claims[c.Name] = c
	}
	for name, uuids := range out.Grants {
		delete(s.wants, name)
		s.log.Info("placed", zap.String("model", name), zap.Strings("gpus", uuids))
		s.answer(name, placement{seq: s.seqs[name], gpus: uuids})
	}
	for name, reason := range out.Waits {
		s.answer(name, placement{seq: s.seqs[name], reason: reason})
	}
	for victim, forModel := range out.Evict {
		s.log.Info("putting a model to sleep to make room", zap.String("model", victim), zap.String("for", forModel))
		s.evict(victim, forModel)
	}
	busy := len(s.wants) > 0
	for _, c := range s.claims {
		busy = busy || c.Phase == gpu.Releasing
	}
	s.active.Store(busy)
}

// answer delivers p unless the runner has it already.
func (s *scheduler) answer(name string, p placement) {
	if last, ok := s.answered[name]; ok && last.seq == p.seq && last.reason == p.reason && slices.Equal(last.gpus, p.gpus) {
		return
	}
	s.answered[name] = p
	s.deliver(name, p)
}

func (s *scheduler) publish() {
	snap := &schedSnapshot{devs: s.devs, notes: maps.Clone(s.notes), readErr: s.readErr}
	for _, name := range slices.Sorted(maps.Keys(s.claims)) {
		snap.claims = append(snap.claims, s.claims[name])
	}
	s.snapshot.Store(snap)
}

func pidsOf(owners map[int]string, name string) []int {
	var out []int
	for pid, m := range owners {
		if m == name {
			out = append(out, pid)
		}
	}
	slices.Sort(out)
	return out
}

// PlacementRequest is what model m asks of the GPUs.
func PlacementRequest(m config.Model) gpu.Request {
	r := gpu.Request{Name: m.Name, Priority: m.Priority, TP: m.TensorParallel, Util: m.GPUMemoryUtilization, OnDemand: m.OnDemand()}
	for _, p := range m.GPUs {
		r.Pins = append(r.Pins, string(p))
	}
	return r
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

// Views reads the GPUs now and lists the models placed on each (claims as
// of the last decision).
func (s *scheduler) Views(ctx context.Context) ([]GPUView, error) {
	if s.reader == nil {
		return nil, fmt.Errorf("%s", s.why)
	}
	devs, err := s.reader.Read(ctx)
	if err != nil {
		return nil, fmt.Errorf("GPU readings failed: %w", err)
	}
	snap := s.snapshot.Load()
	owners := s.owners()
	claims := map[string]*gpu.Claim{}
	for _, c := range snap.claims {
		if c.Phase != gpu.Releasing {
			c.PIDs = pidsOf(owners, c.Name)
		}
		claims[c.Name] = &c
	}
	var out []GPUView
	for _, sl := range gpu.Slots(devs, claims, snap.notes) {
		v := GPUView{Device: sl.Device, Models: []string{}, Claimed: sl.Claimed, Busy: sl.Busy, Note: sl.Note}
		for _, c := range snap.claims {
			if slices.Contains(c.UUIDs, sl.UUID) {
				v.Models = append(v.Models, c.Name)
			}
		}
		out = append(out, v)
	}
	return out, nil
}

// indexOf is the NVML index of the GPU uuid in the latest readings. Any
// goroutine may call it.
func (s *scheduler) indexOf(uuid string) (int, bool) {
	devs := s.indices.Load()
	if devs == nil {
		return 0, false
	}
	for _, d := range *devs {
		if d.UUID == uuid {
			return d.Index, true
		}
	}
	return 0, false
}
