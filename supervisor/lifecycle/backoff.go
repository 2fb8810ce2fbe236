package lifecycle

import (
	"time"

	"citadel-supervisor/config"
)

// JitterSpread is the ± fraction applied to each restart delay, so models
// that crashed together (a driver reset, say) do not restart in lockstep.
const JitterSpread = 0.1

// restartTracker holds one model's restart history: start times within the
// window and consecutive failures. It is pure: the caller passes time in.
type restartTracker struct {
	starts   []time.Time
	failures int
}

// started records a spawn.
func (t *restartTracker) started(now time.Time) { t.starts = append(t.starts, now) }

// reset forgets the history: an operator's start, restart or reset.
func (t *restartTracker) reset() { *t = restartTracker{} }

// afterFailure decides what follows a failed run. readyFor is how long the
// run was ready (0 if it never was); a run ready for reset_after clears the
// backoff first. jitter in [0,1) spreads the delay by ±JitterSpread.
// failed is true when the run used up the start limit: burst starts within
// interval.
func (t *restartTracker) afterFailure(p config.Restart, now time.Time, readyFor time.Duration, jitter float64) (delay time.Duration, failed bool) {
	if readyFor >= p.ResetAfter {
		t.failures = 0
	}
	t.failures++
	cutoff := now.Add(-p.Interval)
	kept := t.starts[:0]
	for _, s := range t.starts {
		if s.After(cutoff) {
			kept = append(kept, s)
		}
	}
	t.starts = kept
	if len(t.starts) >= p.Burst {
		return 0, true
	}
	return backoffDelay(p, t.failures, jitter), false
}

// backoffDelay is min(delay·2^(n−1), max_delay), then spread by jitter.
// The spread comes after the cap: capping after it would bring every model
// that crashed together back to exactly max_delay, restarting them in
// lockstep (on the same GPUs, at the same moment) once they reach the cap.
// So a capped delay may exceed max_delay by up to JitterSpread.
func backoffDelay(p config.Restart, n int, jitter float64) time.Duration {
	d := p.Delay
	for i := 1; i < n && d < p.MaxDelay; i++ {
		d *= 2
	}
	d = min(d, p.MaxDelay)
	spread := 1 + JitterSpread*(2*jitter-1)
	return time.Duration(float64(d) * spread)
}
