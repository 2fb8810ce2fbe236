package supervisor

import (
	"sync"

	"citadel-supervisor/supervisor/gateway"
	"citadel-supervisor/supervisor/lifecycle"
)

// changes broadcasts "something changed" to any number of watchers: each
// takes the current channel, and the next notify closes it and starts a
// new one. Nobody blocks and no change is queued: a watcher re-reads the
// snapshots after every close. The zero value is ready to use.
type changes struct {
	mu sync.Mutex
	ch chan struct{}
}

// wait returns a channel closed at the next notify.
func (c *changes) wait() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ch == nil {
		c.ch = make(chan struct{})
	}
	return c.ch
}

// notify wakes every watcher.
func (c *changes) notify() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ch != nil {
		close(c.ch)
		c.ch = nil
	}
}

// Gateway is the supervisor as the gateway sees it: every configured
// model's state and upstream, and a signal at each change.
func (s *Supervisor) Gateway() gateway.Models { return gatewayView{s} }

type gatewayView struct{ s *Supervisor }

var _ gateway.Models = gatewayView{}

func (v gatewayView) Changed() <-chan struct{} { return v.s.d.changes.wait() }

func (v gatewayView) Demand(name string) { v.s.Demand(name) }

// Models reads the configuration in force and each runner's published
// status. A model whose runner is not published yet (the daemon is
// starting, or a reload is adding it) is pending.
func (v gatewayView) Models() []gateway.Model {
	cfg := v.s.cfg.Load()
	st := map[string]*Status{}
	keys := map[string]string{}
	for _, r := range *v.s.runners.Load() {
		st[r.name] = r.status.Load()
		keys[r.name] = r.key()
	}
	out := make([]gateway.Model, 0, len(cfg.Models))
	for _, m := range cfg.Models {
		gm := gateway.Model{
			Name: m.Name, ServedName: m.ServedName, Upstream: baseURL(m),
			Enabled: m.Enabled, MaxConcurrency: m.MaxConcurrency,
			State: string(Pending), Reason: "supervisor starting",
			Root: m.Path, MaxModelLen: m.MaxModelLen, APIKey: keys[m.Name],
		}
		gm.Loading.Bound = m.Probe.StartupTimeout
		if s := st[m.Name]; s != nil {
			gm.State, gm.Reason = string(s.State), s.Reason
			gm.OnDemand, gm.Held, gm.Seq = s.OnDemand, s.Held, s.Seq
			gm.Loading.Began, gm.Loading.Typical = s.LoadBegan, s.TypicalStartup
			// Readiness is seen at a probe: up to one startup poll late.
			gm.Loading.Poll = min(m.Probe.Period, lifecycle.MaxStartupPoll)
			if s.State == Sleeping || s.State == Waking {
				gm.Loading.Waking, gm.Loading.Level, gm.Loading.Typical = true, s.WakeLevel, s.TypicalWake
				gm.Loading.Poll = 0 // a wake ends with its canary, not a probe
			}
			gm.VLLMVersion = s.VLLMVersion
		}
		out = append(out, gm)
	}
	return out
}

func (v gatewayView) Unwanted(name string) { v.s.Unwanted(name) }
