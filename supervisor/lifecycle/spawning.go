package lifecycle

import (
	"cmp"
	"fmt"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
)

// A spawn is a job of the runner's (supervisor/spawning.go): the machine
// goes on taking operations, reloads and the shutdown while it runs, and
// its outcome comes back as EvSpawned. What is asked meanwhile (a stop, a
// restart, a reload that changes the model, the shutdown) is applied once
// it returns: a process it started is stopped first, never lost.

// EvSpawnSlow: the spawn in flight has not returned for After (the
// runner's bound, 2 s); What is what it was doing.
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
	m.spawnNote = fmt.Sprintf("spawn hangs: %s has not returned after %s", ev.What, config.RoundDuration(ev.After))
	m.log.Warn("spawn hangs", zap.String("doing", ev.What), zap.Duration("after", ev.After))
	return m.duringSpawn()
}
