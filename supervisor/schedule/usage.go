package schedule

import (
	"fmt"
	"sync"
	"time"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
)

// Models is where the scheduler reads what it needs of the models at each
// decision: every model's processes, and the usage of the models it holds
// claims for (claimed, sorted; Views asks for none). Observe is called on
// the scheduler's goroutine (and by Views) and must not block: it reads
// what the runners and the gateway publish.
type Models interface {
	Observe(claimed []string) Observation
}

// ModelsFunc is a function that is Models.
type ModelsFunc func(claimed []string) Observation

// Observe calls f.
func (f ModelsFunc) Observe(claimed []string) Observation { return f(claimed) }

// Observation is the models as last published.
type Observation struct {
	// PIDs maps every known process of every model to the model: a
	// claim's processes, matched against the GPUs' readings.
	PIDs map[int]string
	// Usage holds the usage of each claimed model that is on demand; a
	// model absent is not, and is never put to sleep to make room.
	Usage map[string]Usage
}

// Usage is what decides whether an on-demand model may be put to sleep to
// make room for another, and in what order (gpu.EvictionOrder): its
// min_awake (counted from the instant its lifecycle saw it ready, which
// Ready carries), its last request, the requests waiting in its queue now,
// and what putting it to sleep (or stopping it) would cost when it is
// wanted again, from what its runner measured.
type Usage struct {
	MinAwake    time.Duration
	LastRequest time.Time // zero: none yet
	Waiting     int       // requests in its queue now
	// Cost: its recent wakes at the level it sleeps at and its recent
	// cold starts (both from the request that asked to ready, as clients
	// waited them; gpu.Typical), the level, and how often it is asked for
	// (UseCounter).
	Cost gpu.Cost
}

// fill sets what c's model's usage decides in its claim: on demand or not,
// the requests waiting, its last use (a request, or becoming ready,
// whichever is later), whether min_awake still protects it, its cost.
func fill(c *gpu.Claim, u Usage, onDemand bool, now time.Time) {
	c.OnDemand, c.Waiting, c.LastUsed, c.Protected = onDemand, u.Waiting, u.LastRequest, ""
	if c.AwakeAt.After(c.LastUsed) {
		c.LastUsed = c.AwakeAt
	}
	if awake := now.Sub(c.AwakeAt); c.Phase == gpu.Running && onDemand && awake < u.MinAwake {
		c.Protected = fmt.Sprintf("awake for %s (min_awake %s)", config.RoundDuration(awake), u.MinAwake)
	}
	c.Cost = u.Cost
}

// UseCounter is a model's requests, counted with decay (gpu.Uses): the
// eviction policy's frequency. The gateway's request goroutines add to it
// (a lock of the model's own, no channel send); Observe reads it.
type UseCounter struct {
	mu sync.Mutex
	u  gpu.Uses
}

// Add counts a request at now.
func (c *UseCounter) Add(now time.Time) {
	c.mu.Lock()
	c.u = c.u.Add(now)
	c.mu.Unlock()
}

// Load is the count so far.
func (c *UseCounter) Load() gpu.Uses {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.u
}
