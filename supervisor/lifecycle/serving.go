package lifecycle

import (
	"time"

	"citadel-supervisor/gpu"
)

// Readiness without polling delay (docs/probes.md): a starting model
// whose output said it serves (the runner watches for it) is probed at
// once, then fast until it answers.

const (
	// burstPoll is the probe interval right after the model said it
	// serves (for burstFor): a refused connection costs microseconds.
	burstPoll = 5 * time.Millisecond
	burstFor  = 250 * time.Millisecond
	// fastPoll is the probe interval after that, and in the window around
	// the start time its previous starts took.
	fastPoll = 50 * time.Millisecond
	// fastFor is how long after the model said it serves it is probed
	// every fastPoll before falling back to the startup poll: vLLM listens
	// within milliseconds of the line, so this is ample.
	fastFor = 10 * time.Second
)

// startupPoll is how long until the next probe of a starting model: every
// burstPoll, then fastPoll, once it said it serves (for fastFor), and in the window around
// the spawn-to-ready time its recent starts took (from a fifth before the
// median to half of it after, at least a second either side); else the
// startup poll (the probe period, at most MaxStartupPoll), never sleeping
// past the window's start.
func (m *Machine) startupPoll() time.Duration {
	slow := min(m.cfg.Probe.Period, MaxStartupPoll)
	now := m.now()
	if since := now.Sub(m.servingAt); !m.servingAt.IsZero() && since < fastFor {
		if since < burstFor {
			return burstPoll
		}
		return fastPoll
	}
	typ := gpu.Typical(m.loads)
	if typ <= 0 || m.inst == nil {
		return slow
	}
	elapsed := now.Sub(m.inst.Started)
	from := typ - max(typ/5, time.Second)
	until := typ + max(typ/2, time.Second)
	switch {
	case elapsed >= from && elapsed <= until:
		return min(fastPoll, slow)
	case elapsed < from:
		return max(min(slow, from-elapsed), fastPoll)
	}
	return slow
}

// onServing probes a starting model at once when its output said it serves.
func (m *Machine) onServing(ev EvServing) []Effect {
	if ev.Inst != m.inst || m.inst == nil || m.state != Starting || m.exited {
		return nil
	}
	m.servingAt = m.now()
	if m.probing {
		return nil // the probe in flight answers; a refusal re-arms fast
	}
	m.probing = true
	return []Effect{EfProbe{Live: false}}
}
