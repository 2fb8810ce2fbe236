package schedule

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

// Options builds a Scheduler.
type Options struct {
	// Reader reads the GPUs; nil: no readings (backend none, or NVML
	// absent), no placement and no memory checks.
	Reader gpu.Reader
	// NoReadings says why Reader is nil (Views returns it).
	NoReadings string
	// Headroom and ReleaseTimeout are gpu.headroom and
	// gpu.release_timeout.
	Headroom       config.ByteSize
	ReleaseTimeout time.Duration
	Now            func() time.Time // nil: time.Now
	Log            *zap.Logger      // nil: none
	// Models is read at each decision; nil: no processes, no model on
	// demand.
	Models Models
	// Out takes every answer; nil: they are dropped.
	Out Outbox
}

// Scheduler owns every GPU claim and want. Runners tell it what they want
// and what they release; it never waits on them: its answers go to the
// Outbox, which puts each in the runner's mailbox (that holds the latest
// placement). GPU readings are taken on a goroutine of their own and sent
// in, so the deciding loop never waits on NVML. Every decision is
// gpu.Decide, a pure function of the wants, the claims and the latest
// readings.
type Scheduler struct {
	reader   gpu.Reader // nil: no readings (backend none, or NVML absent)
	why      string     // why there are no readings
	headroom config.ByteSize
	release  time.Duration
	now      func() time.Time
	log      *zap.Logger
	models   Models
	out      Outbox

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
	notes     map[string]string
	answered  map[string]Placement // last answer per model: unchanged ones are not re-sent
	snapshot  atomic.Pointer[snapshot]
	indices   atomic.Pointer[[]gpu.Device] // the latest readings, stored before any answer made from them
}

// snapshot is what `citadelctl gpus` shows: published after every
// decision, read without touching the loop.
type snapshot struct {
	devs    []gpu.Device
	claims  []gpu.Claim
	notes   map[string]string
	readErr string
}

type noModels struct{}

func (noModels) Observe([]string) Observation { return Observation{} }

// New builds a Scheduler; Run runs it.
func New(o Options) *Scheduler {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Log == nil {
		o.Log = zap.NewNop()
	}
	if o.Models == nil {
		o.Models = noModels{}
	}
	if o.Out == nil {
		o.Out = OutboxFunc(func(string, Answer) {})
	}
	s := &Scheduler{
		reader:    o.Reader,
		why:       o.NoReadings,
		headroom:  o.Headroom,
		release:   o.ReleaseTimeout,
		now:       o.Now,
		log:       o.Log.Named("gpu"),
		models:    o.Models,
		out:       o.Out,
		inbox:     make(chan func(), 64),
		poke:      make(chan struct{}, 1),
		stopped:   make(chan struct{}),
		wants:     map[string]gpu.Want{},
		seqs:      map[string]int{},
		claims:    map[string]gpu.Claim{},
		notes:     map[string]string{},
		answered:  map[string]Placement{},
		quiet:     map[string]int{},
		quietSaid: map[string]string{},
	}
	s.snapshot.Store(&snapshot{})
	return s
}

// Run decides until ctx ends. It outlives every runner: their last act is
// to release their GPUs.
func (s *Scheduler) Run(ctx context.Context) {
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

// Done is closed once Run has returned.
func (s *Scheduler) Done() <-chan struct{} { return s.stopped }

// readLoop reads the GPUs when poked, and every readEvery while something
// waits on them, and sends the readings to the loop.
func (s *Scheduler) readLoop(ctx context.Context) {
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
func (s *Scheduler) send(f func()) {
	select {
	case s.inbox <- f:
	case <-s.stopped:
	}
}

func (s *Scheduler) pokeReader() {
	select {
	case s.poke <- struct{}{}:
	default:
	}
}

// Expect declares models whose checks are about to run: lower-priority
// models wait for them (gpu.Want.Checking).
func (s *Scheduler) Expect(models []config.Model) {
	if s.reader == nil {
		return
	}
	s.send(func() {
		for _, m := range models {
			// On-demand models start when a request comes, not now.
			if m.Enabled && !m.OnDemand() {
				s.wants[m.Name] = gpu.Want{Request: Request(m), Checking: true, Since: s.now()}
			}
		}
	})
}

// Want asks for GPUs for m; the answer, a Placement tagged with seq, goes
// to the Outbox. A claim granted to an earlier want and never used is
// given back first.
// held, for a wake, is what the model held on each GPU before it slept:
// it is given that much back, not only its share.
func (s *Scheduler) Want(m config.Model, seq int, held map[string]uint64) {
	s.send(func() {
		if c, ok := s.claims[m.Name]; ok && (c.Phase == gpu.Starting || c.Phase == gpu.Running) {
			delete(s.claims, m.Name)
		}
		w := gpu.Want{Request: Request(m), Since: s.now(), Held: held}
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
func (s *Scheduler) Ready(name string, at time.Time) {
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
func (s *Scheduler) Release(name string, pids []int, keep bool) {
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
func (s *Scheduler) Slept(name string) {
	s.send(func() {
		if c, ok := s.claims[name]; ok {
			c.Phase, c.Since, c.Evicting, c.Changing = gpu.Asleep, s.now(), false, false
			s.claims[name] = c
			s.pokeReader()
		}
	})
}

// Quiet asks for the model's GPUs to be quiet: no other model starting or
// waking there. The answer (a QuietAnswer tagged seq) goes to the Outbox
// once they are; meanwhile, what it waits for. Granted, the model's GPUs count as busy
// (its memory changes) until it sleeps, is released, or Unquiet.
func (s *Scheduler) Quiet(name string, seq int) {
	s.send(func() {
		s.quiet[name] = seq
		delete(s.quietSaid, name)
	})
}

// Unquiet withdraws a quiet request, or ends the change it granted (a
// sleep abandoned).
func (s *Scheduler) Unquiet(name string) {
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
func (s *Scheduler) Changing(name string) {
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
func (s *Scheduler) answerQuiet() {
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
			s.out.Deliver(name, QuietAnswer{Seq: seq, OK: true})
			continue
		}
		if s.quietSaid[name] != busy {
			s.quietSaid[name] = busy
			s.out.Deliver(name, QuietAnswer{Seq: seq, Reason: busy})
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
func (s *Scheduler) gpuName(uuid string) string {
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
func (s *Scheduler) Declined(name string) {
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
func (s *Scheduler) Drop(name string) {
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
func (s *Scheduler) Withdraw(name string) {
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

// Adopt records the claim of a model restored with its process: it holds
// gpus in phase (running, starting or asleep), awake since awakeAt. No
// decision is made until a reading taken after it: the memory the
// restored processes hold is known only then.
func (s *Scheduler) Adopt(m config.Model, gpus []string, phase gpu.Phase, awakeAt time.Time, changing bool) {
	s.send(func() {
		delete(s.wants, m.Name)
		s.restoredAt = s.now()
		if len(gpus) == 0 {
			return
		}
		s.claims[m.Name] = gpu.Claim{Name: m.Name, Req: Request(m), UUIDs: slices.Clone(gpus), Phase: phase, Since: s.now(), AwakeAt: awakeAt, Changing: changing}
		s.pokeReader()
	})
}

// Restoring says models are being taken over (an upgrade, or adoption
// after a crash): each runner tells what its model holds (Adopt) in its
// own time. Until Restored, no start, wake or quiet GPU is granted: one
// granted between two runners' Adopts would go to a GPU where a model
// not told yet loads or holds memory.
func (s *Scheduler) Restoring() {
	s.send(func() { s.restoring = true })
}

// Restored says every runner has told what it took over.
func (s *Scheduler) Restored() {
	s.send(func() {
		s.restoring = false
		s.pokeReader()
	})
}

// decide runs gpu.Decide over the current state, keeps its outcome and
// tells each waiting runner its answer.
func (s *Scheduler) decide() {
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
			s.out.Deliver(name, Placement{Seq: s.seqs[name], GPUs: pins})
		}
		return
	}
	obs := s.models.Observe(slices.Sorted(maps.Keys(s.claims)))
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
			c.PIDs = pidsOf(obs.PIDs, name)
		}
		u, onDemand := obs.Usage[name]
		fill(&c, u, onDemand, in.Now)
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
		s.answer(name, Placement{Seq: s.seqs[name], GPUs: uuids})
	}
	for name, reason := range out.Waits {
		s.answer(name, Placement{Seq: s.seqs[name], Reason: reason})
	}
	for victim, forModel := range out.Evict {
		s.log.Info("putting a model to sleep to make room", zap.String("model", victim), zap.String("for", forModel))
		s.out.Deliver(victim, Eviction{For: forModel})
	}
	busy := len(s.wants) > 0
	for _, c := range s.claims {
		busy = busy || c.Phase == gpu.Releasing
	}
	s.active.Store(busy)
}

// answer delivers p unless the runner has it already.
func (s *Scheduler) answer(name string, p Placement) {
	if last, ok := s.answered[name]; ok && last.Seq == p.Seq && last.Reason == p.Reason && slices.Equal(last.GPUs, p.GPUs) {
		return
	}
	s.answered[name] = p
	s.out.Deliver(name, p)
}

func (s *Scheduler) publish() {
	snap := &snapshot{devs: s.devs, notes: maps.Clone(s.notes), readErr: s.readErr}
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

// Request is what model m asks of the GPUs.
func Request(m config.Model) gpu.Request {
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
func (s *Scheduler) Views(ctx context.Context) ([]GPUView, error) {
	if s.reader == nil {
		return nil, fmt.Errorf("%s", s.why)
	}
	devs, err := s.reader.Read(ctx)
	if err != nil {
		return nil, fmt.Errorf("GPU readings failed: %w", err)
	}
	snap := s.snapshot.Load()
	owners := s.models.Observe(nil).PIDs
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

// IndexOf is the NVML index of the GPU uuid in the latest readings. Any
// goroutine may call it.
func (s *Scheduler) IndexOf(uuid string) (int, bool) {
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
