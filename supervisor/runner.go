package supervisor

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/probe"
)

// recheckInterval is how often a pending model re-checks what it waits for.
const recheckInterval = 2 * time.Second

// maxStartupPoll bounds the probe interval while a model is starting, so a
// model is seen ready within a second of answering even with a 10 s period.
const maxStartupPoll = time.Second

// runner owns one model's lifecycle. Its run goroutine is the only writer of
// the model's state; everything else sends it a request or reads the
// published Status.
type runner struct {
	name   string
	d      *deps
	log    *zap.Logger
	reqs   chan request
	out    *ring
	status atomic.Pointer[Status]

	cancel  context.CancelFunc    // ends run: the model is removed or the daemon stops
	stopped chan struct{}         // closed when run has returned
	wake    chan struct{}         // the allocator's nudge: GPUs changed, try again
	pids    atomic.Pointer[[]int] // the current instance's processes, for GPU attribution
	// envDigest fingerprints the env_files contents the current process
	// was started with.
	envDigest atomic.Pointer[string]
}

// request is an operator's or a reload's instruction to a runner.
type request struct {
	op   string // start, stop, restart, reset, update
	cfg  config.Model
	kind config.ChangeKind
	done chan error
}

// instance is one spawned process tree of a model.
type instance struct {
	pid     int
	tree    *tree
	started time.Time
	gpus    []string
	deep    *probe.Deep   // the deep probe's schedule, owned by the probe in flight
	done    chan struct{} // closed once the main process is reaped
	exit    exitInfo      // valid after done is closed
}

// probeResult is tagged with the instance it probed: a result that arrives
// after a restart belongs to the old process and must not count for the new.
type probeResult struct {
	inst *instance
	err  error
	took time.Duration
}

type exitInfo struct {
	code int // the exit code, or 128+signal
	desc string
}

func newRunner(m config.Model, d *deps) *runner {
	name := m.Name
	r := &runner{
		name:    name,
		d:       d,
		log:     d.log.With(zap.String("model", name)),
		reqs:    make(chan request),
		out:     newRing(OutputLines),
		stopped: make(chan struct{}),
		wake:    make(chan struct{}, 1),
	}
	// Readable before the goroutine runs: Status never misses a model.
	r.status.Store(&Status{Name: name, State: Pending, Reason: "supervisor starting", Port: m.Port, Enabled: m.Enabled, Since: d.now()})
	return r
}

// loop is the state of one runner's goroutine. Nothing else touches it.
type loop struct {
	r        *runner
	cfg      config.Model
	state    State
	reason   string
	since    time.Time
	hold     bool // an operator (or enabled: false) wants it stopped
	inst     *instance
	exitSeen bool // inst.done already handled
	tracker  restartTracker
	restarts map[string]int
	lastExit *exitInfo
	readyAt  time.Time
	startup  time.Duration
	lastOut  []string

	tick     <-chan time.Time // the next check, probe, backoff end or retry
	deadline <-chan time.Time // startup_timeout of the current start

	probing    bool
	probeRes   chan probeResult
	probeFails int
	probeOK    *bool  // the last probe's result, nil before the first
	cause      string // why it is pending (Cause*)

	stopDone  chan error
	afterStop func() // what follows the stop in flight
	replaced  bool   // the stop in flight is for new settings: give up the GPU claim
}

// run drives the model until ctx ends, then stops its processes and returns.
func (r *runner) run(ctx context.Context, cfg config.Model) {
	l := &loop{r: r, cfg: cfg, restarts: map[string]int{}, probeRes: make(chan probeResult, 1), stopDone: make(chan error, 1)}
	if cfg.Enabled {
		l.enterPending("checking storage, port and GPUs")
	} else {
		l.hold = true
		l.enter(Stopped, "enabled: false")
	}
	for {
		var exited <-chan struct{}
		if l.inst != nil && !l.exitSeen {
			exited = l.inst.done
		}
		select {
		case <-ctx.Done():
			l.shutdown()
			return
		case req := <-r.reqs:
			req.done <- l.handle(req)
		case <-exited:
			l.onExit()
		case <-l.tick:
			l.tick = nil
			l.onTick(ctx)
		case <-r.wake:
			if l.state == Pending && !l.hold {
				l.tick = l.r.d.after(0)
			}
		case <-l.deadline:
			l.deadline = nil
			if l.state == Starting {
				l.restart(ReasonStartup, fmt.Sprintf("no healthy answer within startup_timeout %s", l.cfg.Probe.StartupTimeout))
			}
		case res := <-l.probeRes:
			l.probing = false
			if res.inst == l.inst && !l.exitSeen {
				l.onProbe(res)
			}
		case err := <-l.stopDone:
			l.onStopped(err)
		}
		l.publish()
	}
}

func (l *loop) enter(s State, reason string) {
	if s != l.state || reason != l.reason {
		l.r.log.Info("state", zap.String("state", string(s)), zap.String("reason", reason))
	}
	if s != l.state {
		l.since = l.r.d.now()
	}
	l.state, l.reason = s, reason
	if s == Failed || s == Stopped {
		// Not restarting soon: its GPUs go to whoever waits.
		l.r.d.alloc.Drop(l.cfg.Name)
	}
	l.publish()
}

func (l *loop) enterPending(reason string) {
	l.cause = CauseChecking
	l.enter(Pending, reason)
	l.tick = l.r.d.after(0)
}

// onTick acts on the timer according to the state.
func (l *loop) onTick(ctx context.Context) {
	switch l.state {
	case Pending:
		l.tryStart()
	case Backoff:
		l.enterPending("restarting after backoff")
	case Failed:
		l.tracker.reset()
		l.r.log.Info("retrying failed model", zap.Duration("retry_failed_after", l.cfg.Restart.RetryFailedAfter))
		l.enterPending("retrying after failure")
	case Starting, Ready, Unhealthy:
		l.inst.tree.refresh()
		l.r.publishPIDs(l.inst.tree)
		if l.state != Starting {
			// Liveness runs on a fixed period from each probe's start, so a
			// hang is seen within period × failure_threshold + timeout; a
			// probe still in flight makes the tick pass (no pile-up).
			l.tick = l.r.d.after(l.cfg.Probe.Period)
		}
		if !l.probing {
			l.probing = true
			// The probe goroutine gets copies: l is the runner's alone.
			go l.probe(ctx, probeJob{
				inst: l.inst, health: probeURL(l.cfg), base: baseURL(l.cfg), served: l.cfg.ServedName,
				timeout: l.cfg.Probe.Timeout, deepPeriod: l.cfg.Probe.DeepPeriod, deepTimeout: l.cfg.Probe.DeepTimeout,
				live: l.state != Starting,
			})
		}
	}
}

// tryStart checks everything a start needs, in the order an operator would
// fix them, and spawns the model or says what it waits for.
func (l *loop) tryStart() {
	m := l.cfg
	wait := func(cause, reason string) {
		l.cause = cause
		l.enter(Pending, reason)
		l.tick = l.r.d.after(recheckInterval)
	}
	if _, err := os.Stat(m.Path); err != nil {
		wait(CauseStorage, fmt.Sprintf("storage: %s: %s", m.Path, errText(err)))
		return
	}
	secrets, err := readEnvFiles(m.EnvFiles)
	if err != nil {
		wait(CauseEnvFiles, err.Error())
		return
	}
	if err := checkPort(m.Host, m.Port); err != nil {
		wait(CausePort, err.Error())
		return
	}
	gpus, err := l.r.d.alloc.Place(context.Background(), m)
	if err != nil {
		wait(CauseGPU, err.Error())
		return
	}
	inst, err := l.r.spawn(m, secrets, gpus)
	if err == nil {
		// A digest, not the values: a reload compares it with the files'
		// contents then, to restart a model whose secret was rotated.
		digest := envDigest(secrets)
		l.r.envDigest.Store(&digest)
	}
	if err != nil {
		l.r.d.alloc.Released(m.Name, nil, false)
		// The program is missing or not executable: retrying in seconds
		// would only burn the start limit. Fail now and say why.
		l.fail(fmt.Sprintf("spawn: %s", errText(err)))
		return
	}
	l.inst, l.exitSeen, l.probeOK = inst, false, nil
	l.r.d.alloc.Started(m.Name, inst.pid)
	l.r.publishPIDs(inst.tree)
	l.tracker.started(inst.started)
	l.probeFails = 0
	l.readyAt, l.startup = time.Time{}, 0
	l.enter(Starting, "loading")
	l.deadline = l.r.d.after(m.Probe.StartupTimeout)
	l.tick = l.r.d.after(min(m.Probe.Period, maxStartupPoll))
}

// probeJob is one check of a model, with copies of everything it needs:
// the loop's state is the runner goroutine's alone.
type probeJob struct {
	inst                    *instance
	health, base, served    string
	timeout                 time.Duration
	deepPeriod, deepTimeout time.Duration
	live                    bool // the model was ready: the deep probe may run
}

// probe checks, in order: /health answers 2xx; /v1/models lists the
// model's served name (vLLM binds with SO_REUSEPORT, so another server can
// share the port unnoticed); and, when enabled and due, a one-token
// completion (a hung engine still answers /health).
func (l *loop) probe(ctx context.Context, j probeJob) {
	hctx, cancel := context.WithTimeout(ctx, j.timeout)
	start := l.r.d.now()
	err := l.r.d.prober.Probe(hctx, j.health)
	took := l.r.d.now().Sub(start)
	if err == nil {
		err = l.r.d.prober.Identity(hctx, j.base, j.served)
	}
	cancel()
	// One probe is in flight per runner, so this goroutine owns the deep
	// probe's state now.
	j.inst.deep.Period = j.deepPeriod
	if err == nil && j.live && j.inst.deep.Due() {
		dctx, cancel := context.WithTimeout(ctx, j.deepTimeout)
		_, err = j.inst.deep.Check(dctx, l.r.d.prober, j.base, j.served)
		cancel()
	}
	l.probeRes <- probeResult{inst: j.inst, err: err, took: took}
}

func (l *loop) onProbe(res probeResult) {
	err := res.err
	ok := err == nil
	l.probeOK = &ok
	period := l.cfg.Probe.Period
	switch l.state {
	case Starting:
		if err != nil {
			// Refused (not bound yet) or slow: still loading. Say so only
			// when it is something else, such as a foreign server.
			reason := "loading"
			if _, foreign := err.(*probe.IdentityError); foreign {
				reason = "loading; " + err.Error()
			}
			l.enter(Starting, reason)
			l.tick = l.r.d.after(min(period, maxStartupPoll))
			return
		}
		l.readyAt = l.r.d.now()
		l.startup = l.readyAt.Sub(l.inst.started)
		l.deadline = nil
		l.r.d.alloc.Ready(l.cfg.Name)
		l.enter(Ready, "")
		l.tick = l.r.d.after(period)
	case Ready, Unhealthy:
		l.r.d.metrics.observe(l.cfg.Name, res.took, err)
		switch {
		case err == nil:
			l.probeFails = 0
			l.enter(Ready, "")
		case probe.Fatal(err):
			// vLLM answers /health with 5xx once its engine died; it does
			// not recover, so waiting for the threshold only adds downtime.
			l.restart(ReasonProbe, "engine dead: /health answered "+err.Error())
			return
		default:
			l.probeFails++
			reason := fmt.Sprintf("probe failed %d/%d: %s", l.probeFails, l.cfg.Probe.FailureThreshold, errText(err))
			if l.probeFails >= l.cfg.Probe.FailureThreshold {
				l.restart(ReasonProbe, reason)
				return
			}
			l.enter(Unhealthy, reason)
		}
	}
}

// onExit handles the main process exiting on its own.
func (l *loop) onExit() {
	l.exitSeen = true
	ex := l.inst.exit
	l.lastExit = &ex
	if l.state == Stopping {
		return // expected: the stop in flight sees it too
	}
	l.r.log.Warn("model exited", zap.Int("pid", l.inst.pid), zap.String("exit", ex.desc))
	l.beginStop(false, fmt.Sprintf("exited (%s); stopping what is left of it", ex.desc), func() {
		l.afterFailure(ReasonExit, "exited ("+ex.desc+")")
	})
}

// restart stops a live model for a failure (probe, startup) and restarts it
// under the backoff and start-limit rules.
func (l *loop) restart(why, reason string) {
	l.r.log.Warn("restarting model", zap.String("reason", why), zap.String("detail", reason))
	l.beginStop(true, reason, func() { l.afterFailure(why, reason) })
}

// beginStop hands the instance to a stop goroutine; then runs when it is
// gone.
func (l *loop) beginStop(mainAlive bool, reason string, then func()) {
	inst := l.inst
	l.afterStop = then
	l.tick, l.deadline = nil, nil
	l.enter(Stopping, reason)
	grace := l.cfg.StopTimeout
	go func() {
		err := inst.tree.stop(context.Background(), grace, mainAlive && !inst.exited())
		<-inst.done // the main process is dead by now; wait for its reaping
		l.stopDone <- err
	}()
}

// exited reports whether the main process has been reaped. Stop goroutines
// use it instead of loop state, which only the runner goroutine may read.
func (i *instance) exited() bool {
	select {
	case <-i.done:
		return true
	default:
		return false
	}
}

func (l *loop) onStopped(err error) {
	if !l.exitSeen && l.inst != nil {
		ex := l.inst.exit
		l.lastExit = &ex
	}
	// Its GPUs stay busy until its processes have left them; the claim is
	// kept for a restart with the same settings.
	l.r.d.alloc.Released(l.cfg.Name, l.inst.tree.seenPIDs(), !l.replaced)
	l.replaced = false
	l.r.pids.Store(nil)
	l.inst, l.exitSeen = nil, false
	if err != nil {
		l.r.log.Error("stop incomplete", zap.Error(err))
		l.fail("stop: " + err.Error())
		return
	}
	then := l.afterStop
	l.afterStop = nil
	if then != nil {
		then()
	}
}

// afterFailure decides between backoff and failed after a failed run.
func (l *loop) afterFailure(why, reason string) {
	l.restarts[why]++
	var readyFor time.Duration
	if !l.readyAt.IsZero() {
		readyFor = l.r.d.now().Sub(l.readyAt)
	}
	delay, failed := l.tracker.afterFailure(l.cfg.Restart, l.r.d.now(), readyFor, l.r.d.jitter())
	if l.hold {
		l.enter(Stopped, "held stopped by operator")
		return
	}
	if failed {
		l.fail(fmt.Sprintf("start limit: %d starts within %s; last: %s", l.cfg.Restart.Burst, l.cfg.Restart.Interval, reason))
		return
	}
	l.enter(Backoff, fmt.Sprintf("%s; restarting in %s", reason, delay.Round(time.Millisecond)))
	l.tick = l.r.d.after(delay)
}

// fail enters failed, keeping the last output for the operator.
func (l *loop) fail(reason string) {
	l.lastOut = l.r.out.last(OutputLines)
	l.enter(Failed, reason)
	l.r.log.Error("model failed", zap.String("reason", reason), zap.Strings("last_output", l.r.out.last(20)))
	if d := l.cfg.Restart.RetryFailedAfter; d > 0 {
		l.tick = l.r.d.after(d)
	}
}

// handle applies an operator's or a reload's request.
func (l *loop) handle(req request) error {
	switch req.op {
	case "start":
		l.hold = false
		switch l.state {
		case Stopped, Failed, Backoff:
			l.tracker.reset()
			l.enterPending("started by operator")
		case Stopping:
			l.afterStop = func() { l.enterPending("started by operator") }
		}
	case "stop":
		l.hold = true
		l.stopHeld("held stopped by operator")
	case "restart":
		l.hold = false
		l.tracker.reset()
		l.restarts[ReasonManual]++
		l.respawn("restarted by operator")
	case "reset":
		l.hold = false
		l.tracker.reset()
		switch l.state {
		case Failed, Backoff, Stopped:
			l.enterPending("reset by operator")
		}
	case "update":
		old := l.cfg
		l.cfg = req.cfg
		switch {
		case !req.cfg.Enabled:
			l.hold = true
			l.stopHeld("enabled: false")
		case req.kind == config.Respawn:
			l.hold = false
			if old.Enabled {
				l.restarts[ReasonReload]++
			}
			l.tracker.reset()
			// New settings may need other GPUs: place it afresh.
			l.replaced = l.inst != nil
			if l.inst == nil {
				l.r.d.alloc.Drop(l.cfg.Name)
			}
			l.respawn("configuration changed")
		}
	default:
		return fmt.Errorf("unknown operation %q", req.op)
	}
	return nil
}

// stopHeld stops the model and holds it stopped.
func (l *loop) stopHeld(reason string) {
	switch l.state {
	case Starting, Ready, Unhealthy:
		l.beginStop(true, "stopping: "+reason, func() { l.enter(Stopped, reason) })
	case Stopping:
		l.afterStop = func() { l.enter(Stopped, reason) }
	default:
		l.tick = nil
		l.enter(Stopped, reason)
	}
}

// respawn gracefully stops a live model and starts it again at once.
func (l *loop) respawn(reason string) {
	switch l.state {
	case Starting, Ready, Unhealthy:
		l.beginStop(true, "stopping: "+reason, func() { l.enterPending(reason) })
	case Stopping:
		l.afterStop = func() { l.enterPending(reason) }
	default:
		l.enterPending(reason)
	}
}

// shutdown stops the model's processes when the daemon exits.
func (l *loop) shutdown() {
	if l.inst == nil {
		l.enter(Stopped, "supervisor shutting down")
		return
	}
	if l.state != Stopping {
		l.enter(Stopping, "supervisor shutting down")
		inst, grace := l.inst, l.cfg.StopTimeout
		go func() {
			err := inst.tree.stop(context.Background(), grace, !inst.exited())
			<-inst.done
			l.stopDone <- err
		}()
	}
	if err := <-l.stopDone; err != nil {
		l.r.log.Error("stop incomplete at shutdown", zap.Error(err))
	}
	l.r.d.alloc.Released(l.cfg.Name, l.inst.tree.seenPIDs(), false)
	l.r.pids.Store(nil)
	l.inst = nil
	l.enter(Stopped, "supervisor shut down")
}

// publishPIDs makes the instance's processes known for GPU attribution.
func (r *runner) publishPIDs(t *tree) {
	p := t.pids()
	r.pids.Store(&p)
}

func (l *loop) publish() {
	s := &Status{
		Name:             l.cfg.Name,
		State:            l.state,
		Reason:           l.reason,
		Port:             l.cfg.Port,
		Since:            l.since,
		Enabled:          l.cfg.Enabled,
		ReadyAt:          l.readyAt,
		StartupDuration:  l.startup,
		StartupSeconds:   l.startup.Seconds(),
		RestartsByReason: maps.Clone(l.restarts),
	}
	for _, n := range l.restarts {
		s.Restarts += n
	}
	if l.inst != nil {
		s.PID, s.StartedAt, s.GPUs = l.inst.pid, l.inst.started, l.inst.gpus
	}
	if l.lastExit != nil {
		code := l.lastExit.code
		s.LastExitCode, s.LastExit = &code, l.lastExit.desc
	}
	if l.state == Failed {
		s.LastOutput = l.lastOut
	}
	if l.state == Pending {
		s.PendingCause = l.cause
	}
	if l.inst != nil && l.probeOK != nil {
		ok := *l.probeOK
		s.ProbeSuccess = &ok
	}
	l.r.status.Store(s)
	l.r.d.changes.notify() // the gateway's queues follow the state (changes.go)
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
