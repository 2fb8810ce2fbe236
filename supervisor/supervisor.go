// Package supervisor owns the model processes: it spawns them, watches them,
// restarts them under backoff and start limits, and stops every process
// each one started.
//
// One goroutine (a runner) owns each model's lifecycle state; the
// Supervisor's Run goroutine owns the set of runners. Everything else sends
// them requests or reads the immutable Status they publish.
package supervisor

import (
	"cmp"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
	"citadel-supervisor/probe"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/exposition"
	"citadel-supervisor/supervisor/lifecycle"
	"citadel-supervisor/supervisor/liverestore"
	"citadel-supervisor/supervisor/proc"
	"citadel-supervisor/supervisor/schedule"
)

// Prober answers whether a model is healthy. The probe package implements it.
type Prober interface {
	// Probe returns nil when target answered healthy before ctx ended.
	Probe(ctx context.Context, target string) error
	// Identity returns nil when base serves the model named served.
	Identity(ctx context.Context, base, served string) error
	// Traffic and Complete serve the deep probe; Complete is also the
	// canary after a wake.
	probe.Client
	// Version asks the running model which vLLM it is (GET /version).
	Version(ctx context.Context, base string) (string, error)
	// Sleep, WakeUp and IsSleeping drive vLLM's sleep mode (docs/on-demand.md).
	Sleep(ctx context.Context, base string, level int) error
	WakeUp(ctx context.Context, base string, level int) error
	IsSleeping(ctx context.Context, base string) (bool, error)
	// KnownAnswer asks the canary (probe/canary.go); ResetPrefixCache
	// drops the engine's prefix cache; Running is the requests its engine
	// still runs (vllm:num_requests_running), probe.ErrNoRunningGauge when
	// it does not say.
	KnownAnswer(ctx context.Context, base, served string) (probe.Answer, error)
	ResetPrefixCache(ctx context.Context, base string) error
	Running(ctx context.Context, base string) (float64, error)
}

// Traffic is what the supervisor needs of the gateway for on-demand
// models. The gateway implements it; without one, no request is ever in
// flight.
type Traffic interface {
	// Drain stops admitting requests to model (they wait in its queue) and
	// returns once none is in flight, or with ctx's error. seq is the Seq
	// of the model's published state that announced the sleep: no older
	// state reopens the door; its next one decides.
	Drain(ctx context.Context, model string, seq uint64) error
	// InFlight is the number of requests model is serving.
	InFlight(model string) int
	// Waiting is the number of requests waiting in model's queue.
	Waiting(model string) int
}

var _ Prober = (*probe.HTTP)(nil)

// OutputFunc receives each line a model writes. The default logs it through
// the model's logger; under journald it goes to the journal with the
// model's own SYSLOG_IDENTIFIER.
type OutputFunc func(log *zap.Logger, model, stream, line string)

// Options are the supervisor's collaborators. Logger and Prober are
// required.
type Options struct {
	Logger *zap.Logger
	Prober Prober
	// GPUs reads the host's GPUs for placement. nil with backend sim reads
	// the declared devices; otherwise nil means no readings (backend none,
	// or NVML absent), and NoGPUs says why: every enabled model then
	// starts, pinned ones with their pins.
	GPUs   gpu.Reader
	NoGPUs string
	// GPUStatus is citadel_gpu_backend_info's status when GPUs is nil:
	// disabled (backend none), no_driver or error.
	GPUStatus string
	// Registerer receives the supervisor's metrics; nil registers none.
	// An exposition.Registry receives the model and probe series as
	// exposition.Families, which its handler writes as text directly.
	Registerer prometheus.Registerer
	// Reaper reaps orphans adopted as subreaper; nil spawns without one.
	Reaper *Reaper
	// Environ is the environment children inherit (before docs/configuration.md's edits).
	Environ []string
	// Output receives model output lines; nil logs them at info level.
	Output OutputFunc
	// Now and After are the clock; nil means the real one.
	Now   func() time.Time
	After func(time.Duration) <-chan time.Time
	// Jitter returns a number in [0,1) for restart-delay jitter.
	Jitter func() float64
	// Heartbeat is how often Run's loop proves it is alive (Alive). It must
	// be well below the systemd watchdog's half interval; 0 means 1s.
	Heartbeat time.Duration
	// Cgroups, when set, holds every model instance in a cgroup v2 leaf of
	// its own (ownership mode "cgroup"); nil tracks them by marker and
	// parent links (mode "marker"). See docs/architecture.md.
	Cgroups *proc.Cgroups
	// KillStrays makes the Reaper SIGKILL the orphans it inherits that no
	// model accounts for. Only for a daemon: the process must start no
	// children of its own but models.
	KillStrays bool
	// Handover is the state the previous image of this process handed
	// over at an upgrade (the models are its children, their output pipes
	// open descriptors); nil at an ordinary start.
	Handover *liverestore.Handover
	// FDStore keeps the models' output pipes past the daemon's death
	// (systemd's descriptor store); nil without one.
	FDStore liverestore.FDStore
}

// SetTraffic connects the gateway, once it is built (it needs the
// supervisor's models first). Call it before Run.
func (s *Supervisor) SetTraffic(t Traffic) { s.d.traffic = t }

// deps is what every runner shares. It is built once and never changes.
type deps struct {
	id      string
	log     *zap.Logger
	sched   *schedule.Scheduler
	prober  Prober
	reaper  *Reaper
	environ []string
	output  OutputFunc
	now     func() time.Time
	after   func(time.Duration) <-chan time.Time
	jitter  func() float64
	metrics *metrics
	changed func() // a model's status changed
	traffic Traffic
	changes changes // closed at each state or configuration change (changes.go)
	// sleepBudget is sleep_host_memory in force; level1Held the host
	// memory level-1 sleepers other than one hold.
	sleepBudget func() uint64
	level1Held  func(except string) uint64
	cgroups     *proc.Cgroups
	records     records             // the live instances' records, for a successor
	fdstore     liverestore.FDStore // nil without systemd's descriptor store
	versions    *versionCache
	visible     string                        // gpu.visible_devices
	gpuIndex    func(uuid string) (int, bool) // the NVML index of a GPU, from the latest readings
	reader      gpu.Reader                    // reads the GPUs; nil without readings
}

// Supervisor runs every configured model.
type Supervisor struct {
	d         *deps
	cfg       atomic.Pointer[config.Config]
	runners   atomic.Pointer[[]*runner] // sorted by name; replaced whole
	applyCh   chan applyReq
	ready     chan struct{}
	heartbeat time.Duration

	boundAt *config.Config // the configuration the listeners were bound with (at start)

	applyMu  sync.Mutex            // a reload and an upgrade's freeze exclude each other
	handover *liverestore.Handover // from the previous image (an upgrade), consumed by Run
	// handedOver holds the markers of the instances the previous image
	// handed over until their runners own them (Run): meanwhile they are
	// this process's children that no runner accounts for.
	handedOver atomic.Pointer[map[string]bool]

	demandMu sync.Mutex      // orders Demand against runners being added
	early    map[string]bool // models demanded before their runner existed

	// leaving holds the runners of models a reload removed, until they
	// end: no longer listed, they still stop through the scheduler, which
	// must reach them (a planned stop waits for its answer on quiet GPUs).
	leavingMu sync.Mutex
	leaving   map[string]*runner

	beat     atomic.Int64 // unix nanoseconds of the main loop's last turn
	reloadOK atomic.Bool  // the last configuration load succeeded
	reloadAt atomic.Int64 // unix seconds of the last successful load
}

type applyReq struct {
	cfg  *config.Config
	done chan applied
}

// applied is the main loop's answer to a reload: the changes made, and the
// removed models' runners, whose stops the caller waits for (the loop does
// not).
type applied struct {
	changes []config.Change
	removed []*runner
}

// New builds a Supervisor for cfg. Its identity, which marks every child it
// spawns, is derived from the control socket path: two supervisors on one
// host must use different sockets, and a restarted one finds its
// predecessor's children by it.
func New(cfg *config.Config, o Options) (*Supervisor, error) {
	if o.Logger == nil || o.Prober == nil {
		return nil, errors.New("supervisor: Logger and Prober are required")
	}
	d := &deps{
		id:      Identity(cfg.ControlSocket),
		log:     o.Logger,
		prober:  o.Prober,
		reaper:  o.Reaper,
		environ: o.Environ,
		output:  o.Output,
		now:     o.Now,
		after:   o.After,
		jitter:  o.Jitter,
		metrics: newMetrics(),
		cgroups: o.Cgroups,
		records: records{liverestore.RecordsFor(cfg.ControlSocket)},
		fdstore: o.FDStore,
		// Read once, like every gpu key: a reload does not change them.
		versions: &versionCache{},
		visible:  cfg.GPU.VisibleDevices,
	}
	// The gateway's queues follow the models' states (changes.go).
	d.changed = d.changes.notify
	if d.output == nil {
		d.output = func(log *zap.Logger, _, _, line string) { log.Info(line) }
	}
	if d.now == nil {
		d.now = time.Now
	}
	if d.after == nil {
		d.after = time.After
	}
	if d.jitter == nil {
		d.jitter = rand.Float64
	}
	s := &Supervisor{d: d, applyCh: make(chan applyReq), ready: make(chan struct{}), heartbeat: cmp.Or(o.Heartbeat, time.Second), early: map[string]bool{}, leaving: map[string]*runner{}, handover: o.Handover}
	if o.GPUs == nil && o.NoGPUs == "" {
		o.NoGPUs = "gpu.backend is " + cfg.GPU.Backend + ": no GPU readings"
	}
	reader, gpuStatus := o.GPUs, "ok"
	if reader == nil && cfg.GPU.Backend == "sim" {
		// The sim backend finds the models' processes on its GPUs itself,
		// as a driver would.
		reader = gpu.NewSim(cfg.GPU, nil)
	} else if reader == nil {
		gpuStatus = cmp.Or(o.GPUStatus, "disabled")
	}
	d.sched = schedule.New(schedule.Options{
		Reader: reader, NoReadings: o.NoGPUs, Headroom: cfg.GPU.Headroom, ReleaseTimeout: cfg.GPU.ReleaseTimeout,
		Now: d.now, Log: d.log, Models: schedule.ModelsFunc(s.observe), Out: schedule.OutboxFunc(s.deliver),
	})
	d.gpuIndex, d.reader = d.sched.IndexOf, reader
	s.reloadOK.Store(true)
	s.reloadAt.Store(d.now().Unix())
	s.beat.Store(d.now().UnixNano())
	if o.Registerer != nil {
		for _, c := range []prometheus.Collector{
			d.metrics.probes, d.metrics.sleeps, d.metrics.wakeDuration, d.metrics.wakeFailures, newModelCollector(s),
			gpu.NewCollector(cfg.GPU.Backend, gpuStatus, reader, s.owners).LogTo(o.Logger.Named("gpu")),
		} {
			register := o.Registerer.Register
			if t, ok := o.Registerer.(textRegisterer); ok {
				if f, ok := c.(exposition.Families); ok {
					// The model and probe series, written as text past
					// the registry.
					register = func(prometheus.Collector) error { return t.RegisterText(f) }
				}
			}
			if err := register(c); err != nil {
				return nil, fmt.Errorf("register metrics: %w", err)
			}
		}
	}
	if h := o.Handover; h != nil {
		// Before the reaper runs: a handed-over model that exited across
		// the exec is a zombie whose status its runner is owed, and one
		// that runs is no stray while the takeover stops what no longer
		// belongs (which takes a stop_timeout).
		for _, pid := range h.Children() {
			o.Reaper.adopt(pid)
		}
		markers := h.Markers()
		s.handedOver.Store(&markers)
	}
	if o.KillStrays && o.Reaper != nil {
		o.Reaper.KillStrays(s.accounts)
	}
	d.sleepBudget = func() uint64 { return uint64(s.cfg.Load().SleepHostMemory) }
	d.level1Held = func(except string) uint64 {
		var sum uint64
		for _, r := range *s.runners.Load() {
			if r.name != except {
				if st := r.status.Load(); st != nil {
					sum += st.SleepHostMemory
				}
			}
		}
		return sum
	}
	s.cfg.Store(cfg)
	s.boundAt = cfg
	empty := []*runner{}
	s.runners.Store(&empty)
	return s, nil
}

// Identity is the marker prefix of a supervisor using socket.
func Identity(socket string) string {
	abs, err := filepath.Abs(socket)
	if err != nil {
		abs = socket
	}
	return fmt.Sprintf("%x", sha256.Sum256([]byte(abs)))[:16]
}

// Run stops what a previous supervisor with the same identity left
// running, starts every model, and serves requests until ctx ends. Then it
// stops every model in parallel, each within its stop_timeout, and returns
// once all their processes are gone.
//
// Its loop owns the set of runners and never waits on one: a reload's
// removed models stop on their own goroutines, and the caller of Apply
// waits for them. So the heartbeat (Alive) means the loop turns.
func (s *Supervisor) Run(ctx context.Context) error {
	cfg := s.cfg.Load()
	unlock, err := liverestore.LockIdentity(cfg.ControlSocket)
	if err != nil {
		return err
	}
	defer unlock()
	s.d.log.Info("process ownership", zap.String("mode", s.Ownership()), zap.String("cgroup", s.cgroupRoot()))
	// What a predecessor left: handed over (an upgrade), adopted (it died
	// with its models running), or stopped (they no longer match).
	// It takes up to the longest stop_timeout when something must be
	// stopped: progress, which the heartbeat (the watchdog) must not take
	// for a stall.
	tookOver := make(chan struct{})
	go func() {
		beat := time.NewTicker(s.heartbeat)
		defer beat.Stop()
		for {
			select {
			case <-tookOver:
				return
			case <-beat.C:
				s.beat.Store(s.d.now().UnixNano())
			}
		}
	}()
	takeOver := s.takeOver(cfg)
	close(tookOver)
	// The scheduler outlives every runner: their last act is to release
	// their GPUs.
	schedCtx, stopSched := context.WithCancel(context.Background())
	go s.d.sched.Run(schedCtx)
	defer func() { stopSched(); <-s.d.sched.Done() }()
	// Runners outlive ctx's cancellation only as long as their stops take.
	g, gctx := errgroup.WithContext(context.WithoutCancel(ctx))
	runCtx, stopAll := context.WithCancel(gctx)
	defer stopAll()

	byName := map[string]*runner{}
	startRunner := func(m config.Model, t *liverestore.Takeover) {
		r := newRunner(m, s.d)
		var from *restored
		if t != nil {
			from = s.adopt(r, t)
		}
		byName[m.Name] = r
		// Listed before it runs: the scheduler's answers find it, and a
		// request that came before it did is handed over.
		s.demandMu.Lock()
		s.publishRunners(byName)
		if s.early[m.Name] {
			delete(s.early, m.Name)
			r.lastRequest.Store(s.d.now().UnixNano())
			r.uses.Add(s.d.now())
			if m.OnDemand() {
				r.mail.put(message{ev: lifecycle.EvDemand{}})
			}
		}
		s.demandMu.Unlock()
		rctx, cancel := context.WithCancel(runCtx)
		g.Go(func() error {
			defer close(r.stopped)
			defer cancel()
			defer s.left(r)
			r.run(rctx, m, from)
			return nil
		})
	}
	// Every model's want is declared before any runner checks: the order in
	// which their checks finish must not decide who gets the GPUs.
	var expect []config.Model
	for _, m := range cfg.Models {
		if takeOver[m.Name] == nil {
			expect = append(expect, m)
		}
	}
	s.d.sched.Expect(expect)
	if len(takeOver) > 0 {
		// Nothing is placed until every runner has told what it took over.
		s.d.sched.Restoring()
	}
	for _, m := range cfg.Models {
		startRunner(m, takeOver[m.Name])
	}
	s.publishRunners(byName)
	s.handedOver.Store(nil) // each runner owns its marker now
	// Ready (the control socket comes up) once every runner has published
	// its first status: after an upgrade or an adoption, status shows the
	// state taken over, never the placeholder a runner starts with. A
	// runner publishes it after its restore's effects, Adopt among them.
	for _, r := range byName {
		<-r.began
	}
	if len(takeOver) > 0 {
		s.d.sched.Restored()
	}
	close(s.ready)
	s.d.log.Info("supervisor running", zap.Int("models", len(cfg.Models)), zap.String("identity", s.d.id))

	beat := time.NewTicker(s.heartbeat)
	defer beat.Stop()
	for {
		select {
		case <-beat.C:
			s.beat.Store(s.d.now().UnixNano())
		case <-ctx.Done():
			s.d.log.Info("stopping every model")
			stopAll()
			err := g.Wait()
			s.d.reaper.sweepStrays()
			if s.d.cgroups != nil {
				if cerr := s.d.cgroups.Close(); cerr != nil {
					s.d.log.Warn("remove the models' cgroup root", zap.Error(cerr))
				}
			}
			return err
		case req := <-s.applyCh:
			s.beat.Store(s.d.now().UnixNano())
			changes := s.envChanges(config.Diff(s.cfg.Load(), req.cfg), req.cfg, byName)
			var added []config.Model
			for _, c := range changes {
				if c.Kind == config.Added {
					m, _ := req.cfg.Model(c.Name)
					added = append(added, m)
				}
			}
			s.d.sched.Expect(added)
			var removed []*runner
			for _, c := range changes {
				m, _ := req.cfg.Model(c.Name)
				switch c.Kind {
				case config.Added:
					startRunner(m, nil)
				case config.Removed:
					r := byName[c.Name]
					delete(byName, c.Name)
					// It stops as an operator's stop does (once its GPUs
					// are quiet); its claim holds its GPUs until its
					// processes are gone: nothing is placed there before.
					s.leavingMu.Lock()
					s.leaving[c.Name] = r
					s.leavingMu.Unlock()
					r.mail.put(message{ev: lifecycle.EvRemoved{}})
					removed = append(removed, r)
					s.d.metrics.forget(c.Name)
				case config.Respawn, config.Update:
					byName[c.Name].mail.put(message{ev: lifecycle.EvConfig{Config: m, Kind: c.Kind}})
				}
			}
			s.cfg.Store(req.cfg)
			s.publishRunners(byName)
			s.d.changed()
			req.done <- applied{changes: changes, removed: removed}
		}
	}
}

// envChanges turns an unchanged (or policy-only) model into a respawn when
// the contents of its env_files differ from what its process was started
// with: a rotated HF_TOKEN must reach the model. A file that cannot be read
// now changes nothing here; the model's next start will say why.
func (s *Supervisor) envChanges(changes []config.Change, cfg *config.Config, byName map[string]*runner) []config.Change {
	for i, c := range changes {
		if c.Kind != config.Unchanged && c.Kind != config.Update {
			continue
		}
		m, _ := cfg.Model(c.Name)
		r := byName[c.Name]
		if len(m.EnvFiles) == 0 || r == nil {
			continue
		}
		st := r.status.Load()
		if st == nil || st.EnvDigest == "" {
			continue
		}
		changed, err := envFilesChanged(m.EnvFiles, st.EnvDigest)
		if err != nil {
			s.d.log.Warn("reload: cannot read env file; the model keeps its current environment", zap.String("model", c.Name), zap.Error(err))
			continue
		}
		if changed {
			changes[i].Kind = config.Respawn
			changes[i].Fields = append(changes[i].Fields, "env_files contents")
		}
	}
	return changes
}

// Alive reports whether Run's loop turned within maxAge: /healthz and the
// systemd watchdog ask it, so a wedged loop is seen from outside.
func (s *Supervisor) Alive(maxAge time.Duration) bool {
	return s.d.now().Sub(time.Unix(0, s.beat.Load())) <= maxAge
}

// Ready is closed once Run has started every runner.
func (s *Supervisor) Ready() <-chan struct{} { return s.ready }

// Config returns the configuration in force.
func (s *Supervisor) Config() *config.Config { return s.cfg.Load() }

// Apply swaps in a new, validated configuration: added models start,
// removed ones stop, changed ones restart, the rest are untouched. It
// returns the changes made, after removed models have stopped (or ctx
// ended: they go on stopping).
func (s *Supervisor) Apply(ctx context.Context, cfg *config.Config) ([]config.Change, error) {
	s.applyMu.Lock()
	// A model added back while an earlier reload's removal of it still
	// stops would have two runners under one name, and the scheduler
	// knows models by name: the old one's release would take the new
	// one's want or claim. Only a runner's end shrinks leaving, and only
	// the loop, within an apply (this lock), adds to it.
	if back := s.addedBack(cfg); len(back) > 0 {
		s.applyMu.Unlock()
		return nil, fmt.Errorf("not now: %s (removed by a reload) still stopping; reload again once stopped", strings.Join(back, ", "))
	}
	req := applyReq{cfg: cfg, done: make(chan applied, 1)}
	select {
	case s.applyCh <- req:
	case <-ctx.Done():
		s.applyMu.Unlock()
		return nil, ctx.Err()
	}
	a := <-req.done // the loop answers every request it took
	s.applyMu.Unlock()
	for _, r := range a.removed {
		select {
		case <-r.stopped:
		case <-ctx.Done():
			return a.changes, fmt.Errorf("removed model %s still stopping: %w", r.name, ctx.Err())
		}
	}
	return a.changes, nil
}

// heldPorts refuses a configuration that gives a model a port the daemon
// itself still listens on: listen and gateway.listen bind once, at start,
// so after a reload that moves them the old ports stay the daemon's until
// it restarts, and a model there could never bind.
func (s *Supervisor) heldPorts(cfg *config.Config) error {
	var errs []error
	for what, addr := range map[string]string{"listen": s.boundAt.Listen, "gateway.listen": s.boundAt.Gateway.Listen} {
		_, p, err := net.SplitHostPort(addr)
		if addr == "" || err != nil {
			continue
		}
		port, _ := strconv.Atoi(p)
		for _, m := range cfg.Models {
			if m.Port == port {
				errs = append(errs, fmt.Errorf("models.%s.port: %d is still the daemon's own %s (%s) until it restarts: choose another port, or restart the daemon (systemctl restart citadel-supervisor) before giving it to a model", m.Name, port, what, addr))
			}
		}
	}
	return errors.Join(errs...)
}

// ReloadFile loads the configuration at path and applies it, as SIGHUP and
// `citadelctl reload` do. An invalid file changes nothing: every problem is
// logged, and returned.
func (s *Supervisor) ReloadFile(ctx context.Context, path string, environ []string) ([]config.Change, error) {
	cfg, err := config.Load(path, environ)
	if err != nil {
		s.reloadOK.Store(false)
		for _, line := range strings.Split(err.Error(), "\n") {
			s.d.log.Error("reload rejected: configuration invalid; keeping the running one", zap.String("problem", line))
		}
		return nil, fmt.Errorf("%s is invalid; nothing changed:\n%w", path, err)
	}
	if err := s.heldPorts(cfg); err != nil {
		s.reloadOK.Store(false)
		s.d.log.Error("reload rejected; keeping the running configuration", zap.Error(err))
		return nil, fmt.Errorf("%s cannot apply; nothing changed:\n%w", path, err)
	}
	if keys := config.RestartOnly(s.cfg.Load(), cfg); len(keys) > 0 {
		s.d.log.Warn("reload: these settings take effect only when the daemon restarts (systemctl restart citadel-supervisor); models were reloaded", zap.Strings("keys", keys))
	}
	changes, err := s.Apply(ctx, cfg)
	if err != nil {
		s.d.log.Error("reload", zap.Error(err))
		return nil, err
	}
	s.reloadOK.Store(true)
	s.reloadAt.Store(s.d.now().Unix())
	for _, c := range changes {
		if c.Kind != config.Unchanged {
			s.d.log.Info("reload", zap.String("model", c.Name), zap.String("change", c.Kind.String()), zap.Strings("fields", c.Fields))
		}
	}
	return changes, nil
}

// owners maps every known process of every model to the model: the
// listed ones, and those a reload removed that are still stopping (their
// claims hold their GPUs until their processes are gone).
func (s *Supervisor) owners() map[int]string {
	out := map[int]string{}
	for _, r := range s.withLeaving() {
		if p := r.pids.Load(); p != nil {
			for _, pid := range *p {
				out[pid] = r.name
			}
		}
	}
	return out
}

// deliver hands the scheduler's answer to the model's runner: a placement
// replaces any earlier one in its mailbox; a quiet answer and an eviction
// are events. A model a reload removed gets them until its runner ends:
// its stop waits for quiet GPUs, and it declines an eviction at once, so
// the scheduler looks again.
func (s *Supervisor) deliver(name string, a schedule.Answer) {
	r := s.reachable(name)
	if r == nil {
		return
	}
	switch a := a.(type) {
	case schedule.Placement:
		r.mail.place(a)
	case schedule.QuietAnswer:
		r.mail.put(message{ev: lifecycle.EvQuiet{Seq: a.Seq, OK: a.OK, Reason: a.Reason}})
	case schedule.Eviction:
		r.mail.put(message{ev: lifecycle.EvEvict{ForModel: a.For}})
	}
}

// observe is what the scheduler reads of the models at each decision, from
// what the runners and the gateway publish: every model's processes, and
// the usage of each claimed model on demand (schedule.Usage). When it
// became ready is the scheduler's own (Ready): a status is published
// later. The gateway's per-request records (last request, uses) are
// atomics and a lock of the model's own, read here: nothing is sent per
// request.
func (s *Supervisor) observe(claimed []string) schedule.Observation {
	out := schedule.Observation{PIDs: s.owners(), Usage: map[string]schedule.Usage{}}
	cfg := s.cfg.Load()
	for _, name := range claimed {
		r := s.runner(name)
		m, ok := cfg.Model(name)
		if r == nil || !ok || !m.OnDemand() {
			continue
		}
		u := schedule.Usage{MinAwake: m.MinAwake, LastRequest: r.lastRequestTime(), Waiting: r.waiting()}
		if st := r.status.Load(); st != nil {
			// What putting it to sleep (or stopping it) would cost its
			// clients when they come back, as its runner measured it.
			u.Cost = gpu.Cost{Wake: st.TypicalWake, Start: st.TypicalStartup, Level: st.WakeLevel, Uses: r.uses.Load()}
		}
		out.Usage[name] = u
	}
	return out
}

// Demand says a request wants model (the gateway calls it for every
// request): it records the request, and starts or wakes an on-demand model
// that is not awake.
func (s *Supervisor) Demand(name string) {
	s.demandMu.Lock()
	r := s.runner(name)
	if r == nil {
		// The gateway serves before Run has started the runners (or while
		// a reload adds the model): the runner takes it when it starts.
		s.early[name] = true
		s.demandMu.Unlock()
		return
	}
	s.demandMu.Unlock()
	r.lastRequest.Store(s.d.now().UnixNano())
	r.uses.Add(s.d.now())
	// The configuration, not the status: a runner that has not published
	// yet must still get the request (its machine ignores it if awake).
	if m, ok := s.cfg.Load().Model(name); ok && m.OnDemand() && r.status.Load().State != Ready {
		r.mail.put(message{ev: lifecycle.EvDemand{}})
	}
}

// Unwanted says no request waits for the model any more (the gateway's
// queue emptied before it was ready): an on-demand model's start or wake
// that has not begun is abandoned (machine.onUnwanted).
func (s *Supervisor) Unwanted(name string) {
	if m, ok := s.cfg.Load().Model(name); !ok || !m.OnDemand() {
		return
	}
	s.demandMu.Lock()
	r := s.runner(name)
	if r == nil {
		delete(s.early, name) // its runner need not start it after all
	}
	s.demandMu.Unlock()
	if r != nil {
		r.mail.put(message{ev: lifecycle.EvUnwanted{}})
	}
}

func (s *Supervisor) runner(name string) *runner {
	for _, r := range *s.runners.Load() {
		if r.name == name {
			return r
		}
	}
	return nil
}

// reachable is the model's runner for the scheduler's answers: the listed
// one, else one a reload removed that is still stopping.
func (s *Supervisor) reachable(name string) *runner {
	if r := s.runner(name); r != nil {
		return r
	}
	s.leavingMu.Lock()
	defer s.leavingMu.Unlock()
	return s.leaving[name]
}

// addedBack names the models cfg adds that an earlier reload removed and
// whose runners have not ended.
func (s *Supervisor) addedBack(cfg *config.Config) []string {
	cur := s.cfg.Load()
	var out []string
	for _, name := range s.stillLeaving() {
		if _, listed := cur.Model(name); listed {
			continue
		}
		if _, ok := cfg.Model(name); ok {
			out = append(out, name)
		}
	}
	return out
}

// withLeaving is every runner: the listed ones, then those a reload
// removed that have not ended.
func (s *Supervisor) withLeaving() []*runner {
	out := *s.runners.Load()
	s.leavingMu.Lock()
	defer s.leavingMu.Unlock()
	if len(s.leaving) == 0 {
		return out
	}
	out = slices.Clone(out)
	for _, name := range slices.Sorted(maps.Keys(s.leaving)) {
		out = append(out, s.leaving[name])
	}
	return out
}

// stillLeaving names the removed models whose runners have not ended.
func (s *Supervisor) stillLeaving() []string {
	s.leavingMu.Lock()
	defer s.leavingMu.Unlock()
	return slices.Sorted(maps.Keys(s.leaving))
}

// left forgets a removed model's runner once it has ended, and its
// series again: it was probed until its stop began (while it waited for
// quiet GPUs), after the reload forgot them. Before leaving shrinks: a
// reload cannot add the model back meanwhile.
func (s *Supervisor) left(r *runner) {
	s.leavingMu.Lock()
	defer s.leavingMu.Unlock()
	if s.leaving[r.name] == r {
		s.d.metrics.forget(r.name)
		delete(s.leaving, r.name)
	}
}

// GPUs lists the host's GPUs with the models placed on each.
func (s *Supervisor) GPUs(ctx context.Context) ([]api.GPU, error) {
	views, err := s.d.sched.Views(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.GPU, 0, len(views))
	for _, v := range views {
		out = append(out, wireGPU(v))
	}
	return out, nil
}

// wireGPU copies the scheduler's view of a GPU into the control wire's
// type; TestWireGPU keeps their JSON the same.
func wireGPU(v schedule.GPUView) api.GPU {
	g := api.GPU{
		Index: v.Index, UUID: v.UUID, Name: v.Name, PCIBusID: v.PCIBusID,
		MemoryTotal: v.MemoryTotal, MemoryUsed: v.MemoryUsed, MemoryFree: v.MemoryFree,
		Utilization: v.Utilization, Temperature: v.Temperature, PowerWatts: v.PowerWatts,
		Up: v.Up, Err: v.Err,
		Models: v.Models, Claimed: v.Claimed, Busy: v.Busy, Note: v.Note,
	}
	if v.Processes != nil {
		g.Processes = make([]api.GPUProcess, len(v.Processes))
		for i, p := range v.Processes {
			g.Processes[i] = api.GPUProcess{PID: p.PID, UsedMemory: p.UsedMemory}
		}
	}
	return g
}

func (s *Supervisor) publishRunners(byName map[string]*runner) {
	list := make([]*runner, 0, len(byName))
	for _, name := range sortedKeys(byName) {
		list = append(list, byName[name])
	}
	s.runners.Store(&list)
}

// Status returns a snapshot of every model, sorted by name; with names,
// only those (an unknown name is an error).
func (s *Supervisor) Status(names ...string) ([]Status, error) {
	rs, err := s.lookup(names)
	if err != nil {
		return nil, err
	}
	out := make([]Status, 0, len(rs))
	for _, r := range rs {
		if st := r.status.Load(); st != nil {
			c := *st
			// The gateway's last request for it, as of now: it changes
			// with every request, not at transitions.
			c.LastRequest = r.lastRequestTime()
			out = append(out, c)
		}
	}
	return out, nil
}

// ErrUnknownModel is returned for a model name not in the configuration.
var ErrUnknownModel = api.ErrUnknownModel

func (s *Supervisor) lookup(names []string) ([]*runner, error) {
	all := *s.runners.Load()
	if len(names) == 0 || (len(names) == 1 && names[0] == "all") {
		return all, nil
	}
	var out []*runner
	for _, n := range names {
		found := false
		for _, r := range all {
			if r.name == n {
				out = append(out, r)
				found = true
				break
			}
		}
		if !found {
			if len(n) > 80 { // the client's input, quoted bounded
				n = strings.ToValidUTF8(n[:80], "") + "…"
			}
			return nil, fmt.Errorf("%w %q", ErrUnknownModel, n)
		}
	}
	return out, nil
}

// Do sends op to the named models ("all" for every one) and returns one
// error per model (nil once the model has taken it).
func (s *Supervisor) Do(ctx context.Context, op api.Op, names ...string) (map[string]error, error) {
	if !slices.Contains(api.Ops, op) {
		return nil, fmt.Errorf("unknown operation %q", op)
	}
	rs, err := s.lookup(names)
	if err != nil {
		return nil, err
	}
	var mu sync.Mutex
	out := make(map[string]error, len(rs))
	var wg sync.WaitGroup
	for _, r := range rs {
		wg.Go(func() {
			err := r.send(ctx, lifecycle.EvOp{Op: op, By: api.ActorOf(ctx)})
			mu.Lock()
			out[r.name] = err
			mu.Unlock()
		})
	}
	wg.Wait()
	return out, nil
}

// Output returns up to n of a model's newest output lines.
func (s *Supervisor) Output(name string, n int) ([]string, error) {
	if name == "all" {
		return nil, fmt.Errorf("%w: logs take one model, not all", ErrUnknownModel)
	}
	rs, err := s.lookup([]string{name})
	if err != nil {
		return nil, err
	}
	return rs[0].out.last(n), nil
}

// Follow streams a model's new output lines until cancel is called.
func (s *Supervisor) Follow(name string) (<-chan string, func(), error) {
	if name == "all" {
		return nil, nil, fmt.Errorf("%w: logs take one model, not all", ErrUnknownModel)
	}
	rs, err := s.lookup([]string{name})
	if err != nil {
		return nil, nil, err
	}
	ch, cancel := rs[0].out.subscribe(256)
	return ch, cancel, nil
}
