package supervisor

import (
	"sync"
	"time"

	"citadel-supervisor/gpu"
)

// useCounter is a model's requests, counted with decay (gpu.Uses). The
// gateway's request goroutines add to it; the scheduler reads it.
type useCounter struct {
	mu sync.Mutex
	u  gpu.Uses
}

func (c *useCounter) add(now time.Time) {
	c.mu.Lock()
	c.u = c.u.Add(now)
	c.mu.Unlock()
}

func (c *useCounter) load() gpu.Uses {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.u
}

// evictCost tells the scheduler what putting a model to sleep (or stopping
// it) would cost its clients when they come back, from what its runner
// measured: its recent wakes at the level it sleeps at and its recent cold
// starts (both from the request that asked to ready, as clients waited
// them), the level, and how often it is asked for. gpu.EvictionOrder
// weighs them.
func (r *runner) evictCost() gpu.Cost {
	st := r.status.Load()
	if st == nil {
		return gpu.Cost{}
	}
	return gpu.Cost{Wake: st.TypicalWake, Start: st.TypicalStartup, Level: st.WakeLevel, Uses: r.uses.load()}
}
