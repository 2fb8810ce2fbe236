package lifecycle

import (
	"cmp"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
	"citadel-supervisor/probe"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/schedule"
	"citadel-supervisor/vllm"
)

// Machine is one model's lifecycle: the states of docs/architecture.md, driven by typed
// events, returning typed effects. It does no I/O and reads no clock of its
// own: its runner carries out the effects (spawning, stopping, probing,
// timers, GPU claims) and feeds their outcomes back as events, so the whole
// lifecycle is tested step by step without processes or sleeps
// (machine_test.go).
//
// The transitions, state × event (anything not listed changes nothing):
//
//	pending   checked ok         → want GPUs (reason: what the scheduler says)
//	pending   checked failed     → pending with the cause; recheck after recheckInterval
//	pending   placed             → spawn
//	pending   spawned            → starting (startup deadline armed)
//	spawning  stop, restart, reload, shutdown → applied once the spawn returns (spawning.go):
//	                               the process it started is stopped first, never lost
//	pending   spawn failed       → failed (the program is missing: retrying burns the limit)
//	pending   tick               → check again
//	starting  tick               → probe (not live: loading is not failure)
//	starting  serving            → probe at once, then poll fast (the child said it serves)
//	starting  probe ok           → ready (GPU start serialisation lifted)
//	starting  startup deadline   → stopping, then backoff (reason startup)
//	ready     tick               → probe (live; the period is fixed from each probe's start)
//	ready     probe failed       → unhealthy; after failure_threshold, or a 5xx: stopping (reason probe)
//	unhealthy probe ok           → ready
//	live      exited             → stopping what is left, then backoff (reason exit)
//	stopping  stopped            → stopped (held), pending (start, restart, reload),
//	                               backoff or failed (after a failure), or stopped (shutdown)
//	backoff   tick               → pending
//	failed    tick               → pending (retry_failed_after)
//	any       op stop            → stopping → stopped (held until start, reset, restart or a reload that changes it)
//	any       op start, reset    → pending (from stopped, failed, backoff)
//	any       op restart         → stopping → pending (GPUs kept)
//	any       config respawn     → stopping → pending (GPUs kept if it asks for the same)
//	any       shutdown           → stopping → stopped
//
// A failure is counted (citadel_model_restarts_total) when it is seen, not
// when the stop it causes completes, so an operator's start during that
// stop cannot lose it.
type Machine struct {
	cfg    config.Model
	now    func() time.Time
	jitter func() float64
	log    *zap.Logger

	state  State
	reason string
	since  time.Time
	cause  string // why it is pending (Cause*)

	hold       bool   // an operator (or enabled: false) wants it stopped
	holdReason string // what stopped says while held
	shutdown   bool   // the daemon is stopping: stop, then stay stopped
	removed    bool   // a reload removed it: stop, then its runner ends

	inst *Instance // the spawned process tree, nil when none
	// asking: the instance adopted after a crash whose engine is being
	// asked whether it sleeps (EfAskSleeping); askReady: its record says
	// it was ready.
	asking   *Instance
	askReady bool
	exited   bool // inst's main process has exited
	lastExit *Exit
	readyAt  time.Time
	startup  time.Duration
	// servingAt: the current process said it serves (EvServing); it is
	// probed fast from then until it answers.
	servingAt time.Time
	// loads are recent spawn-to-ready durations: while a start nears the
	// typical one, it is probed fast (startupPoll).
	loads []time.Duration

	// flight is the operation in flight with the outside world whose
	// outcome it waits for: a want (wantSeq numbers wants, so the answer to
	// one withdrawn since is ignored), a spawn, a sleep or a wake.
	flight  flight
	wantSeq int
	// spawnNote says what the spawn in flight hangs on (EvSpawnSlow).
	spawnNote string

	probing    bool
	probeFails int
	probeOK    *bool

	tracker  restartTracker
	restarts map[string]int
	lastOut  []string

	// after is what follows the stop in flight (or the planned stop that
	// waits for quiet GPUs), decided by the events that led to it; hold and
	// shutdown override it.
	after afterStop

	// On-demand models (docs/on-demand.md).
	awakeAt    time.Time // when it last became ready (started or woke)
	sleepBegan time.Time // when the runner began the sleep in flight (SleepBegins)
	// hostHeld is the pinned host memory the process holds for its level-1
	// sleeps (its weights), measured as its resident memory grown across
	// its first: vLLM keeps it after the wake (vllm#16663) and reuses it,
	// so it counts from then until the process ends.
	hostHeld uint64
	// envDigest fingerprints the env_files contents its last process was
	// started with (kept after it ends, as a reload compares against it).
	envDigest  string
	settling   bool      // taken over mid-sleep or mid-wake: its GPUs count as changing until the settle timer
	sleepCause string    // idle, evicted, manual
	sleepLevel int       // the level it sleeps at
	sleepNote  string    // why the sleep in flight goes deeper than asked (sleep_host_memory)
	wakeAfter  bool      // a request came during the sleep in flight: wake once asleep
	wakeStart  time.Time // when the wake in flight began (its demand)
	wakeBegan  time.Time // when its engine was told to wake (the memory granted)
	// wakeTimes are the engine's recent wakes (wake_up to canary), by the
	// level it slept at: wake_timeout 0 derives the bound of the next one
	// from them.
	wakeTimes map[int][]time.Duration
	// demanded: the start or wake in progress (or the wake to follow a
	// sleep in flight) was asked for by a request, not an operator, so it
	// is abandoned if every request waiting for it leaves (EvUnwanted).
	demanded bool

	// Recent durations, for the gateway's estimate of how long a start or
	// wake will take, as a request waits for it: startups from the start
	// asked (pending) to ready, wakes from the wake asked to awake, by
	// sleep level.
	startups   []time.Duration
	wakes      map[int][]time.Duration
	startBegan time.Time // when the start in progress was asked for
	// known is the canary's answer recorded after the current process
	// started (nil: none; knownNote says why), which every wake must give
	// again.
	known     *probe.Answer
	knownNote string
	// wakeFailures counts the failed wakes since the daemon started.
	wakeFailures int
	// held is what the process held on each GPU (by UUID) before it last
	// slept, as the GPUs were read: its wake asks for that much again.
	held map[string]uint64

	// A planned sleep or stop waits until its GPUs are quiet: no other
	// model starting or waking there (vLLM aborts a start whose GPU memory
	// changes while it profiles, vllm#56830). quiet is what waits, quietSeq
	// numbers the requests to the scheduler.
	quiet    quietWait
	quietSeq int

	// opErr is the answer to the last operation: set by onOp, read by the
	// runner for the operator.
	opErr error

	// The model's vLLM (vllm.go; the runner's lookup is supervisor/versions.go): learned before the first spawn,
	// confirmed by GET /version. learning: a lookup is in flight; learnSeq
	// numbers lookups, so one for a command since changed is ignored.
	vllm      VLLM
	learning  bool
	learnSeq  int
	levelNote string // why it sleeps at a lower level than sleep_level
	// lastOp is the last operation that changed what the model should do.
	lastOp *api.OpRecord
}

// failure is a run that ended badly: why (a restart reason) and the detail.
type failure struct{ why, reason string }

// flight is the one operation in flight with the outside world whose
// outcome the machine waits for; the states say which can be: a want while
// pending or waking, a spawn while pending, a sleep while sleeping, a wake
// while waking.
type flight int

const (
	flightNone  flight = iota
	flightWant         // a want with the scheduler: EvPlaced for wantSeq (pending; waking, waiting for its memory)
	flightSpawn        // a spawn: EvSpawned
	flightSleep        // a sleep (draining, then /sleep): EvSlept
	flightWake         // its engine is woken (wake_up, then the canary): EvWoke
)

// afterStop is what follows a stop: a start again (the default, or with a
// reason), idle (an on-demand model stopped to give its GPUs back:
// sleep_level 0, an eviction, a failed sleep), or a failure to back off
// from. A start replaces either other; idle replaces a failure.
type afterStop struct {
	kind    afterKind
	reason  string  // afterStart: the start's; afterIdle: what stopped says
	failure failure // afterFailure
}

type afterKind int

const (
	afterRestart afterKind = iota // nothing decided: start again ("restarting")
	afterFailure                  // back off, or fail at the start limit
	afterIdle                     // stopped until a request asks for it
	afterStart                    // start again at once, with its reason
)

// Event is something that happened to a model.
type Event interface{ isEvent() }

type (
	// EvChecked: the pre-start checks ran; cause is "" when they passed.
	EvChecked struct{ Cause, Reason string }
	// EvPlaced: the scheduler answered a want.
	EvPlaced struct{ Placement schedule.Placement }
	// EvSpawned: the process was started (inst), or not: err is a
	// permanent spawn failure; cause a check that failed just before.
	EvSpawned struct {
		Inst          *Instance
		Err           error
		Cause, Reason string
		EnvDigest     string // of the env_files contents the process was given
	}
	// EvExited: inst's main process exited and was reaped.
	EvExited struct {
		Inst *Instance
		Exit Exit
	}
	// EvProbed: a probe of inst finished; version is what its GET
	// /version said, when asked and answered.
	EvProbed struct {
		Inst    *Instance
		Err     error
		Took    time.Duration
		Version string
	}
	// EvTimer: a timer the machine armed fired.
	EvTimer struct{ Timer Timer }
	// EvOp: an operator's operation; by says who (supervisor/op.go's Actor).
	EvOp struct {
		Op Op
		By string
	}
	// EvConfig: a reload changed the model.
	EvConfig struct {
		Config config.Model
		Kind   config.ChangeKind
	}
	// EvStopped: the stop of inst finished; err names survivors. waiting
	// is the requests waiting in its queue then.
	EvStopped struct {
		Inst    *Instance
		Err     error
		Waiting int
	}
	// EvShutdown: the daemon is stopping.
	EvShutdown struct{}
	// EvRemoved: a reload removed the model: it stops as a planned stop
	// does (once its GPUs are quiet), then its runner ends.
	EvRemoved struct{}
	// EvDemand: a request wants the model (the gateway): start or wake an
	// on-demand model that is not awake.
	EvDemand struct{}
	// EvUnwanted: every request that waited for the model left before it
	// was ready: a start or wake they asked for that has not begun is
	// abandoned, so it makes no room for nobody.
	EvUnwanted struct{}
	// EvEvict: the scheduler puts it to sleep to make room for another.
	EvEvict struct{ ForModel string }
	// EvIdle: the idle timer fired, with the model's traffic: its last
	// request and the requests in flight now.
	EvIdle struct {
		Last     time.Time
		InFlight int
	}
	// EvSlept: the sleep in flight finished; aborted when the drain did
	// not complete (requests still in flight), err when the engine failed.
	EvSlept struct {
		Err     error
		Aborted bool
		Waiting int               // requests waiting in its queue once asleep: they want it back
		Held    map[string]uint64 // what it held on each GPU just before /sleep
		Grown   uint64            // at level 1: its processes' resident memory grown across the sleep
	}
	// EvWoke: the wake of inst in flight (wake_up and a one-token canary)
	// finished.
	EvWoke struct {
		Inst *Instance
		Err  error
		Why  string // what failed: canary, error (timeout and probe are the machine's own)
	}
	// EvQuiet: the scheduler's answer to a quiet request: its GPUs are
	// quiet (ok), or what it waits for.
	EvQuiet struct {
		Seq    int
		OK     bool
		Reason string
	}
	// EvCanary: the canary's known answer of inst was asked twice after its
	// start: answer, or differs (two answers not alike), or err.
	EvCanary struct {
		Inst    *Instance
		Answer  probe.Answer
		Differs bool
		Err     error
	}
	// EvServing: the process's output said it serves or is about to
	// (vLLM's "Starting vLLM API server …", uvicorn's "Application
	// startup complete."; the runner watches its output, supervisor/serving.go): probe it now, not at the next poll.
	EvServing struct{ Inst *Instance }
	// EvLearned: the lookup of the model's vLLM version finished.
	EvLearned struct {
		Seq     int
		Version vllm.Version
		Err     error
	}
)

func (EvChecked) isEvent()  {}
func (EvPlaced) isEvent()   {}
func (EvSpawned) isEvent()  {}
func (EvExited) isEvent()   {}
func (EvProbed) isEvent()   {}
func (EvTimer) isEvent()    {}
func (EvOp) isEvent()       {}
func (EvConfig) isEvent()   {}
func (EvStopped) isEvent()  {}
func (EvShutdown) isEvent() {}
func (EvRemoved) isEvent()  {}
func (EvDemand) isEvent()   {}
func (EvUnwanted) isEvent() {}
func (EvEvict) isEvent()    {}
func (EvIdle) isEvent()     {}
func (EvSlept) isEvent()    {}
func (EvWoke) isEvent()     {}
func (EvLearned) isEvent()  {}
func (EvCanary) isEvent()   {}
func (EvQuiet) isEvent()    {}
func (EvServing) isEvent()  {}

// Timer names the machine's timers; arming one replaces it.
type Timer int

const (
	// Tick: the next check, probe, backoff end or failed retry.
	Tick Timer = iota
	// Deadline: startup_timeout of the current start.
	Deadline
	// Idle: an awake on-demand model checks whether it has been idle for
	// idle_after (the runner turns it into EvIdle).
	Idle
	// Settle: a model taken over while its /sleep or wake_up ran has had
	// time to finish it; its GPUs are no longer changing (EfSettled).
	Settle
	// NumTimers counts the timers (a runner keeps one of each).
	NumTimers
)

// Effect is something the runner must do.
type Effect interface{ isEffect() }

type (
	EfCheck struct{} // run the pre-start checks → EvChecked
	EfWant  struct { // ask the scheduler for GPUs → EvPlaced
		Seq  int
		Held map[string]uint64 // a wake: what it held on each GPU before it slept
	}
	EfDrop    struct{}                // withdraw the want, give up the claim
	EfSpawn   struct{ GPUs []string } // check again and spawn → EvSpawned
	EfReady   struct{ At time.Time }  // tell the scheduler the start is done, and when it became ready
	EfProbe   struct{ Live bool }     // probe inst → EvProbed
	EfLearn   struct{ Seq int }       // learn the model's vLLM version → EvLearned
	EfObserve struct {                // record a liveness probe's metrics
		Took time.Duration
		Err  error
	}
	EfStop struct { // stop inst's tree → EvStopped
		Inst      *Instance
		MainAlive bool
		Drain     bool // a planned stop of a serving model: drain it first
	}
	EfRelease struct { // the tree is gone: release its GPUs
		Inst *Instance
		Keep bool
	}
	EfArm struct {
		Timer Timer
		After time.Duration
	}
	EfDisarm struct{ Timer Timer }
	// EfSleep: drain the model's requests, then put it to sleep → EvSlept.
	EfSleep struct {
		Level int
		Cause string
	}
	// EfSlept: it sleeps: tell the scheduler (its memory comes back) and
	// count it.
	EfSlept struct {
		Level int
		Cause string
	}
	// EfWake: wake it and run the canary, within timeout → EvWoke. known
	// is the answer the canary must give (nil: any answer will do).
	EfWake struct {
		Level   int
		Timeout time.Duration
		Known   *probe.Answer
	}
	// EfCanary: ask the canary's known answer, twice → EvCanary.
	EfCanary struct{}
	// EfQuiet: ask the scheduler for quiet GPUs → EvQuiet; EfUnquiet:
	// withdraw the request (or end the change it granted).
	EfQuiet   struct{ Seq int }
	EfUnquiet struct{}
	// EfWakeFailed: count a failed wake, by what failed.
	EfWakeFailed struct{ Why string }
	// EfRecord: rewrite the instance's record (a sleep that did not happen).
	EfRecord struct{}
	// EfRedigest: a reload changed only what the process does not see:
	// it counts as started under the new configuration (its record says
	// so, for a successor).
	EfRedigest struct{}
	// EfWoke: it is awake: record the wake's duration.
	EfWoke struct {
		Level int
		Took  time.Duration
	}
	// EfDecline: it cannot be put to sleep for another model now.
	EfDecline struct{}
	// EfWithdraw: withdraw a sleeper's want to wake; it keeps its claim.
	EfWithdraw struct{}
)

func (EfCheck) isEffect()      {}
func (EfWant) isEffect()       {}
func (EfDrop) isEffect()       {}
func (EfSpawn) isEffect()      {}
func (EfReady) isEffect()      {}
func (EfProbe) isEffect()      {}
func (EfLearn) isEffect()      {}
func (EfObserve) isEffect()    {}
func (EfStop) isEffect()       {}
func (EfRelease) isEffect()    {}
func (EfArm) isEffect()        {}
func (EfDisarm) isEffect()     {}
func (EfSleep) isEffect()      {}
func (EfSlept) isEffect()      {}
func (EfWake) isEffect()       {}
func (EfRedigest) isEffect()   {}
func (EfRecord) isEffect()     {}
func (EfCanary) isEffect()     {}
func (EfQuiet) isEffect()      {}
func (EfUnquiet) isEffect()    {}
func (EfWakeFailed) isEffect() {}
func (EfWoke) isEffect()       {}
func (EfDecline) isEffect()    {}
func (EfWithdraw) isEffect()   {}

// New is the machine of the model cfg, on the clock now, with jitter
// spreading its restart delays (a value in [0,1)), logging to log. Begin
// or Restore is its first step.
func New(cfg config.Model, now func() time.Time, jitter func() float64, log *zap.Logger) *Machine {
	return &Machine{cfg: cfg, now: now, jitter: jitter, log: log, restarts: map[string]int{}, since: now()}
}

// Begin is the first step: a model starts pending (checking), or held
// stopped when disabled.
func (m *Machine) Begin() []Effect {
	if !m.cfg.Enabled {
		m.hold, m.holdReason = true, "enabled: false"
		m.enter(Stopped, m.holdReason)
		return nil
	}
	if m.cfg.OnDemand() {
		m.enter(Stopped, onDemandIdle)
		return nil
	}
	return m.toPending("checking storage, port and GPUs")
}

// onDemandIdle is what an on-demand model that is not running says.
const onDemandIdle = "on demand: starts at its first request"

// Done reports whether the machine has finished: shut down, nothing left
// running.
func (m *Machine) Done() bool {
	return (m.shutdown || m.removed) && m.inst == nil && m.flight != flightSpawn
}

// What the runner reads of the machine between steps.

// State is the model's state.
func (m *Machine) State() State { return m.state }

// Reason is what its state says.
func (m *Machine) Reason() string { return m.reason }

// Config is the model's configuration in force.
func (m *Machine) Config() config.Model { return m.cfg }

// Inst is the instance it runs, nil when none.
func (m *Machine) Inst() *Instance { return m.inst }

// Exited reports whether the main process of its instance has exited.
func (m *Machine) Exited() bool { return m.exited }

// Spawning reports whether a spawn is in flight (EfSpawn, not yet
// answered by EvSpawned).
func (m *Machine) Spawning() bool { return m.flight == flightSpawn }

// OpErr is the answer to the last operation (EvOp), for the operator.
func (m *Machine) OpErr() error { return m.opErr }

// VLLM is what it knows of its model's vLLM.
func (m *Machine) VLLM() VLLM { return m.vllm }

// KeepOutput keeps the process's last output lines, which a failed model
// shows (the runner holds the output; it calls this as the model fails).
func (m *Machine) KeepOutput(lines []string) { m.lastOut = lines }

// Step applies one event and returns what the runner must do.
func (m *Machine) Step(ev Event) []Effect {
	switch ev := ev.(type) {
	case EvChecked:
		return m.onChecked(ev)
	case EvPlaced:
		return m.onPlaced(ev.Placement)
	case EvSpawned:
		return m.onSpawned(ev)
	case EvExited:
		return m.onExited(ev)
	case EvProbed:
		return m.onProbed(ev)
	case EvTimer:
		return m.onTimer(ev.Timer)
	case EvOp:
		m.lastOp = &api.OpRecord{Op: string(ev.Op), By: ev.By, At: m.now()}
		return m.onOp(ev.Op)
	case EvConfig:
		if ev.Kind == config.Respawn || ev.Config.Enabled != m.cfg.Enabled {
			m.lastOp = &api.OpRecord{Op: "reload", At: m.now()}
		}
		return m.onConfig(ev)
	case EvStopped:
		return m.onStopped(ev)
	case EvRemoved:
		return m.onRemoved()
	case EvShutdown:
		return m.onShutdown()
	case EvDemand:
		state, wakeAfter := m.state, m.wakeAfter
		out := m.onDemand("started on demand")
		if m.state != state || m.wakeAfter != wakeAfter {
			m.demanded = true
		}
		return out
	case EvUnwanted:
		return m.onUnwanted()
	case EvEvict:
		return m.onEvict(ev.ForModel)
	case EvIdle:
		return m.onIdle(ev)
	case EvSlept:
		return m.onSlept(ev)
	case EvWoke:
		return m.onWoke(ev)
	case EvLearned:
		return m.onLearned(ev)
	case EvCanary:
		return m.onCanary(ev)
	case EvQuiet:
		return m.onQuiet(ev)
	case EvServing:
		return m.onServing(ev)
	case EvSpawnSlow:
		return m.onSpawnSlow(ev)
	case EvEngineSleeps:
		return m.onEngineSleeps(ev)
	}
	panic(fmt.Sprintf("machine: unknown event %T", ev))
}

func (m *Machine) enter(s State, reason string) {
	if s != m.state || reason != m.reason {
		m.log.Info("state", zap.String("state", string(s)), zap.String("reason", reason))
	}
	if s != m.state {
		m.since = m.now()
	}
	m.state, m.reason = s, reason
}

// live reports whether a process tree is up and not being stopped.
func (m *Machine) live() bool {
	switch m.state {
	case Starting, Ready, Unhealthy, Sleeping, Waking:
		return true
	}
	return false
}

// probed reports whether the model is probed in its state: not while it
// sleeps or waits for its memory to wake; while its engine wakes, yes (a
// wake that hangs is seen as a hang).
func (m *Machine) probed() bool {
	if m.isAsking() {
		return false // adopted: not before its engine says whether it sleeps
	}
	return m.state == Starting || m.state == Ready || m.state == Unhealthy || m.wakeInFlight()
}

// isAsking reports whether the engine of its instance, adopted after a
// crash, is being asked whether it sleeps.
func (m *Machine) isAsking() bool { return m.inst != nil && m.asking == m.inst }

// wakeInFlight reports whether its engine is being woken (the memory was
// granted; wake_up and the canary run).
func (m *Machine) wakeInFlight() bool { return m.flight == flightWake }

// toPending enters pending and checks what a start needs.
func (m *Machine) toPending(reason string) []Effect {
	m.startBegan = m.now()
	m.cause = CauseChecking
	m.flight = flightNone
	m.enter(Pending, reason)
	return []Effect{EfDisarm{Tick}, EfCheck{}}
}

func (m *Machine) onChecked(ev EvChecked) []Effect {
	if m.state != Pending || m.flight == flightWant || m.flight == flightSpawn {
		return nil
	}
	if ev.Cause != "" {
		m.cause = ev.Cause
		m.enter(Pending, ev.Reason)
		return []Effect{EfDrop{}, EfArm{Tick, recheckInterval}}
	}
	if !m.vllm.Known() {
		// Its flags and GPU naming depend on it: learn it first.
		if m.learning {
			return nil
		}
		m.learning = true
		m.learnSeq++
		m.enter(Pending, "learning its vLLM version")
		return []Effect{EfLearn{Seq: m.learnSeq}}
	}
	return m.wantGPUs()
}

// wantGPUs asks the scheduler for GPUs: the checks passed.
func (m *Machine) wantGPUs() []Effect {
	m.cause = CauseGPU
	m.wantSeq++
	m.flight = flightWant
	m.enter(Pending, "waiting for GPUs")
	return []Effect{EfWant{Seq: m.wantSeq}}
}

func (m *Machine) onPlaced(p schedule.Placement) []Effect {
	if (m.state != Pending && m.state != Waking) || m.flight != flightWant || p.Seq != m.wantSeq {
		return nil // answers a want withdrawn since
	}
	if m.state == Waking {
		if p.GPUs == nil {
			m.enter(Waking, "waiting for its GPU memory: "+p.Reason)
			return nil
		}
		m.flight = flightWake
		bound := m.wakeBound(m.sleepLevel)
		m.wakeBegan, m.probeFails, m.probing = m.now(), 0, false
		m.enter(Waking, fmt.Sprintf("waking (bound %s)", config.RoundDuration(bound)))
		return []Effect{EfWake{Level: m.sleepLevel, Timeout: bound, Known: m.known}, EfArm{Deadline, bound}, EfArm{Tick, m.cfg.Probe.Period}}
	}
	if p.GPUs == nil {
		m.cause = CauseGPU
		m.enter(Pending, p.Reason)
		return nil
	}
	m.flight, m.spawnNote, m.cause = flightSpawn, "", CauseSpawn
	m.enter(Pending, "spawning")
	return []Effect{EfSpawn{GPUs: p.GPUs}}
}

func (m *Machine) onSpawned(ev EvSpawned) []Effect {
	if m.flight != flightSpawn {
		// The runner reports a spawn right after EfSpawn, before any other
		// event: this cannot happen. Say so rather than lose track.
		m.log.Error("internal: spawn result without a spawn", zap.Bool("process", ev.Inst != nil))
		return nil
	}
	m.flight, m.spawnNote = flightNone, ""
	if ev.Inst == nil && m.askedDuringSpawn() {
		return m.afterSpawn()
	}
	switch {
	case ev.Err != nil:
		// The program is missing or not executable: retrying in seconds
		// would only burn the start limit. Fail now and say why.
		return append([]Effect{EfDrop{}}, m.fail(fmt.Sprintf("spawn: %s", errText(ev.Err)))...)
	case ev.Cause != "":
		m.cause = ev.Cause
		m.enter(Pending, ev.Reason)
		return []Effect{EfDrop{}, EfArm{Tick, recheckInterval}}
	}
	m.inst, m.exited, m.probeOK, m.probing = ev.Inst, false, nil, false
	m.demanded, m.hostHeld, m.envDigest = false, 0, ev.EnvDigest
	m.tracker.started(ev.Inst.Started)
	m.probeFails = 0
	m.readyAt, m.startup, m.servingAt = time.Time{}, 0, time.Time{}
	if m.askedDuringSpawn() {
		// Stopped, restarted or shut down while its spawn was in flight:
		// the process it returned is stopped, never lost.
		return m.afterSpawn()
	}
	m.enter(Starting, "loading")
	p := m.cfg.Probe
	// Its record first: a successor after a crash adopts it from there.
	return []Effect{EfRecord{}, EfArm{Deadline, p.StartupTimeout}, EfArm{Tick, m.startupPoll()}}
}

func (m *Machine) onExited(ev EvExited) []Effect {
	if ev.Inst != m.inst || m.inst == nil {
		return nil
	}
	m.exited = true
	ex := ev.Exit
	m.lastExit = &ex
	if !m.live() {
		return nil // being stopped: expected
	}
	m.log.Warn("model exited", zap.Int("pid", m.inst.PID), zap.String("exit", ex.Desc))
	if m.state == Sleeping && m.cfg.OnDemand() {
		// A sleeper nobody asked for: it stays stopped until a request
		// does, and then starts as any start does (asking for memory that
		// went to others meanwhile).
		m.restarts[ReasonExit]++
		m.idleAfterStop("on demand: exited while asleep (" + ex.Desc + "); starts at its next request")
		return m.beginStop("stopping what is left of it: exited while asleep (" + ex.Desc + ")")
	}
	return m.failAndStop(ReasonExit, "exited ("+ex.Desc+")", fmt.Sprintf("exited (%s); stopping what is left of it", ex.Desc))
}

func (m *Machine) onProbed(ev EvProbed) []Effect {
	if ev.Inst != m.inst || m.inst == nil {
		return nil // a result about a previous process
	}
	m.probing = false
	if m.exited || !m.probed() {
		return nil
	}
	if m.state == Waking {
		return m.onWakeProbed(ev)
	}
	if errors.Is(ev.Err, ErrNoVerdict) {
		// The daemon could not probe (out of descriptors, memory, ports):
		// no verdict on the model; ask again next period.
		m.log.Warn("probe not made: the daemon is short of resources", zap.Error(ev.Err))
		if m.state == Starting {
			return []Effect{EfArm{Tick, m.startupPoll()}}
		}
		return []Effect{EfArm{Tick, m.cfg.Probe.Period}}
	}
	if ev.Version != "" {
		m.confirmVersion(ev.Version)
	}
	err := ev.Err
	ok := err == nil
	m.probeOK = &ok
	p := m.cfg.Probe
	if m.state == Starting {
		if err != nil {
			// Refused (not bound yet) or slow: still loading. Say so only
			// when it is something else, such as a foreign server.
			reason := "loading"
			if _, foreign := err.(*probe.IdentityError); foreign {
				reason = "loading; " + err.Error()
			}
			m.enter(Starting, reason)
			return []Effect{EfArm{Tick, m.startupPoll()}}
		}
		m.readyAt = m.now()
		m.startup = m.readyAt.Sub(m.inst.Started)
		m.loads = gpu.Recent(m.loads, m.startup)
		m.startups = gpu.Recent(m.startups, m.readyAt.Sub(m.startBegan))
		m.enter(Ready, "")
		out := append([]Effect{EfDisarm{Deadline}, EfReady{At: m.readyAt}, EfArm{Tick, p.Period}}, m.awake()...)
		if m.cfg.OnDemand() && m.inst.SleepMode {
			// The answer its wakes must give again, asked while it is
			// fresh from a cold start.
			m.known, m.knownNote = nil, "being recorded"
			out = append(out, EfCanary{})
		}
		return out
	}
	out := []Effect{EfObserve{Took: ev.Took, Err: err}}
	switch {
	case err == nil:
		m.probeFails = 0
		m.enter(Ready, "")
	case probe.Fatal(err):
		// vLLM answers /health with 5xx once its engine died; it does not
		// recover, so waiting for the threshold only adds downtime.
		reason := "engine dead: /health answered " + err.Error()
		out = append(out, m.failAndStop(ReasonProbe, reason, reason)...)
	default:
		m.probeFails++
		reason := fmt.Sprintf("probe failed %d/%d: %s", m.probeFails, p.FailureThreshold, errText(err))
		if m.probeFails >= p.FailureThreshold {
			out = append(out, m.failAndStop(ReasonProbe, reason, reason)...)
		} else {
			m.enter(Unhealthy, reason)
		}
	}
	return out
}

func (m *Machine) onTimer(t Timer) []Effect {
	if t == Idle {
		return nil // the runner sends EvIdle instead
	}
	if t == Settle {
		if !m.settling {
			return nil
		}
		m.settling = false
		return []Effect{EfSettled{}}
	}
	if t == Deadline {
		if m.quiet.kind != quietNone {
			// No Unquiet: the sleep or stop that goes ahead marks its GPUs
			// busy (Changing, which ends the quiet request) in the same
			// message, so no decision sees them free in between.
			m.log.Warn("its GPUs were not quiet within startup_timeout; going ahead", zap.Duration("startup_timeout", m.cfg.Probe.StartupTimeout))
			return m.quietNow()
		}
		if m.wakeInFlight() {
			return m.wakeFailed("timeout", fmt.Sprintf("not awake within %s", config.RoundDuration(m.wakeBound(m.sleepLevel))))
		}
		if m.state != Starting {
			return nil
		}
		reason := fmt.Sprintf("no healthy answer within startup_timeout %s", m.cfg.Probe.StartupTimeout)
		return m.failAndStop(ReasonStartup, reason, reason)
	}
	switch m.state {
	case Pending:
		if m.flight == flightWant || m.flight == flightSpawn {
			return nil // the scheduler answers when it can place it; the spawn's job when it returns
		}
		return m.toPending(m.reason)
	case Backoff:
		return m.toPending("restarting after backoff")
	case Failed:
		m.tracker.reset()
		m.log.Info("retrying failed model", zap.Duration("retry_failed_after", m.cfg.Restart.RetryFailedAfter))
		return m.toPending("retrying after failure")
	case Starting, Ready, Unhealthy, Waking:
		if m.state == Waking && m.flight == flightWant {
			return nil // asleep until its memory is granted
		}
		var out []Effect
		if m.state != Starting {
			// Liveness runs on a fixed period from each probe's start, so
			// a hang is seen within period × failure_threshold + timeout;
			// a probe still in flight makes the tick pass (no pile-up).
			out = append(out, EfArm{Tick, m.cfg.Probe.Period})
		}
		if !m.probing {
			m.probing = true
			// A waking engine is checked for life only: no deep probe.
			out = append(out, EfProbe{Live: m.state == Ready || m.state == Unhealthy})
		}
		return out
	}
	return nil
}

// failAndStop counts a failure of the live process and stops it; what
// follows the stop (backoff or failed) is decided when it completes.
func (m *Machine) failAndStop(why, reason, stopping string) []Effect {
	m.log.Warn("restarting model", zap.String("reason", why), zap.String("detail", reason))
	m.restarts[why]++
	if m.after.kind <= afterFailure {
		m.after = afterStop{kind: afterFailure, failure: failure{why: why, reason: reason}}
	}
	return m.stop(stopping, true)
}

// beginStop hands the tree to a stop; EvStopped follows.
// A planned stop (an operator's stop or restart, a reload, an eviction by
// stop, the daemon's shutdown) of a model that serves drains it first, as
// a sleep does: vLLM aborts the requests in flight at SIGTERM. A stop
// after a failure does not wait for a dead engine.
func (m *Machine) beginStop(reason string) []Effect { return m.stop(reason, false) }

// stop hands the tree to a stop, after a failure (failed) or not.
func (m *Machine) stop(reason string, failed bool) []Effect {
	drain := !failed && !m.exited && (m.state == Ready || m.state == Unhealthy)
	m.quiet = quietWait{} // it stops now: whatever waited for quiet GPUs is moot
	// Its claim is released from here on: a settle timer still armed must
	// not mark it asleep again.
	m.settling = false
	m.enter(Stopping, reason)
	// Whatever was in flight (a sleep, a wake, a want for its memory) is
	// moot too.
	m.flight, m.sleepLevel, m.sleepBegan = flightNone, 0, time.Time{}
	return []Effect{EfDisarm{Tick}, EfDisarm{Deadline}, EfDisarm{Idle}, EfStop{Inst: m.inst, MainAlive: !m.exited, Drain: drain}}
}

// quietWait is what waits for quiet GPUs, and what it carries out then.
type quietWait struct {
	kind   quietKind
	reason string // the sleep's reason, or the stop's
	// cause: a sleep's (idle, evicted, manual); a stop's when it gives an
	// on-demand model's GPUs back, counted as a sleep at level 0.
	cause string
}

// quietKind is what waits for quiet GPUs.
type quietKind int

const (
	quietNone quietKind = iota
	quietSleep
	quietStop
)

// plannedStop stops a model that serves or sleeps once its GPUs are quiet
// (no other model starting or waking there); a sleepCause counts the stop
// as a sleep at level 0 with that cause (an on-demand model giving its
// GPUs back). A model loading, or one not running, is not waited for.
func (m *Machine) plannedStop(reason, sleepCause string) []Effect {
	var out []Effect
	if m.state == Waking && m.flight == flightWant && !m.shutdown {
		// A sleeper waiting for memory to wake (often because a neighbour
		// loads on its GPU): it still sleeps. Its want goes, and it stops
		// as a sleeper does, once its GPUs are quiet.
		m.flight = flightNone
		m.wantSeq++ // an answer to the withdrawn want is ignored
		m.enter(Sleeping, fmt.Sprintf("asleep (level %d)", m.sleepLevel))
		out = append(out, EfWithdraw{})
	}
	if m.shutdown || !(m.state == Ready || m.state == Unhealthy || (m.state == Sleeping && m.flight != flightSleep)) {
		out := m.beginStop(reason)
		if sleepCause != "" {
			out = append(out, EfSlept{Level: 0, Cause: sleepCause})
		}
		return out
	}
	pending := m.quiet.kind != quietNone
	m.quiet = quietWait{kind: quietStop, reason: reason, cause: sleepCause}
	m.enter(m.state, "waiting for its GPUs to be quiet before it stops: "+strings.TrimPrefix(reason, "stopping: "))
	if pending {
		return out // the request in flight answers this too
	}
	return append(out, m.askQuiet()...)
}

// askQuiet asks the scheduler for quiet GPUs, for at most startup_timeout
// (a neighbour's start ends within its own; past that, go ahead).
func (m *Machine) askQuiet() []Effect {
	m.quietSeq++
	return []Effect{EfQuiet{Seq: m.quietSeq}, EfArm{Deadline, m.cfg.Probe.StartupTimeout}}
}

// onQuiet carries out what waited for quiet GPUs, or says what it waits
// for.
func (m *Machine) onQuiet(ev EvQuiet) []Effect {
	if m.quiet.kind == quietNone || ev.Seq != m.quietSeq {
		return nil
	}
	if !ev.OK {
		what := map[quietKind]string{quietSleep: "sleeps", quietStop: "stops"}[m.quiet.kind]
		m.enter(m.state, fmt.Sprintf("waiting for %s, before it %s", ev.Reason, what))
		return nil
	}
	return m.quietNow()
}

// quietNow does what waited for quiet GPUs.
func (m *Machine) quietNow() []Effect {
	q := m.quiet
	m.quiet = quietWait{}
	out := []Effect{EfDisarm{Deadline}}
	if q.kind == quietSleep {
		return append(out, m.doSleep(q.cause, q.reason)...)
	}
	out = append(out, m.beginStop(q.reason)...)
	if q.cause != "" {
		out = append(out, EfSlept{Level: 0, Cause: q.cause})
	}
	return out
}

func (m *Machine) onStopped(ev EvStopped) []Effect {
	if ev.Inst != m.inst || m.inst == nil || m.state != Stopping {
		return nil // only EfStop reports here, and only while stopping
	}
	if !m.exited && ev.Inst.Exit.Desc != "" {
		ex := ev.Inst.Exit
		m.lastExit = &ex
	}
	after := m.after
	m.after = afterStop{}
	// A request came meanwhile, or requests wait in its queue: they want
	// it back (nothing else would ask for it again).
	wake := m.wakeAfter || ev.Waiting > 0
	m.wakeAfter = false
	inst := m.inst
	m.inst, m.exited, m.probing, m.hostHeld = nil, false, false, 0
	idled := after.kind == afterIdle
	var out []Effect
	switch {
	case m.shutdown:
		m.enter(Stopped, "supervisor shut down")
	case ev.Err != nil:
		m.log.Error("stop incomplete", zap.Error(ev.Err))
		out = m.fail("stop: " + ev.Err.Error())
	case m.hold:
		m.enter(Stopped, m.holdReason)
	case after.kind == afterStart:
		out = m.toPending(after.reason)
	case idled && wake:
		out = m.toPending("started on demand")
	case idled:
		m.enter(Stopped, after.reason)
	case after.kind == afterFailure:
		out = m.afterFailure(after.failure)
	default:
		out = m.toPending("restarting")
	}
	// When a start follows (at once or after a backoff), its GPUs stay
	// reserved for it; held, failed or shut down, they go to whoever waits.
	keep := m.state == Pending || m.state == Backoff
	return append([]Effect{EfRelease{Inst: inst, Keep: keep}}, out...)
}

// startAfterStop has the stop in flight (or the one waiting for quiet
// GPUs) followed by a start with reason: it replaces an idle stop's or a
// failure's plan.
func (m *Machine) startAfterStop(reason string) {
	m.after = afterStop{kind: afterStart, reason: reason}
}

// idleAfterStop has the stop followed by an on-demand model's idle
// (stopped, saying reason), unless a start follows it.
func (m *Machine) idleAfterStop(reason string) {
	if m.after.kind != afterStart {
		m.after = afterStop{kind: afterIdle, reason: reason}
	}
}

// afterFailure decides between backoff and failed after a failed run.
func (m *Machine) afterFailure(f failure) []Effect {
	var readyFor time.Duration
	if !m.readyAt.IsZero() {
		readyFor = m.now().Sub(m.readyAt)
	}
	delay, failed := m.tracker.afterFailure(m.cfg.Restart, m.now(), readyFor, m.jitter())
	if failed {
		return m.fail(fmt.Sprintf("start limit: %d starts within %s; last: %s", m.cfg.Restart.Burst, m.cfg.Restart.Interval, f.reason))
	}
	m.enter(Backoff, fmt.Sprintf("%s; restarting in %s", f.reason, config.RoundDuration(delay)))
	return []Effect{EfArm{Tick, delay}}
}

// fail enters failed, keeping the reason and (set by the runner) the last
// output for the operator.
func (m *Machine) fail(reason string) []Effect {
	m.enter(Failed, reason)
	m.log.Error("model failed", zap.String("reason", reason))
	if d := m.cfg.Restart.RetryFailedAfter; d > 0 {
		return []Effect{EfArm{Tick, d}}
	}
	return []Effect{EfDisarm{Tick}}
}

// stopHeld stops the model and holds it stopped with reason.
func (m *Machine) stopHeld(reason string) []Effect {
	m.hold, m.holdReason = true, reason
	if m.after.kind == afterStart && m.flight != flightSpawn {
		// A spawn in flight keeps it: the process it returns was started
		// before the restart was asked (a reload's), so a start that
		// lifts this hold must still stop it and start afresh.
		m.after = afterStop{}
	}
	switch {
	case m.live():
		return m.plannedStop("stopping: "+reason, "")
	case m.state == Stopping:
		return nil // held once the stop completes
	case m.flight == flightSpawn:
		return m.duringSpawn()
	}
	m.flight = flightNone
	m.enter(Stopped, reason)
	return []Effect{EfDisarm{Tick}, EfDrop{}}
}

// respawn stops a live model and starts it again at once, keeping its
// GPUs when it asks for the same.
func (m *Machine) respawn(reason string) []Effect {
	m.hold = false
	switch {
	case m.live():
		m.startAfterStop(reason)
		return m.plannedStop("stopping: "+reason, "")
	case m.state == Stopping:
		m.startAfterStop(reason)
		return nil
	case m.flight == flightSpawn:
		m.startAfterStop(reason)
		return m.duringSpawn()
	case m.state == Pending:
		if m.flight == flightWant {
			// Its want may ask for something else now.
			return append([]Effect{EfDrop{}}, m.toPending(reason)...)
		}
	}
	return m.toPending(reason)
}

func (m *Machine) onOp(op Op) []Effect {
	m.opErr = nil
	if m.shutdown {
		return nil
	}
	if m.removed {
		// Looked up before a reload removed it: its stop stands, and
		// nothing may start it again (its runner ends once it is stopped).
		m.opErr = fmt.Errorf("%s was removed from the configuration", m.cfg.Name)
		return nil
	}
	switch op {
	case OpSleep:
		if !m.cfg.OnDemand() {
			m.opErr = fmt.Errorf("%s is not on demand (activation: always): stop it instead", m.cfg.Name)
			return nil
		}
		if m.state != Ready {
			m.opErr = fmt.Errorf("%s is %s, not ready: nothing to put to sleep", m.cfg.Name, m.state)
			return nil
		}
		return m.sleep("manual", "put to sleep by operator")
	case OpWake:
		if !m.cfg.OnDemand() {
			m.opErr = fmt.Errorf("%s is not on demand (activation: always): start it instead", m.cfg.Name)
			return nil
		}
		if m.hold {
			m.opErr = fmt.Errorf("%s is held stopped: start it instead", m.cfg.Name)
			return nil
		}
		out := m.onDemand("woken by operator")
		m.demanded = false // the operator's: it goes on whoever waits
		return out
	case OpStart:
		m.hold = false
		m.demanded = false
		if m.flight == flightSpawn {
			return m.duringSpawn()
		}
		switch m.state {
		case Stopped, Failed, Backoff:
			m.tracker.reset()
			return m.toPending("started by operator")
		case Stopping:
			m.startAfterStop("started by operator")
		}
	case OpStop:
		return m.stopHeld("held stopped by operator")
	case OpRestart:
		m.tracker.reset()
		m.restarts[ReasonManual]++
		return m.respawn("restarted by operator")
	case OpReset:
		m.hold = false
		m.tracker.reset()
		if m.flight == flightSpawn {
			return m.duringSpawn()
		}
		switch m.state {
		case Failed, Backoff, Stopped:
			return m.toPending("reset by operator")
		case Stopping:
			m.startAfterStop("reset by operator")
		}
	}
	return nil
}

func (m *Machine) onConfig(ev EvConfig) []Effect {
	old := m.cfg
	m.cfg = ev.Config
	if !slices.Equal(old.Command, ev.Config.Command) || !maps.Equal(old.Env, ev.Config.Env) {
		// Another interpreter, or another PYTHONPATH: learn it again.
		m.vllm, m.learning = VLLM{}, false
		m.learnSeq++
	}
	if m.shutdown {
		return nil
	}
	switch {
	case !ev.Config.Enabled:
		if m.hold && m.holdReason == "enabled: false" {
			return nil
		}
		return m.stopHeld("enabled: false")
	case ev.Kind == config.Respawn:
		if old.Enabled {
			m.restarts[ReasonReload]++
		}
		m.tracker.reset()
		if m.state == Sleeping && ev.Config.OnDemand() {
			// Nobody asked for it: stopped, it starts at its next request
			// (and asks for memory then), rather than now, awake, putting
			// others to sleep for nothing.
			m.hold = false
			m.idleAfterStop("on demand: stopped for a configuration change; starts at its next request")
			return m.plannedStop("stopping: configuration changed", "")
		}
		return m.respawn("configuration changed")
	case ev.Kind == config.Update && m.live():
		return []Effect{EfRedigest{}}
	}
	return nil
}

// onRemoved stops a model a reload removed, as a planned stop (an
// operator's stop) does: once its GPUs are quiet, its requests drained.
// Its runner ends once it is stopped (done).
func (m *Machine) onRemoved() []Effect {
	if m.shutdown || m.removed {
		return nil
	}
	m.removed, m.wakeAfter = true, false
	return m.stopHeld("removed from the configuration")
}

func (m *Machine) onShutdown() []Effect {
	if m.shutdown {
		return nil
	}
	m.shutdown = true
	switch {
	case m.live():
		return m.beginStop("supervisor shutting down")
	case m.state == Stopping:
		return nil
	case m.flight == flightSpawn:
		return m.duringSpawn()
	}
	m.flight = flightNone
	m.enter(Stopped, "supervisor shut down")
	return []Effect{EfDisarm{Tick}, EfDisarm{Deadline}, EfDrop{}}
}

// Status is the machine's part of the model's published snapshot.
func (m *Machine) Status() *Status {
	s := &Status{
		Name:             m.cfg.Name,
		State:            m.state,
		Reason:           m.reason,
		Port:             m.cfg.Port,
		Since:            m.since,
		Enabled:          m.cfg.Enabled,
		ReadyAt:          m.readyAt,
		StartupDuration:  m.startup,
		StartupSeconds:   m.startup.Seconds(),
		RestartsByReason: maps.Clone(m.restarts),
	}
	for _, n := range m.restarts {
		s.Restarts += n
	}
	if m.inst != nil {
		s.PID, s.StartedAt, s.GPUs = m.inst.PID, m.inst.Started, m.inst.GPUs
	}
	if m.lastExit != nil {
		code := m.lastExit.Code
		s.LastExitCode, s.LastExit = &code, m.lastExit.Desc
	}
	if m.state == Failed {
		s.LastOutput = m.lastOut
	}
	if m.state == Pending {
		s.PendingCause = m.cause
	}
	if m.inst != nil && m.probeOK != nil {
		ok := *m.probeOK
		s.ProbeSuccess = &ok
	}
	s.OnDemand = m.cfg.OnDemand()
	s.Held = m.hold
	if m.vllm.Known() {
		s.VLLMVersion, s.VLLMVersionSource = m.vllm.Version.String(), m.vllm.Source
	}
	if _, why := m.effectiveLevel(); why != "" {
		s.VLLMNote = why
	}
	if m.lastOp != nil {
		op := *m.lastOp
		s.LastOp = &op
	}
	if m.inst != nil && m.cfg.OnDemand() {
		s.Canary = m.knownNote
	}
	s.WakeFailures = m.wakeFailures
	if m.inst != nil {
		s.SleepHostMemory = m.hostHeld
	}
	s.EnvDigest = m.envDigest
	if m.state == Sleeping && m.flight != flightSleep {
		s.SleepLevel = m.sleepLevel
	}
	s.TypicalStartup = gpu.Typical(m.startups)
	switch m.state {
	case Sleeping, Waking:
		s.WakeLevel = m.sleepLevel
		s.TypicalWake = gpu.Typical(m.wakes[m.sleepLevel])
		if m.state == Waking {
			s.LoadBegan = m.wakeStart
		}
	case Pending, Starting:
		s.LoadBegan = m.startBegan
	case Ready, Unhealthy:
		// What putting it to sleep would cost when it is wanted again: the
		// eviction policy's data (gpu/evict.go).
		s.WakeLevel, _ = m.effectiveLevel()
		s.TypicalWake = gpu.Typical(m.wakes[s.WakeLevel])
	}
	return s
}

// awake arms what an awake on-demand model needs: its idle check; it has
// been awake since now.
func (m *Machine) awake() []Effect {
	if !m.cfg.OnDemand() {
		return nil
	}
	m.awakeAt = m.now()
	return []Effect{EfArm{Idle, m.cfg.IdleAfter}}
}

// onDemand starts or wakes an on-demand model that is not awake.
func (m *Machine) onDemand(reason string) []Effect {
	if !m.cfg.OnDemand() || m.hold || m.shutdown {
		return nil
	}
	switch m.state {
	case Stopped:
		return m.toPending(reason)
	case Sleeping:
		if m.flight == flightSleep || m.quiet.kind == quietStop {
			// Once the sleep in flight is done; or, a stop of its own
			// waiting for quiet GPUs (one for its residue, say), once that
			// stop is: waking it now would only have it stopped mid-wake.
			m.wakeAfter = true
			return nil
		}
		return m.wake()
	case Stopping:
		if m.after.kind == afterIdle {
			m.wakeAfter = true
		}
	}
	return nil
}

// onUnwanted abandons a start or wake that requests asked for and that
// has not begun, now that no request waits for it: a sleeper whose memory
// is not back yet stays asleep (the scheduler stops making room for it), a
// model not spawned yet goes back to stopped, and a sleep or stop in
// flight is no longer followed by a wake. What has begun (a spawn, a
// wake_up) goes on: stopping it halfway would cost more than finishing,
// and the model then sleeps when idle.
func (m *Machine) onUnwanted() []Effect {
	if !m.cfg.OnDemand() || m.shutdown || !m.demanded {
		return nil
	}
	switch {
	case m.wakeAfter:
		m.wakeAfter, m.demanded = false, false
	case m.state == Waking && m.flight == flightWant:
		m.flight, m.demanded = flightNone, false
		m.wantSeq++ // an answer to the withdrawn want is ignored
		m.enter(Sleeping, fmt.Sprintf("asleep (level %d); the requests that would have woken it left", m.sleepLevel))
		return []Effect{EfWithdraw{}}
	case m.state == Pending && m.flight != flightSpawn && m.inst == nil:
		m.flight, m.demanded = flightNone, false
		m.wantSeq++
		m.enter(Stopped, "on demand: not started, the requests that asked for it left; starts at its next request")
		return []Effect{EfDisarm{Tick}, EfDrop{}}
	}
	return nil
}

// wake asks the scheduler for the sleeper's memory back on its GPUs.
func (m *Machine) wake() []Effect {
	m.wakeStart = m.now()
	m.wantSeq++
	m.flight = flightWant
	m.enter(Waking, "waiting for its GPU memory")
	return []Effect{EfWant{Seq: m.wantSeq, Held: m.held}}
}

// sleep gives an awake on-demand model's GPUs back: vLLM's sleep mode, or
// a stop with sleep_level 0. sleep_level is read now: a reload that
// changed it between 1 and 2 applies here; one from 0 applies from the
// next start (a process started without sleep mode is stopped instead).
func (m *Machine) sleep(cause, reason string) []Effect {
	level, why := m.effectiveLevel()
	if level == 0 {
		m.idleAfterStop(m.stoppedOnDemand(cause, why))
		return m.plannedStop("stopping: "+reason, cause)
	}
	if m.quiet.kind != quietNone {
		return nil // a sleep or a stop waits already
	}
	m.quiet = quietWait{kind: quietSleep, reason: reason, cause: cause}
	m.enter(m.state, "waiting for its GPUs to be quiet before it sleeps: "+reason)
	return append([]Effect{EfDisarm{Idle}}, m.askQuiet()...)
}

// stoppedOnDemand is what an on-demand model stopped instead of put to
// sleep says (sleep_level 0, or why is what its vLLM or process lacks).
func (m *Machine) stoppedOnDemand(cause, why string) string {
	s := "on demand: stopped (" + cause + "); starts at its next request"
	if why != "" {
		s += "; " + why
		m.log.Info("stopping instead of sleeping", zap.String("why", why))
	}
	return s
}

// HostMemory is what the level of a sleep depends on besides the model:
// sleep_host_memory in force (0: no bound) and the pinned host memory the
// other models' level-1 sleeps hold (their status's SleepHostMemory). The
// runner reads it as it carries out EfSleep.
type HostMemory struct{ Budget, OthersHeld uint64 }

// SleepBegins is the runner's word, as it carries out EfSleep (asking for
// level), that the sleep begins at, with host as it is: the machine
// chooses the level the sleep goes to (sleepLevelFor) and keeps it and
// when it began, so every record from here on says the sleep began, at the
// level it will be. It returns that level.
func (m *Machine) SleepBegins(level int, host HostMemory, at time.Time) int {
	level, note := m.sleepLevelFor(level, host)
	if m.flight == flightSleep {
		m.sleepLevel, m.sleepNote, m.sleepBegan = level, note, at
	}
	return level
}

// sleepLevelFor is the level a sleep asked at level goes to: level-1
// sleepers keep their weights in pinned host memory, so once the others
// hold sleep_host_memory it is level 2 instead (the weights are reloaded
// from disk at the wake), where its vLLM and command line have a level 2
// (deepestLevel); note says why.
func (m *Machine) sleepLevelFor(level int, host HostMemory) (int, string) {
	if level == 1 && host.Budget > 0 && host.OthersHeld >= host.Budget && m.deepestLevel() >= 2 {
		return 2, fmt.Sprintf("level 2, not 1: level-1 sleepers hold %s of sleep_host_memory %s", config.ByteSize(host.OthersHeld), config.ByteSize(host.Budget))
	}
	return level, ""
}

// doSleep puts the model to sleep (its GPUs are quiet): drain, then /sleep.
// The level is read again: a reload may have changed it meanwhile.
func (m *Machine) doSleep(cause, reason string) []Effect {
	level, why := m.effectiveLevel()
	if level == 0 {
		m.idleAfterStop(m.stoppedOnDemand(cause, why))
		return append(m.beginStop("stopping: "+reason), EfSlept{Level: 0, Cause: cause})
	}
	m.levelNote = why
	if why != "" {
		m.log.Info("sleeping at a shallower level than sleep_level", zap.Int("level", level), zap.String("why", why))
	}
	m.flight, m.sleepCause, m.sleepLevel, m.sleepNote, m.sleepBegan = flightSleep, cause, level, "", time.Time{}
	m.probing = false
	m.enter(Sleeping, "going to sleep: "+reason)
	return []Effect{EfDisarm{Tick}, EfDisarm{Idle}, EfSleep{Level: m.sleepLevel, Cause: cause}}
}

func (m *Machine) onEvict(forModel string) []Effect {
	switch {
	case !m.cfg.OnDemand() || m.shutdown:
	case m.state == Ready && m.now().Sub(m.awakeAt) < m.cfg.MinAwake:
		// Within min_awake of becoming ready, by its own clock: the
		// scheduler decided on an older view.
	case m.quiet.kind != quietNone:
		// A sleep or stop of its own waits already.
	case m.state == Ready:
		return m.sleep("evicted", "making room for "+forModel)
	case m.state == Sleeping && m.flight != flightSleep && !m.wakeAfter:
		// Asleep, it still holds CUDA graphs and NCCL buffers: stop it to
		// give those back too. It starts afresh at its next request.
		m.idleAfterStop("on demand: stopped to make room for " + forModel + "; starts at its next request")
		return m.plannedStop("stopping: making room for "+forModel, "evicted")
	}
	return []Effect{EfDecline{}}
}

func (m *Machine) onIdle(ev EvIdle) []Effect {
	if m.state != Ready || !m.cfg.OnDemand() {
		return nil
	}
	last := ev.Last
	if last.Before(m.awakeAt) {
		last = m.awakeAt
	}
	idleFor := m.now().Sub(last)
	if ev.InFlight > 0 {
		return []Effect{EfArm{Idle, m.cfg.IdleAfter}} // serving: not idle
	}
	if idleFor < m.cfg.IdleAfter {
		return []Effect{EfArm{Idle, max(m.cfg.IdleAfter-idleFor, time.Second)}}
	}
	return m.sleep("idle", fmt.Sprintf("no request for %s", config.RoundDuration(idleFor)))
}

func (m *Machine) onSlept(ev EvSlept) []Effect {
	if m.flight != flightSleep {
		return nil
	}
	m.flight, m.sleepBegan = flightNone, time.Time{}
	switch {
	case ev.Aborted:
		// Requests were still in flight: it stays awake, and says why.
		m.log.Info("sleep abandoned: requests still in flight", zap.String("cause", m.sleepCause))
		m.enter(Ready, "")
		out := []Effect{EfRecord{}, EfUnquiet{}, EfArm{Tick, m.cfg.Probe.Period}, EfArm{Idle, m.cfg.IdleAfter}}
		if m.sleepCause == "evicted" {
			out = append(out, EfDecline{})
		}
		return out
	case ev.Err != nil:
		// An engine that failed to sleep is in no state to trust: stop it;
		// it starts afresh at its next request.
		m.log.Warn("sleep failed; stopping the model", zap.Error(ev.Err))
		m.idleAfterStop("on demand: stopped after a failed sleep (" + errText(ev.Err) + "); starts at its next request")
		return m.beginStop("stopping: sleep failed: " + errText(ev.Err))
	}
	// The latest sleep adds nothing the second time: vLLM reuses the
	// pinned memory of its first.
	m.hostHeld = max(m.hostHeld, ev.Grown)
	if len(ev.Held) > 0 {
		m.held = ev.Held
	}
	reason := fmt.Sprintf("asleep (level %d, %s)", m.sleepLevel, m.sleepCause)
	if m.sleepNote != "" {
		reason += "; " + m.sleepNote
	}
	if m.levelNote != "" {
		reason += "; " + m.levelNote
	}
	m.enter(Sleeping, reason)
	out := []Effect{EfSlept{Level: m.sleepLevel, Cause: m.sleepCause}}
	// Requests that waited in its queue while it went to sleep (queued for
	// it while it woke, say) want it back: demand it again at once.
	if m.wakeAfter || ev.Waiting > 0 {
		m.wakeAfter = false
		out = append(out, m.wake()...)
	}
	return out
}

func (m *Machine) onWoke(ev EvWoke) []Effect {
	if !m.wakeInFlight() || ev.Inst != m.inst {
		return nil // a wake given up on since
	}
	if ev.Err != nil {
		return m.wakeFailed(cmp.Or(ev.Why, "error"), errText(ev.Err))
	}
	level := m.sleepLevel
	m.flight, m.sleepLevel = flightNone, 0
	m.demanded = false
	if m.wakes == nil {
		m.wakes = map[int][]time.Duration{}
	}
	m.wakes[level] = gpu.Recent(m.wakes[level], m.now().Sub(m.wakeStart))
	m.readyAt = m.now()
	m.probeFails, m.probing = 0, false
	m.noteWake(level, m.now().Sub(m.wakeBegan))
	m.enter(Ready, "")
	out := []Effect{EfDisarm{Deadline}, EfReady{At: m.readyAt}, EfWoke{Level: level, Took: m.now().Sub(m.wakeStart)}, EfArm{Tick, m.cfg.Probe.Period}}
	return append(out, m.awake()...)
}

// wakeFailed gives up on the wake in flight: a wake can fail when another
// process took the memory, hang (no answer within its bound, its engine
// no longer answering probes), and a woken engine that fails its canary
// cannot be trusted. The model is started cold; requests keep waiting in
// the gateway's queue.
func (m *Machine) wakeFailed(kind, why string) []Effect {
	m.log.Warn("wake failed; restarting the model cold", zap.String("what", kind), zap.String("why", why))
	m.restarts[ReasonWake]++
	m.wakeFailures++
	m.startAfterStop("restarting cold after a failed wake: " + why)
	return append([]Effect{EfWakeFailed{Why: kind}}, m.beginStop("stopping: wake failed: "+why)...)
}

// onCanary keeps the canary's known answer of the current process: the
// answer every wake must give again. A model that answers the same prompt
// differently twice in a row, fresh from its start, is not deterministic:
// its wakes are proven by any answer, as it says.
func (m *Machine) onCanary(ev EvCanary) []Effect {
	if ev.Inst != m.inst || m.inst == nil {
		return nil
	}
	switch {
	case ev.Err != nil:
		m.known, m.knownNote = nil, "not recorded ("+errText(ev.Err)+"): a wake is proven by any answer"
		m.log.Warn("the canary's known answer could not be recorded; wakes are proven by any answer", zap.Error(ev.Err))
	case ev.Differs:
		m.known, m.knownNote = nil, "not deterministic (two greedy answers after its start differed): a wake is proven by any answer"
		m.log.Warn("the model answers a greedy request differently twice: its wakes are proven by any answer, not a known one")
	default:
		a := ev.Answer
		m.known, m.knownNote = &a, "known answer"
	}
	return nil
}

// onWakeProbed takes a liveness probe of a waking engine: one that stops
// answering (hung, SIGSTOPped, its GPU gone) fails the wake after
// failure_threshold probes, or at once on a 5xx, rather than at the
// wake's bound.
func (m *Machine) onWakeProbed(ev EvProbed) []Effect {
	p := m.cfg.Probe
	if errors.Is(ev.Err, ErrNoVerdict) {
		return nil // the next tick asks again
	}
	out := []Effect{EfObserve{Took: ev.Took, Err: ev.Err}}
	switch {
	case ev.Err == nil:
		m.probeFails = 0
	case probe.Fatal(ev.Err):
		return append(out, m.wakeFailed("probe", "engine dead: /health answered "+ev.Err.Error())...)
	default:
		m.probeFails++
		if m.probeFails >= p.FailureThreshold {
			return append(out, m.wakeFailed("probe", fmt.Sprintf("probe failed %d/%d while waking: %s", m.probeFails, p.FailureThreshold, errText(ev.Err)))...)
		}
	}
	return out
}

// The bound of a wake when wake_timeout is 0: a multiple of the model's
// recent wakes at that level, at least wakeTimeoutFloor; before any,
// wakeTimeoutFirst. Always at most half its startup_timeout: a wake that
// takes as long as a cold start has failed.
const (
	wakeTimeoutFirst  = 2 * time.Minute
	wakeTimeoutFloor  = 30 * time.Second
	wakeTimeoutFactor = 4
	wakeHistory       = 8 // recent wakes kept per level
)

// wakeBound is how long a wake from level may take.
func (m *Machine) wakeBound(level int) time.Duration {
	if m.cfg.WakeTimeout > 0 {
		return m.cfg.WakeTimeout
	}
	limit := max(m.cfg.Probe.StartupTimeout/2, time.Second)
	recent := m.wakeTimes[level]
	if len(recent) == 0 {
		return min(wakeTimeoutFirst, limit)
	}
	return min(max(wakeTimeoutFactor*slices.Max(recent), wakeTimeoutFloor), limit)
}

// noteWake keeps a wake's duration among the recent ones of its level.
func (m *Machine) noteWake(level int, took time.Duration) {
	if m.wakeTimes == nil {
		m.wakeTimes = map[int][]time.Duration{}
	}
	w := append(m.wakeTimes[level], took)
	if len(w) > wakeHistory {
		w = w[len(w)-wakeHistory:]
	}
	m.wakeTimes[level] = w
}
