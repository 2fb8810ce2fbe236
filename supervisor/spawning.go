package supervisor

import (
	"cmp"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
)

// A spawn (the checks once more, the cgroup leaf, fork and exec, the
// output pipes) is a job of its own, like a probe or a stop: the runner
// goes on taking operations, reloads and the shutdown while it runs, and
// its outcome comes back as EvSpawned. What is asked meanwhile (a stop, a
// restart, a reload that changes the model, the shutdown) is applied once
// it returns: a process it started is stopped first, never lost.

// spawnWait is how long a spawn may take before the model's reason says
// what it hangs on. fork and exec take milliseconds; a spawn that takes
// seconds waits on something that may never answer (a hung mount under
// the command or the cgroup file system).
const spawnWait = 2 * time.Second

// EvSpawnSlow: the spawn in flight has not returned after spawnWait; what
// is what it was doing.
type EvSpawnSlow struct {
	What  string
	After time.Duration
}

func (EvSpawnSlow) isEvent() {}

// askedDuringSpawn reports whether something was asked while the spawn was
// in flight that the spawn's outcome must yield to: a stop (an operator's,
// enabled: false, a removal), a start afresh (restart, a reload that
// changes the model), or the shutdown.
func (m *Machine) askedDuringSpawn() bool {
	return m.shutdown || m.hold || m.after.kind == afterStart
}

// duringSpawn says, while a spawn is in flight, what it does and what
// follows it.
func (m *Machine) duringSpawn() []Effect {
	reason := cmp.Or(m.spawnNote, "spawning")
	switch {
	case m.shutdown:
		reason += "; stopped once it returns (supervisor shutting down)"
	case m.hold:
		reason += "; stopped once it returns (" + m.holdReason + ")"
	case m.after.kind == afterStart:
		reason += "; started again once it returns (" + m.after.reason + ")"
	}
	m.enter(m.state, reason)
	return nil
}

// afterSpawn carries out what was asked while the spawn was in flight, its
// outcome taken (m.inst is the process it started, nil when none): the
// process is stopped, and what follows its stop is decided as for any
// stop (onStopped); without one, the model is held stopped, shut down, or
// checked again for its new start.
func (m *Machine) afterSpawn() []Effect {
	if m.inst == nil {
		start := m.after.reason
		m.after = afterStop{}
		switch {
		case m.shutdown:
			m.enter(Stopped, "supervisor shut down")
		case m.hold:
			m.enter(Stopped, m.holdReason)
		default:
			return append([]Effect{EfDrop{}}, m.toPending(start)...)
		}
		return []Effect{EfDisarm{Tick}, EfDrop{}}
	}
	reason := "stopping: " + m.after.reason
	switch {
	case m.shutdown:
		reason = "supervisor shutting down"
	case m.hold:
		reason = "stopping: " + m.holdReason
	}
	m.log.Info("a stop was asked while it was spawned: stopping the process", zap.Int("pid", m.inst.PID))
	// No record: a successor after a crash stops a process without one,
	// as this one is to be stopped.
	return m.beginStop(reason)
}

func (m *Machine) onSpawnSlow(ev EvSpawnSlow) []Effect {
	if m.flight != flightSpawn {
		return nil
	}
	m.spawnNote = fmt.Sprintf("spawn hangs: %s has not returned after %s", ev.What, RoundDuration(ev.After))
	m.log.Warn("spawn hangs", zap.String("doing", ev.What), zap.Duration("after", ev.After))
	return m.duringSpawn()
}

// spawnRun is the spawn in flight: what it does now, for the reason a
// spawn that hangs shows.
type spawnRun struct {
	mu   sync.Mutex
	what string
}

func (s *spawnRun) doing(what string) {
	s.mu.Lock()
	s.what = what
	s.mu.Unlock()
}

func (s *spawnRun) now() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.what
}

// startSpawn runs the spawn on gpus as a job; its outcome comes back on
// l.spawned. A result the runner no longer takes (it ended at the
// shutdown, the spawn having hung past its bound) is the job's to stop.
func (l *loop) startSpawn(gpus []string) {
	r := l.r
	cfg, eff, v := l.m.cfg, l.m.SpawnConfig(), l.m.vllm
	job := &spawnRun{what: "the checks before its spawn"}
	l.spawnJob = job
	l.spawnSlow = r.d.after(spawnWait)
	go func() {
		ev := r.spawnChecked(cfg, eff, v, gpus, job.doing)
		select {
		case l.spawned <- ev:
		case <-l.gone:
			if ev.Inst != nil {
				r.log.Warn("its spawn returned after the runner ended: stopping the process", zap.Int("pid", ev.Inst.PID))
				_ = r.stopInstance(ev.Inst, 0, true)
				r.d.forgetInstance(ev.Inst.marker)
			}
		}
	}()
}

// spawnChecked checks again (the GPUs may have taken a while) and starts
// the model: m as configured, eff as its vLLM v can have it. It runs off
// the runner's goroutine and touches none of the runner's state but its
// atomics.
func (r *runner) spawnChecked(m, eff config.Model, v VLLM, gpus []string, doing func(string)) EvSpawned {
	// The env_files the checks read are what the child gets.
	secrets, cause, reason := checkStart(m)
	if cause != "" {
		return EvSpawned{Cause: cause, Reason: reason}
	}
	visible, note := r.d.visibleDevices(gpus, v)
	if note != "" {
		r.log.Warn(note)
	}
	inst, err := r.spawn(m, eff, secrets, gpus, visible, doing)
	if err != nil {
		if daemonShort(err) {
			// Out of descriptors (pipe2, pidfd_open), memory or processes:
			// the daemon's own trouble, often a flood on its listeners. The
			// model is tried again like any pending model, without counting
			// a start nor failing it.
			r.log.Warn("spawn not made: the daemon is short of resources", zap.Error(err))
			return EvSpawned{Cause: CauseDaemon, Reason: "the daemon is short of resources to start it: " + errText(err) + "; retrying"}
		}
		return EvSpawned{Err: err}
	}
	key := m.APIKey(secrets)
	r.apiKey.Store(&key)
	r.publishPIDs(inst.tree)
	// Its record is written as the machine takes the instance (EfRecord
	// from EvSpawned, on the runner's goroutine): one builder. A digest of
	// the env_files, not the values: a reload compares it with the files'
	// contents then, to restart a model whose secret was rotated.
	return EvSpawned{Inst: inst, EnvDigest: envDigest(secrets)}
}
