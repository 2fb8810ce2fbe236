package supervisor

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/probe"
	"citadel-supervisor/supervisor/lifecycle"
	"citadel-supervisor/supervisor/liverestore"
	"citadel-supervisor/supervisor/proc"
	"citadel-supervisor/supervisor/schedule"
	"citadel-supervisor/vllm"
)

// runner carries out one model's machine: its goroutine is the only one
// that touches the machine. It turns the machine's effects into I/O
// (spawn, stop, probe, timers, scheduler calls) and the outcomes back into
// events. Everything else sends it messages through its mailbox, which
// never blocks the sender, or reads the Status it publishes.
type runner struct {
	name   string
	d      *deps
	log    *zap.Logger
	out    *ring
	status atomic.Pointer[Status]
	mail   mailbox

	stopped chan struct{}               // closed when run has returned
	began   chan struct{}               // closed once its first real status is published
	pids    atomic.Pointer[[]int]       // the current instance's processes, for GPU attribution
	cpu     cpuCounter                  // citadel_model_cpu_seconds_total, kept monotonic
	labels  atomic.Pointer[modelLabels] // its series' label pairs, built at its first scrape
	cg      atomic.Pointer[proc.Cgroup] // the current instance's cgroup leaf, for its accounting
	marker  atomic.Pointer[string]      // the live instance's marker; nil once its stop begins
	// lastRequest is the unix nanoseconds of the gateway's last request
	// for the model.
	lastRequest atomic.Int64
	// uses counts the gateway's requests for the model, fading (the
	// eviction policy's frequency, gpu/evict.go).
	uses schedule.UseCounter
	// serving is signalled by the output readers when the model says it
	// serves (serving.go); the runner probes a starting model at once.
	serving chan struct{}
	// own counts the daemon's own requests to the model in flight (probes,
	// deep probes, the canary): a sleep or a planned stop waits for them
	// as for the gateway's.
	own atomic.Int64
	// apiKey is the key the live instance's vLLM wants (VLLM_API_KEY or
	// --api-key), sent on every call to it; nil or "" when none. Never
	// logged, published or written down.
	apiKey atomic.Pointer[string]
}

// key is the live instance's API key, "" when it has none.
func (r *runner) key() string {
	if k := r.apiKey.Load(); k != nil {
		return *k
	}
	return ""
}

// message is what others send a runner: an event, and for operations a
// channel for the answer.
type message struct {
	ev     lifecycle.Event
	done   chan error // nil: nobody waits
	freeze *freezeReq // instead of ev: an upgrade writes the machine down
}

// mailbox is an unbounded queue: senders never wait on the runner, and
// the scheduler's placements replace each other (only the latest counts).
type mailbox struct {
	mu     sync.Mutex
	msgs   []message
	placed *schedule.Placement
	signal chan struct{} // one token: something is queued
}

func (b *mailbox) put(m message) {
	b.mu.Lock()
	b.msgs = append(b.msgs, m)
	b.mu.Unlock()
	b.notify()
}

func (b *mailbox) place(p schedule.Placement) {
	b.mu.Lock()
	b.placed = &p
	b.mu.Unlock()
	b.notify()
}

func (b *mailbox) notify() {
	select {
	case b.signal <- struct{}{}:
	default:
	}
}

// take empties the mailbox: the placement first (it answers a want made
// before any message now queued).
func (b *mailbox) take() ([]message, *schedule.Placement) {
	b.mu.Lock()
	defer b.mu.Unlock()
	msgs, p := b.msgs, b.placed
	b.msgs, b.placed = nil, nil
	return msgs, p
}

// instance is one spawned process tree of a model.
type instance struct {
	// Instance is what the machine knows of it: its identity, as plain
	// data; the machine names the instance by a pointer to it.
	lifecycle.Instance
	start  uint64 // the main process's start time: with its PID, its identity
	marker string
	digest string // the configuration's SpawnDigest it was started with
	tree   processTree
	kill   func() error  // SIGKILLs the main process (through its pidfd)
	deep   *probe.Deep   // the deep probe's schedule, owned by the probe in flight
	done   chan struct{} // closed once the main process is reaped; then Exit is set
	// Its output pipes' read ends, handed to the next image at an upgrade.
	stdout, stderr *os.File
}

// exited reports whether the main process has been reaped.
func (i *instance) exited() bool {
	select {
	case <-i.done:
		return true
	default:
		return false
	}
}

func newRunner(m config.Model, d *deps) *runner {
	r := &runner{
		name:    m.Name,
		d:       d,
		log:     d.log.With(zap.String("model", m.Name)),
		out:     newRing(OutputLines),
		stopped: make(chan struct{}),
		began:   make(chan struct{}),
		mail:    mailbox{signal: make(chan struct{}, 1)},
		serving: make(chan struct{}, 1),
	}
	// Readable before the goroutine runs: Status never misses a model.
	r.status.Store(&Status{Name: m.Name, State: Pending, Reason: "supervisor starting", Port: m.Port, Enabled: m.Enabled, Since: d.now()})
	return r
}

// send delivers an operation or a configuration to the runner and waits
// until the machine has taken it.
func (r *runner) send(ctx context.Context, ev lifecycle.Event) error {
	m := message{ev: ev, done: make(chan error, 1)}
	r.mail.put(m)
	select {
	case err := <-m.done:
		return err
	case <-r.stopped:
		return fmt.Errorf("model %s is shutting down", r.name)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// loop is the runner goroutine's state: the machine, and the I/O in
// flight on its behalf.
type loop struct {
	r       *runner
	m       *lifecycle.Machine
	timers  [lifecycle.NumTimers]<-chan time.Time // nil: not armed; replacing one drops its fire
	timerAt [lifecycle.NumTimers]time.Time        // when each armed timer fires
	ctx     context.Context                       // run's: a freeze ends with it (the daemon stops)
	results chan lifecycle.Event                  // probes and stops report here
	seq     uint64                                // of the last published status
	// later is work that must wait until the step's status is published
	// (a sleep's drain names that status).
	later []func()
	// The spawn in flight (spawning.go): its outcome (unbuffered: a result
	// the runner no longer takes is its job's to stop), what it does now,
	// when it is said to hang, and, at the shutdown, how long it is still
	// waited for. gone is closed once the loop has ended.
	spawned     chan spawnOutcome
	spawnJob    *spawnRun
	spawnSlow   <-chan time.Time
	spawnGiveUp <-chan time.Time
	gone        chan struct{}
	// procs are the handles of the instances the machine knows, by the
	// identity it knows them by: the one it runs, and one being stopped.
	procs map[*lifecycle.Instance]*instance
}

// proc is the instance the machine names id.
func (l *loop) proc(id *lifecycle.Instance) *instance {
	inst := l.procs[id]
	if inst == nil {
		panic(fmt.Sprintf("runner: the machine names an instance the runner does not hold (pid %d)", id.PID))
	}
	return inst
}

// track keeps inst's handles for the machine, which knows it as
// &inst.Instance.
func (l *loop) track(inst *instance) *lifecycle.Instance {
	if inst == nil {
		return nil
	}
	l.procs[&inst.Instance] = inst
	return &inst.Instance
}

// restored is what a runner takes over instead of beginning afresh: the
// state a predecessor wrote down and, when it still runs, its process.
type restored struct {
	st   liverestore.ModelState
	inst *instance
}

// run drives the model until ctx ends, then stops its processes and returns.
// With from, it takes over a predecessor's state and process.
func (r *runner) run(ctx context.Context, cfg config.Model, from *restored) {
	l := &loop{
		r:       r,
		m:       lifecycle.New(cfg, r.d.now, r.d.jitter, r.log),
		results: make(chan lifecycle.Event, 4),
		ctx:     ctx,
		spawned: make(chan spawnOutcome),
		procs:   map[*lifecycle.Instance]*instance{},
		gone:    make(chan struct{}),
	}
	defer close(l.gone)
	if from != nil {
		r.out.restore(from.st.Output)
		if !from.st.LastRequest.IsZero() {
			r.lastRequest.Store(from.st.LastRequest.UnixNano())
		}
		// Its env_files read now, as a reload would: a secret rotated
		// while no daemon watched must reach the model.
		envChanged := false
		if is := from.st.Instance; from.inst != nil && is != nil && len(cfg.EnvFiles) > 0 {
			envChanged, _ = envFilesChanged(cfg.EnvFiles, is.EnvDigest)
		}
		if from.inst != nil {
			r.loadKey(cfg)
		}
		l.handleEffects(l.m.Restore(from.st, l.track(from.inst), cfg.SpawnDigest(), envChanged))
		l.handleEffects(l.m.LearnIfUnknown())
	} else {
		l.handleEffects(l.m.Begin())
	}
	close(r.began)
	shutdown := ctx.Done()
loop:
	for !l.m.Done() {
		var exited <-chan struct{}
		if id := l.m.Inst(); id != nil && !l.m.Exited() {
			exited = l.proc(id).done
		}
		select {
		case <-shutdown:
			shutdown = nil
			l.handle(lifecycle.EvShutdown{})
			if l.m.Spawning() {
				// Waited for as its stop would be; past that, its job stops
				// whatever it starts.
				l.spawnGiveUp = r.d.after(l.m.Config().StopTimeout)
			}
		case out := <-l.spawned:
			l.spawnJob, l.spawnSlow, l.spawnGiveUp = nil, nil, nil
			out.ev.Inst = l.track(out.inst)
			l.handle(out.ev)
		case <-l.spawnSlow:
			l.spawnSlow = nil
			l.handle(lifecycle.EvSpawnSlow{What: l.spawnJob.now(), After: spawnWait})
		case <-l.spawnGiveUp:
			r.log.Error("shutting down with its spawn still in flight: the process it starts, if it ever returns, is stopped by its job",
				zap.String("doing", l.spawnJob.now()), zap.Duration("waited", l.m.Config().StopTimeout))
			break loop
		case <-r.mail.signal:
			msgs, p := r.mail.take()
			if p != nil {
				l.handle(lifecycle.EvPlaced{Placement: *p})
			}
			for _, msg := range msgs {
				if msg.freeze != nil {
					l.freeze(*msg.freeze)
					continue
				}
				l.handle(msg.ev)
				if msg.done != nil {
					var err error
					if _, ok := msg.ev.(lifecycle.EvOp); ok {
						err = l.m.OpErr()
					}
					msg.done <- err
				}
			}
		case <-exited:
			id := l.m.Inst()
			l.handle(lifecycle.EvExited{Inst: id, Exit: id.Exit})
		case ev := <-l.results:
			l.handle(ev)
		case <-r.serving:
			if id := l.m.Inst(); id != nil {
				l.handle(lifecycle.EvServing{Inst: id})
			}
		case <-l.timers[lifecycle.Tick]:
			l.timers[lifecycle.Tick] = nil
			l.handle(lifecycle.EvTimer{Timer: lifecycle.Tick})
		case <-l.timers[lifecycle.Deadline]:
			l.timers[lifecycle.Deadline] = nil
			l.handle(lifecycle.EvTimer{Timer: lifecycle.Deadline})
		case <-l.timers[lifecycle.Idle]:
			l.timers[lifecycle.Idle] = nil
			l.handle(lifecycle.EvIdle{Last: l.r.lastRequestTime(), InFlight: l.r.inFlight()})
		case <-l.timers[lifecycle.Settle]:
			l.timers[lifecycle.Settle] = nil
			l.handle(lifecycle.EvTimer{Timer: lifecycle.Settle})
		}
	}
	// Operations that arrive now find the runner gone (send sees stopped).
	msgs, _ := r.mail.take()
	for _, msg := range msgs {
		if msg.done != nil {
			msg.done <- fmt.Errorf("model %s is shutting down", r.name)
		}
	}
}

// handle steps the machine through ev and every event its effects produce
// at once (checks, spawns), then publishes the result.
func (l *loop) handle(ev lifecycle.Event) {
	was := l.m.State()
	queue := []lifecycle.Event{ev}
	for len(queue) > 0 {
		ev, queue = queue[0], queue[1:]
		for _, ef := range l.m.Step(ev) {
			if next := l.do(ef); next != nil {
				queue = append(queue, next)
			}
		}
	}
	l.settle(was)
}

// handleEffects carries out effects not caused by an event (the first step).
func (l *loop) handleEffects(efs []lifecycle.Effect) {
	was := l.m.State()
	for _, ef := range efs {
		if next := l.do(ef); next != nil {
			l.handle(next)
		}
	}
	l.settle(was)
}

// settle keeps a failed model's last output and publishes the status.
func (l *loop) settle(was State) {
	if l.m.State() == Failed && was != Failed {
		l.m.KeepOutput(l.r.out.last(OutputLines))
		l.r.log.Error("model failed", zap.String("reason", l.m.Reason()), zap.Strings("last_output", l.r.out.last(20)))
	}
	st := l.m.Status()
	l.seq++
	st.Seq = l.seq
	l.r.status.Store(st)
	l.r.d.changed()
	for _, f := range l.later {
		f()
	}
	l.later = nil
}

// do carries out one effect; an outcome known at once is returned as the
// next event.
func (l *loop) do(ef lifecycle.Effect) lifecycle.Event {
	r, m := l.r, l.m
	cfg := m.Config()
	switch ef := ef.(type) {
	case lifecycle.EfCheck:
		_, cause, reason := checkStart(cfg)
		return lifecycle.EvChecked{Cause: cause, Reason: reason}
	case lifecycle.EfWant:
		r.d.sched.Want(cfg, ef.Seq, ef.Held)
	case lifecycle.EfDrop:
		r.d.sched.Drop(r.name)
	case lifecycle.EfWithdraw:
		r.d.sched.Withdraw(r.name)
	case lifecycle.EfSpawn:
		l.startSpawn(ef.GPUs)
	case lifecycle.EfReady:
		r.d.sched.Ready(r.name, ef.At)
		// A successor after a crash must know it was ready: one that no
		// longer answers is then failing, not loading.
		l.record()
	case lifecycle.EfProbe:
		inst := l.proc(m.Inst())
		inst.tree.Refresh()
		r.publishPIDs(inst.tree)
		r.own.Add(1)
		job := probeJob{
			inst: inst, health: probeURL(cfg), base: baseURL(cfg), served: cfg.ServedName,
			timeout: cfg.Probe.Timeout, deepPeriod: cfg.Probe.DeepPeriod, deepTimeout: cfg.Probe.DeepTimeout,
			live: ef.Live, key: r.key(),
		}
		if m.AskVersion() {
			job.versionKey = versionKey(cfg, r.d.environ)
		}
		go l.probe(job)
	case lifecycle.EfLearn:
		go l.learn(cfg, ef.Seq)
	case lifecycle.EfObserve:
		r.d.metrics.observe(r.name, ef.Took, ef.Err)
	case lifecycle.EfStop:
		r.marker.Store(nil) // its processes are nobody's now: strays once orphaned
		// Its GPUs' memory changes from now on: no start or wake there
		// until it is released.
		r.d.sched.Changing(r.name)
		inst, grace, mainAlive, base := l.proc(ef.Inst), cfg.StopTimeout, ef.MainAlive, baseURL(cfg)
		stop := func(seq uint64) {
			go func() {
				if ef.Drain {
					// The drain and the SIGTERM grace share stop_timeout.
					start := r.d.now()
					l.drain(base, drainBudget(grace), seq)
					grace = max(grace-r.d.now().Sub(start), 0)
				}
				err := r.stopInstance(inst, grace, mainAlive)
				// Short of descriptors (a flood on the listeners) or memory,
				// the daemon could not see the tree go or kill it: its own
				// trouble, not the model's. It tries again, for a while.
				for wait, tried := 100*time.Millisecond, time.Duration(0); daemonShort(err) && tried < stopRetryFor; wait = min(2*wait, 5*time.Second) {
					r.log.Warn("stop not complete: the daemon is short of resources; trying again", zap.Error(err), zap.Duration("in", wait))
					<-r.d.after(wait)
					tried += wait
					err = r.stopInstance(inst, 0, false)
				}
				l.results <- lifecycle.EvStopped{Inst: &inst.Instance, Err: err, Waiting: r.waiting()}
			}()
		}
		if ef.Drain {
			// After the stopping state is published: the drain names it.
			l.later = append(l.later, func() { stop(l.seq) })
		} else {
			stop(0)
		}
	case lifecycle.EfRelease:
		// Its GPUs stay busy until its processes have left them.
		inst := l.proc(ef.Inst)
		delete(l.procs, ef.Inst)
		r.d.sched.Release(r.name, inst.tree.SeenPIDs(), ef.Keep)
		r.d.forgetInstance(inst.marker)
		r.pids.Store(nil)
		r.cg.Store(nil)
	case lifecycle.EfSleep:
		// Its GPUs' memory changes from now on (granted quiet GPUs, or
		// going ahead after waiting startup_timeout for them): no start or
		// wake there until it has slept, or stays awake.
		r.d.sched.Changing(r.name)
		base, grace, key := baseURL(cfg), cfg.StopTimeout, r.key()
		ask := m.HasIsSleeping()
		// The machine chooses the level (sleep_host_memory may deepen it,
		// from what the other models hold) and keeps it and when the sleep
		// began: every record from here on (this one, a reload's) says the
		// sleep began, at the level it will be (the engine says it is
		// awake until /sleep returns), so the model is never taken for
		// awake, and is woken the way it slept. A drain that does not
		// complete rewrites it.
		host := lifecycle.HostMemory{Budget: r.d.sleepBudget(), OthersHeld: r.d.level1Held(r.name)}
		level := m.SleepBegins(ef.Level, host, r.d.now())
		l.record()
		// After the sleeping state is published: the drain names it.
		l.later = append(l.later, func() { go l.sleep(base, key, level, ask, grace, l.seq) })
	case lifecycle.EfRecord:
		l.record()
	case lifecycle.EfSlept:
		if ef.Level > 0 {
			r.d.sched.Slept(r.name)
			l.record()
		}
		r.d.metrics.slept(r.name, ef.Level, ef.Cause)
	case lifecycle.EfWake:
		go l.wake(l.proc(m.Inst()), cfg, r.key(), ef.Level, m.HasIsSleeping(), ef.Timeout, ef.Known)
	case lifecycle.EfCanary:
		r.own.Add(1)
		go l.recordCanary(l.proc(m.Inst()), cfg, r.key())
	case lifecycle.EfQuiet:
		r.d.sched.Quiet(r.name, ef.Seq)
	case lifecycle.EfUnquiet:
		r.d.sched.Unquiet(r.name)
	case lifecycle.EfWakeFailed:
		r.d.metrics.wakeFailed(r.name, ef.Why)
	case lifecycle.EfRedigest:
		// Only policy keys changed: the process is what the new
		// configuration would start, as far as it can see (its sleep mode
		// is kept apart), so a successor keeps it.
		l.proc(m.Inst()).digest = cfg.SpawnDigest()
		l.record()
	case lifecycle.EfWoke:
		l.record()
		r.d.metrics.woke(r.name, ef.Level, ef.Took)
	case lifecycle.EfDecline:
		r.d.sched.Declined(r.name)
	case lifecycle.EfArm:
		l.timers[ef.Timer] = r.d.after(ef.After)
		l.timerAt[ef.Timer] = r.d.now().Add(ef.After)
	case lifecycle.EfAdopt:
		r.d.sched.Adopt(cfg, m.Inst().GPUs, ef.Phase, ef.AwakeAt, ef.Changing)
	case lifecycle.EfSettled:
		r.d.sched.Slept(r.name)
	case lifecycle.EfAskSleeping:
		go l.askSleeping(l.proc(m.Inst()), cfg, r.key())
	case lifecycle.EfDisarm:
		l.timers[ef.Timer] = nil
	default:
		panic(fmt.Sprintf("runner: unknown effect %T", ef))
	}
	return nil
}

// record rewrites the live instance's record: a successor after a crash
// must know whether it was ready, and whether it sleeps.
func (l *loop) record() {
	if is := l.recordState(); is != nil {
		l.r.writeRecord(*is)
	}
}

// writeRecord writes is as the instance's record.
func (r *runner) writeRecord(is liverestore.InstanceState) {
	if err := r.d.records.write(is); err != nil {
		r.log.Warn("cannot write the instance record: a daemon restarted after a crash would stop this model instead of adopting it", zap.Error(err))
	}
}

// recordState is the live instance's record as of now; nil when none runs.
func (l *loop) recordState() *liverestore.InstanceState {
	st := l.m.Snapshot()
	if st.Instance == nil || l.m.Inst() == nil {
		return nil
	}
	l.fillRecord(st.Instance)
	return st.Instance
}

// fillRecord adds to the machine's view of the live instance what the
// runner knows of it: the one builder of the record a successor reads,
// whether an upgrade hands it over (freeze) or a crash leaves it behind
// (record).
func (l *loop) fillRecord(is *liverestore.InstanceState) {
	inst := l.proc(l.m.Inst())
	is.Marker, is.Start, is.Digest = inst.marker, inst.start, inst.digest
	if cg := l.r.cg.Load(); cg != nil {
		is.Cgroup = cg.Path
	}
	is.Adopted = inst.Adopted
}

// checkStart looks at everything a start of m needs, in the order an
// operator would fix them, and returns the secrets of the model's
// env_files it read.
func checkStart(m config.Model) (secrets map[string]string, cause, reason string) {
	// Through slowIO: a mount that does not answer leaves the model
	// pending, saying so, and never holds the runner.
	if err := statPath(m.Path); err != nil {
		var hung *HungError
		if errors.As(err, &hung) {
			return nil, CauseStorage, "storage: " + err.Error()
		}
		return nil, CauseStorage, fmt.Sprintf("storage: %s: %s", m.Path, errText(err))
	}
	secrets, err := loadEnvFiles(m.EnvFiles)
	if err != nil {
		if daemonShort(err) {
			return nil, CauseDaemon, "the daemon is short of resources to check it: " + errText(err) + "; retrying"
		}
		return nil, CauseEnvFiles, err.Error()
	}
	if err := checkPort(m.Host, m.Port); err != nil {
		if daemonShort(err) {
			// Out of descriptors, the test bind says nothing of the port.
			return nil, CauseDaemon, "the daemon is short of resources to check it: " + errText(err) + "; retrying"
		}
		return nil, CausePort, err.Error()
	}
	return secrets, "", ""
}

// probeJob is one check of a model, with copies of everything it needs:
// the machine is the runner goroutine's alone.
type probeJob struct {
	inst                    *instance
	health, base, served    string
	timeout                 time.Duration
	deepPeriod, deepTimeout time.Duration
	live                    bool   // the model was ready: the deep probe may run
	key                     string // the model's API key, "" when none
	// versionKey, when set, asks GET /version too (the version is not
	// confirmed yet), and names the cache entry its answer corrects.
	versionKey string
}

// probe checks, in order: /health answers 2xx; /v1/models lists the
// model's served name (vLLM binds with SO_REUSEPORT, so another server can
// share the port unnoticed); and, when enabled and due, a one-token
// completion (a hung engine still answers /health).
func (l *loop) probe(j probeJob) {
	d := l.r.d
	bg := probe.WithKey(context.Background(), j.key)
	hctx, cancel := context.WithTimeout(bg, j.timeout)
	start := d.now()
	err := d.prober.Probe(hctx, j.health)
	took := d.now().Sub(start)
	if err == nil {
		err = d.prober.Identity(hctx, j.base, j.served)
	}
	var version string
	if err == nil && j.versionKey != "" {
		// Not part of the verdict: a model that answers everything but
		// /version is healthy; it is asked again at the next probe.
		if v, verr := d.prober.Version(hctx, j.base); verr == nil {
			version = v
			if pv, perr := vllm.Parse(v); perr == nil {
				d.versions.set(j.versionKey, pv)
			}
		}
	}
	cancel()
	// One probe is in flight per runner, so this goroutine owns the deep
	// probe's state now.
	j.inst.deep.Period = j.deepPeriod
	if err == nil && j.live && j.inst.deep.Due() {
		dctx, cancel := context.WithTimeout(bg, j.deepTimeout)
		_, err = j.inst.deep.Check(dctx, d.prober, j.base, j.served)
		cancel()
	}
	if probe.Local(err) {
		err = fmt.Errorf("%w: %w", lifecycle.ErrNoVerdict, err)
	}
	l.r.own.Add(-1)
	l.results <- lifecycle.EvProbed{Inst: &j.inst.Instance, Err: err, Took: took, Version: version}
}

// askSleeping asks the engine of inst, adopted after a crash, whether it
// sleeps, within probe.timeout.
func (l *loop) askSleeping(inst *instance, m config.Model, key string) {
	ctx, cancel := context.WithTimeout(probe.WithKey(context.Background(), key), m.Probe.Timeout)
	defer cancel()
	asleep, err := l.r.d.prober.IsSleeping(ctx, baseURL(m))
	l.results <- lifecycle.EvEngineSleeps{Inst: &inst.Instance, Asleep: asleep, Err: err}
}

// stopRetryFor is how long a stop the daemon could not complete for want
// of its own resources (descriptors, memory) is tried again before it is
// reported failed.
const stopRetryFor = time.Minute

// drainBudget is how much of stop_timeout a planned stop's drain may take:
// the rest is left to the SIGTERM grace.
func drainBudget(stopTimeout time.Duration) time.Duration {
	return stopTimeout - lifecycle.SigtermGrace(stopTimeout)
}

// engineGrace is how long a drain waits for an engine that does not say
// how many requests it runs (no vllm:num_requests_running): a request the
// gateway let go of (its client went away) may run until the engine
// notices, at its next write.
const engineGrace = time.Second

// drain waits, within budget, until the model serves nothing: the
// gateway's requests (Drain holds its door for the state seq announced),
// the daemon's own (probes, the canary), and what its engine still runs
// for clients that went away (the gateway counts those finished at once;
// the engine lets go only when it notices). It reports whether it did.
func (l *loop) drain(base string, budget time.Duration, seq uint64) bool {
	d := l.r.d
	ctx, cancel := context.WithTimeout(context.Background(), budget)
	defer cancel()
	if d.traffic != nil {
		if err := d.traffic.Drain(ctx, l.r.name, seq); err != nil {
			return false
		}
	}
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for l.r.own.Load() > 0 {
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
	for {
		n, err := d.prober.Running(ctx, base)
		switch {
		case errors.Is(err, probe.ErrNoRunningGauge):
			t := time.NewTimer(engineGrace)
			defer t.Stop()
			select {
			case <-ctx.Done():
				return false
			case <-t.C:
				return true
			}
		case err != nil:
			// No answer: nothing it runs can be waited for (it may be
			// dead); the stop or the sleep will tell.
			return true
		case n == 0:
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
}

// sleep drains the model's requests in the gateway, then puts it to sleep
// sleep drains the model's requests in the gateway, then puts it to sleep
// at level and checks that it sleeps (where its vLLM answers /is_sleeping:
// askAsleep). A model must never be told to sleep with requests in flight
// (it has crashed TP>1 engines), so a drain that does not finish within
// grace abandons the sleep.
func (l *loop) sleep(base, key string, level int, askAsleep bool, grace time.Duration, seq uint64) {
	d := l.r.d
	if !l.drain(base, grace, seq) {
		l.results <- lifecycle.EvSlept{Aborted: true}
		return
	}
	// What it holds on its GPUs now, read fresh: its wake asks for that
	// much again (with sleep mode vLLM may size its KV cache above its
	// share, vllm#40256).
	held := l.r.heldOnGPUs()
	before := l.r.rss()
	ctx, cancel := context.WithTimeout(probe.WithKey(context.Background(), key), sleepTimeout)
	defer cancel()
	err := d.prober.Sleep(ctx, base, level)
	if err == nil && askAsleep {
		var asleep bool
		if asleep, err = d.prober.IsSleeping(ctx, base); err == nil && !asleep {
			err = errors.New("is_sleeping says it is awake after /sleep")
		}
	}
	var grown uint64
	if err == nil && level == 1 {
		// vLLM keeps the pinned host memory of a level-1 sleep after the
		// wake (vllm#16663; PR #55206 open) and reuses it at the next: the
		// machine counts it from the first until the process ends, not
		// what the latest sleep added (nothing, the second time).
		if after := l.r.rss(); after > before {
			grown = after - before
		}
	}
	// Requests that wait in its queue now came for it while it went to
	// sleep, or before: they want it back.
	l.results <- lifecycle.EvSlept{Err: err, Waiting: l.r.waiting(), Held: held, Grown: grown}
}

// heldOnGPUs reads the GPUs now and returns what the model's processes
// hold on each; nil without readings.
func (r *runner) heldOnGPUs() map[string]uint64 {
	rd, p := r.d.reader, r.pids.Load()
	if rd == nil || p == nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	devs, err := rd.Read(ctx)
	if err != nil {
		return nil
	}
	out := map[string]uint64{}
	for _, d := range devs {
		for _, pr := range d.Processes {
			if slices.Contains(*p, pr.PID) {
				out[d.UUID] += pr.UsedMemory
			}
		}
	}
	return out
}

// rss is the resident memory of the model's processes.
func (r *runner) rss() uint64 {
	var sum uint64
	if p := r.pids.Load(); p != nil {
		for _, pid := range *p {
			if st, err := proc.ReadStat(pid); err == nil && st.State != 'Z' {
				sum += uint64(st.RSSPages) * uint64(os.Getpagesize())
			}
		}
	}
	return sum
}

// wake wakes the model (the level-2 sequence reloads its weights), checks
// that it is awake, resets its prefix cache (after a level-1 wake it may
// be stale: vllm#16234, #17103, fixed in vLLM by PR #22726), then proves
// it with the canary before any client request: the known answer its
// process gave after its start, again (a wake can "succeed" into an engine
// that answers nonsense: vllm#25800, #29341, #54235). A wrong answer gets
// one more chance after another reset; then the wake has failed. Without a
// known answer, any completion will do. All of it within timeout.
func (l *loop) wake(inst *instance, m config.Model, key string, level int, askAsleep bool, timeout time.Duration, known *probe.Answer) {
	d := l.r.d
	base := baseURL(m)
	ctx, cancel := context.WithTimeout(probe.WithKey(context.Background(), key), timeout)
	defer cancel()
	why := "error"
	err := d.prober.WakeUp(ctx, base, level)
	if err == nil && askAsleep {
		var asleep bool
		if asleep, err = d.prober.IsSleeping(ctx, base); err == nil && asleep {
			err = errors.New("is_sleeping says it still sleeps after /wake_up")
		}
	}
	if err == nil {
		err = d.prober.ResetPrefixCache(ctx, base)
	}
	if err == nil {
		cctx, ccancel := context.WithTimeout(ctx, canaryTimeout)
		if known == nil {
			if cerr := d.prober.Complete(cctx, base, m.ServedName); cerr != nil {
				err = fmt.Errorf("canary: %w", cerr)
			}
		} else {
			for try := range 2 {
				got, cerr := d.prober.KnownAnswer(cctx, base, m.ServedName)
				switch {
				case cerr != nil:
					err = fmt.Errorf("canary: %w", cerr)
				case !got.Same(*known):
					why = "canary"
					err = fmt.Errorf("canary answered %s, not %s as after its start", got, *known)
				default:
					err = nil
				}
				if err == nil || try == 1 || d.prober.ResetPrefixCache(cctx, base) != nil {
					break
				}
				l.r.log.Warn("the woken engine gave a wrong canary answer; resetting its prefix cache and asking once more", zap.Error(err))
			}
		}
		ccancel()
	}
	if err != nil && ctx.Err() != nil {
		err = fmt.Errorf("not awake within %s: %w", config.RoundDuration(timeout), err)
	}
	l.results <- lifecycle.EvWoke{Inst: &inst.Instance, Err: err, Why: why}
}

// recordCanary asks the canary's known answer of a process fresh from its
// start, twice: two answers not alike mean the model is not deterministic.
func (l *loop) recordCanary(inst *instance, m config.Model, key string) {
	defer l.r.own.Add(-1)
	ctx, cancel := context.WithTimeout(probe.WithKey(context.Background(), key), canaryTimeout)
	defer cancel()
	base := baseURL(m)
	ev := lifecycle.EvCanary{Inst: &inst.Instance}
	a, err := l.r.d.prober.KnownAnswer(ctx, base, m.ServedName)
	if err == nil {
		var b probe.Answer
		if b, err = l.r.d.prober.KnownAnswer(ctx, base, m.ServedName); err == nil {
			ev.Answer, ev.Differs = a, !a.Same(b)
		}
	}
	ev.Err = err
	l.results <- ev
}

// Bounds of sleep mode's calls. A sleep moves the weights to host memory
// (level 1) or drops them: seconds, at most a minute or so for the largest.
const (
	sleepTimeout  = 2 * time.Minute
	canaryTimeout = 30 * time.Second
)

func (r *runner) lastRequestTime() time.Time {
	if n := r.lastRequest.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

func (r *runner) inFlight() int {
	if r.d.traffic == nil {
		return 0
	}
	return r.d.traffic.InFlight(r.name)
}

// waiting is the number of requests waiting in the gateway's queue for
// the model.
func (r *runner) waiting() int {
	if r.d.traffic == nil {
		return 0
	}
	return r.d.traffic.Waiting(r.name)
}

// publishPIDs makes the instance's processes known for GPU attribution.
func (r *runner) publishPIDs(t processTree) {
	p := t.PIDs()
	r.pids.Store(&p)
}

// baseURL is where the model serves. A model bound to a wildcard address is
// probed on loopback.
func baseURL(m config.Model) string {
	host := m.Host
	switch host {
	case "0.0.0.0", "":
		host = "127.0.0.1"
	case "::", "[::]":
		host = "::1"
	}
	return "http://" + net.JoinHostPort(host, strconv.Itoa(m.Port))
}

// probeURL is the model's health probe.
func probeURL(m config.Model) string { return baseURL(m) + m.Probe.Path }

// errText is an error's message without Go's "open "/"stat " prefixes for
// path errors, which read oddly in a status line.
func errText(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}
