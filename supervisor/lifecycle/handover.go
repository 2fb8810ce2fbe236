package lifecycle

import (
	"cmp"
	"fmt"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
	"citadel-supervisor/supervisor/liverestore"
	"citadel-supervisor/vllm"
)

// Live restore, the machine's part (docs/architecture.md, "Live
// restore"): an upgrade writes each machine down (Snapshot, once
// Restorable), and the next image, or a successor after a crash that
// found the model's process and its instance record, restores a machine
// from that state (Restore) instead of beginning afresh. The state is the
// live-restore package's types (ModelState, InstanceState); the runner
// adds what only it knows (the process's handles, output and timers).

// Restorable reports whether the machine can be written down now: no
// effect is in flight whose outcome the next image could not receive (a
// spawn, a stop, a sleep or a wake).
func (m *Machine) Restorable() error {
	switch {
	case m.flight == flightSpawn:
		return fmt.Errorf("%s is being spawned", m.cfg.Name)
	case m.state == Stopping, m.state == Waking:
		return fmt.Errorf("%s is %s", m.cfg.Name, m.state)
	case m.flight == flightSleep:
		return fmt.Errorf("%s is going to sleep", m.cfg.Name)
	case m.isAsking():
		return fmt.Errorf("%s is being asked whether it sleeps", m.cfg.Name)
	}
	return nil
}

// Snapshot writes the machine down; the runner adds the instance's
// process details, output and timers.
func (m *Machine) Snapshot() liverestore.ModelState {
	st := liverestore.ModelState{
		Name: m.cfg.Name, State: m.state, Reason: m.reason, Since: m.since,
		Hold: m.hold, HoldReason: m.holdReason, Restarts: m.restarts,
		Starts: m.tracker.starts, Failures: m.tracker.failures, LastOutput: m.lastOut,
		WakeTimes: m.wakeTimes,
	}
	if m.lastExit != nil {
		st.LastExit = &liverestore.ExitState{Code: m.lastExit.Code, Desc: m.lastExit.Desc}
	}
	if m.inst != nil && !m.exited {
		st.Instance = &liverestore.InstanceState{
			Model: m.cfg.Name, PID: m.inst.PID, Started: m.inst.Started, GPUs: m.inst.GPUs,
			ReadyAt: m.readyAt, Startup: m.startup, AwakeAt: m.awakeAt,
		}
		sleepMode := m.inst.SleepMode
		st.Instance.SleepMode = &sleepMode
		st.Instance.Known, st.Instance.KnownNote = m.known, m.knownNote
		st.Instance.Held = m.held
		// Held until the process ends, so a successor counts it from the
		// start.
		st.Instance.HostHeld = m.hostHeld
		st.Instance.EnvDigest = m.envDigest
		if m.state == Sleeping || m.state == Waking {
			// Waiting for memory to wake, or waking, it sleeps at its level
			// until the wake is proven: a successor wakes it the way it
			// slept (a wake_up of an engine already awake does nothing).
			st.Instance.SleepLevel, st.Instance.SleepCause = m.sleepLevel, m.sleepCause
			if m.flight == flightSleep {
				st.Instance.SleepBegan = m.sleepBegan
			}
			if m.wakeInFlight() {
				st.Instance.WakeBegan = m.wakeBegan
			}
		}
		if m.vllm.Known() {
			st.Instance.VLLMVersion, st.Instance.VLLMSource = m.vllm.Version.String(), m.vllm.Source
		}
	}
	return st
}

// Restore takes over st, with inst its process (nil when it is gone or
// there was none), instead of Begin. A process started under another
// configuration (or env_files contents, envChanged) is restarted,
// deliberately; one that is gone is a failure like any exit.
func (m *Machine) Restore(st liverestore.ModelState, inst *Instance, digest string, envChanged bool) []Effect {
	m.since, m.hold, m.holdReason = st.Since, st.Hold, st.HoldReason
	if st.Restarts != nil {
		m.restarts = st.Restarts
	}
	m.tracker = restartTracker{starts: st.Starts, failures: st.Failures}
	m.lastOut = st.LastOutput
	m.wakeTimes = st.WakeTimes
	if st.LastExit != nil {
		m.lastExit = &Exit{Code: st.LastExit.Code, Desc: st.LastExit.Desc}
	}
	if !m.cfg.Enabled && !m.hold {
		m.hold, m.holdReason = true, "enabled: false"
	}
	if inst != nil {
		is := st.Instance
		m.inst, m.exited = inst, false
		if v, err := vllm.Parse(is.VLLMVersion); err == nil && is.VLLMVersion != "" {
			m.vllm = VLLM{Version: v, Source: is.VLLMSource}
		}
		m.readyAt, m.startup, m.awakeAt = is.ReadyAt, is.Startup, is.AwakeAt
		inst.SleepMode = m.cfg.Sleeps()
		if is.SleepMode != nil {
			inst.SleepMode = *is.SleepMode
		}
		m.known, m.knownNote, m.held, m.hostHeld = is.Known, is.KnownNote, is.Held, is.HostHeld
		m.envDigest = is.EnvDigest
		if m.known == nil && m.knownNote == "" && inst.SleepMode {
			m.knownNote = "not recorded (taken over from a daemon that did not record it): a wake is proven by any answer"
		}
		running := EfAdopt{Phase: gpu.Running, AwakeAt: m.awakeAt}
		switch {
		case m.hold:
			// Held (or disabled) while the daemon was away, or its stop
			// waited for quiet GPUs when it was frozen: stop it as a
			// planned stop does, once its GPUs are quiet (a neighbour may
			// be taken over loading there). A loading one stops at once.
			state, adopt := st.State, running
			switch {
			case is.SleepLevel > 0:
				state, adopt = Sleeping, EfAdopt{Phase: gpu.Asleep}
				m.sleepLevel, m.sleepCause = is.SleepLevel, cmp.Or(is.SleepCause, "adopted")
			case state == Starting:
				adopt = EfAdopt{Phase: gpu.Starting, AwakeAt: m.awakeAt}
			case state != Unhealthy:
				state = Ready
			}
			m.enter(state, st.Reason)
			return append([]Effect{adopt}, m.plannedStop("stopping: "+m.holdReason, "")...)
		case is.Digest != digest || envChanged:
			what := "configuration"
			if is.Digest == digest {
				what = "env_files contents"
			}
			m.enter(Ready, "")
			m.restarts[ReasonReload]++
			m.log.Info("its "+what+" changed while the daemon was away; restarting it", zap.Int("pid", inst.PID))
			return append([]Effect{running}, m.respawn(what+" changed while the daemon was away")...)
		case is.SleepLevel > 0 && m.cfg.OnDemand():
			// Asleep, or being put to sleep or woken when the daemon died:
			// never taken for awake until a wake proves it (a wake_up of
			// an engine that never slept does nothing; the canary tells).
			m.sleepLevel, m.sleepCause = is.SleepLevel, cmp.Or(is.SleepCause, "adopted")
			reason := fmt.Sprintf("asleep (level %d, %s)", is.SleepLevel, m.sleepCause)
			during := ""
			switch {
			case !is.SleepBegan.IsZero():
				during = "going to sleep"
			case !is.WakeBegan.IsZero():
				during = "waking"
			}
			if during == "" {
				m.enter(Sleeping, reason)
				return []Effect{EfAdopt{Phase: gpu.Asleep}}
			}
			// Its /sleep or wake_up may still run in the engine (a
			// level-2 wake reloads the weights: minutes): its GPUs'
			// memory changes until it ends, so nothing starts or wakes
			// there until then, bounded by its wake bound (vllm#56830).
			m.settling = true
			bound := m.wakeBound(is.SleepLevel)
			m.enter(Sleeping, fmt.Sprintf("asleep (level %d, %s; adopted while %s: its GPUs count as changing for up to %s)", is.SleepLevel, m.sleepCause, during, config.RoundDuration(bound)))
			return []Effect{EfAdopt{Phase: gpu.Asleep, Changing: true}, EfArm{Settle, bound}}
		case inst.Adopted && m.cfg.OnDemand() && m.cfg.SleepLevel > 0:
			// After a crash the record may be a step behind the engine:
			// the daemon died as it went to sleep by itself. The engine
			// knows, and a request must never go to an engine believed
			// awake: until it answers (a job, within probe.timeout) it
			// counts as loading. The other way round (the record says
			// asleep, or that a sleep began, and the engine says awake: it
			// died mid-sleep or mid-wake) the record is kept, above:
			// asleep until a wake proves it awake.
			m.asking = inst
			m.probing = true // no probe before it answers
			m.askReady = st.State == Ready || st.State == Unhealthy || (st.State == "" && !is.ReadyAt.IsZero())
			m.enter(Starting, "adopted from a previous daemon: asking its engine whether it sleeps (GET /is_sleeping)")
			return []Effect{EfAdopt{Phase: gpu.Starting, AwakeAt: m.awakeAt}, EfAskSleeping{}}
		case st.State == Ready || st.State == Unhealthy || (st.State == "" && !is.ReadyAt.IsZero()):
			return m.adoptedReady()
		default:
			return m.adoptedLoading(st.State, st.Reason)
		}
	}
	if st.Instance != nil && (st.State == Ready || st.State == Unhealthy || st.State == Starting || st.State == Sleeping) {
		// It was running and is gone: it exited while no daemon watched.
		m.enter(st.State, st.Reason)
		m.restarts[ReasonExit]++
		f := failure{why: ReasonExit, reason: "exited while the daemon was away (exit status unknown)"}
		m.lastExit = &Exit{Code: -1, Desc: "exit status unknown (it ended while the daemon was away)"}
		if m.hold {
			m.enter(Stopped, m.holdReason)
			return nil
		}
		return m.afterFailure(f)
	}
	left := st.TimerAt.Sub(m.now())
	switch {
	case m.hold:
		m.enter(Stopped, m.holdReason)
		return nil
	case st.State == Backoff:
		m.enter(Backoff, st.Reason)
		return []Effect{EfArm{Tick, max(left, 0)}}
	case st.State == Failed:
		m.enter(Failed, st.Reason)
		if m.cfg.Restart.RetryFailedAfter > 0 {
			return []Effect{EfArm{Tick, max(left, 0)}}
		}
		return nil
	case st.State == Stopped && m.cfg.OnDemand():
		m.enter(Stopped, st.Reason)
		return nil
	}
	return m.Begin()
}

// adoptedReady goes on with a process taken over that was ready: probed
// within a period; a failing probe counts from zero. A record (a crash)
// that says it was ready: it is no longer loading, a failing probe is a
// failure.
func (m *Machine) adoptedReady() []Effect {
	m.enter(Ready, "")
	if m.awakeAt.IsZero() {
		m.awakeAt = m.now()
	}
	out := []Effect{EfAdopt{Phase: gpu.Running, AwakeAt: m.awakeAt}, EfArm{Tick, min(m.cfg.Probe.Period, MaxStartupPoll)}}
	if m.cfg.OnDemand() {
		// Awake since its predecessor saw it wake: min_awake and
		// idle_after go on from there.
		out = append(out, EfArm{Idle, m.cfg.IdleAfter})
	}
	return out
}

// adoptedLoading goes on with a process taken over that was starting
// (state, saying reason), or found after a crash (ready or not, the first
// probe tells): loading is not failure, and a loaded model is ready within
// a second.
func (m *Machine) adoptedLoading(state State, reason string) []Effect {
	m.readyAt, m.startup = time.Time{}, 0
	if state != Starting {
		reason = "adopted from a previous daemon: probing"
	}
	m.enter(Starting, reason)
	left := m.cfg.Probe.StartupTimeout - m.now().Sub(m.inst.Started)
	if state != Starting {
		left = m.cfg.Probe.StartupTimeout
	}
	return []Effect{EfAdopt{Phase: gpu.Starting, AwakeAt: m.awakeAt}, EfArm{Deadline, max(left, time.Second)}, EfArm{Tick, 0}}
}

// EfAskSleeping: ask the engine of a process adopted after a crash whether
// it sleeps (GET /is_sleeping), off the runner's goroutine →
// EvEngineSleeps.
type EfAskSleeping struct{}

func (EfAskSleeping) isEffect() {}

// EvEngineSleeps: the engine of inst said whether it sleeps; err when it
// did not answer.
type EvEngineSleeps struct {
	Inst   *Instance
	Asleep bool
	Err    error
}

func (EvEngineSleeps) isEvent() {}

// onEngineSleeps takes the engine's word on a process adopted after a
// crash: asleep, it sleeps at its sleep_level; awake (or no answer: the
// record is believed, and the probes tell), it goes on as its record says.
// A process stopped meanwhile is past asking.
func (m *Machine) onEngineSleeps(ev EvEngineSleeps) []Effect {
	inst := m.inst
	if inst == nil || ev.Inst != inst || !m.isAsking() {
		return nil
	}
	m.asking = nil
	if m.state != Starting {
		return nil
	}
	m.probing = false
	switch {
	case ev.Err == nil && ev.Asleep:
		m.sleepLevel, m.sleepCause = m.cfg.SleepLevel, "found asleep"
		m.log.Info("adopted: the engine sleeps although its record says awake; the engine's word is taken", zap.Int("level", m.sleepLevel))
		m.enter(Sleeping, fmt.Sprintf("asleep (level %d, %s)", m.sleepLevel, m.sleepCause))
		return []Effect{EfAdopt{Phase: gpu.Asleep}, EfRecord{}}
	case ev.Err != nil:
		m.log.Warn("adopted: the engine did not say whether it sleeps; its record is believed", zap.Error(ev.Err))
	}
	if m.askReady {
		return m.adoptedReady()
	}
	return m.adoptedLoading("", "")
}

// EfAdopt: the restored model holds GPUs already: tell the scheduler.
type EfAdopt struct {
	Phase   gpu.Phase
	AwakeAt time.Time // when it last became ready, for min_awake
	// changing: its /sleep or wake_up may still run (the daemon died
	// during it): its GPUs count as busy until EfSettled.
	Changing bool
}

func (EfAdopt) isEffect() {}

// EfSettled: a model taken over mid-sleep or mid-wake has had its bound to
// finish: its GPUs' memory no longer changes on its account.
type EfSettled struct{}

func (EfSettled) isEffect() {}
