package gateway

import "time"

// Loading describes a model's start or wake, so that the gateway can say
// how long it will likely still take: a client told "Retry-After: 1" for
// a model that needs a minute retries in vain and gives up before the
// model is up (OpenAI's SDKs retry twice, when Retry-After says).
type Loading struct {
	// Waking: the model wakes from sleep level Level; else it starts.
	Waking bool
	Level  int
	// Began is when the start (its spawn) or wake in progress began; zero
	// when none has begun yet (a request is about to start or wake it).
	Began time.Time
	// Typical is how long the model's recent starts (spawn to ready) or
	// wakes at this level took; 0 without history.
	Typical time.Duration
	// Bound is startup_timeout: a start never takes longer.
	Bound time.Duration
	// Poll is how often a starting model is probed: its readiness is seen
	// up to one poll after it is ready.
	Poll time.Duration
}

// Retry-After floors: with history the estimate is trusted down to a
// second; without it a start is said to take at least a few seconds.
const (
	minRetryKnown   = time.Second
	minRetryUnknown = 3 * time.Second
)

// left is how long the start or wake will likely still take at now: its
// typical duration less what already passed, plus a margin (a probe poll,
// since the typical start may have been seen at a lucky probe, and a tenth
// of the typical duration: a retry that lands just before the model is
// ready finds the queue still full), at least a second (it is
// late); or, without history, as long again as it took so far, at least a
// few seconds; never past startup_timeout.
func (l Loading) left(now time.Time) time.Duration {
	var elapsed time.Duration
	if !l.Began.IsZero() {
		elapsed = max(now.Sub(l.Began), 0)
	}
	d, floor := elapsed, minRetryUnknown
	if l.Typical > 0 {
		d, floor = l.Typical-elapsed+l.Poll+l.Typical/10, minRetryKnown
	}
	if l.Bound > elapsed && d > l.Bound-elapsed {
		d = l.Bound - elapsed
	}
	return max(d, floor)
}

// retryAfter is what a refused request is told: a busy model frees a
// slot as soon as one request ends; one that starts or wakes, the
// estimate. Called with mu held.
func (a *admission) retryAfter() time.Duration {
	if a.gate == gateOpen {
		return retryBusy
	}
	now := time.Now
	if a.now != nil {
		now = a.now
	}
	return a.loading.left(now())
}

// setLoading records the model's start or wake, for retryAfter.
func (a *admission) setLoading(l Loading) {
	a.mu.Lock()
	a.loading = l
	a.mu.Unlock()
}
