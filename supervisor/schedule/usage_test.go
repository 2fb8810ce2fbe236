package schedule

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
)

// The eviction data as the scheduler reads it (Observation): an on-demand
// model past its min_awake is put to sleep for a want that does not fit;
// within it, or not on demand, it is not (docs/on-demand.md, "Making room:
// eviction without thrash").

// oneGPU answers every reading with the same devices.
type oneGPU []gpu.Device

func (r oneGPU) Read(context.Context) ([]gpu.Device, error) { return r, nil }

type usageProbe struct {
	mu  sync.Mutex
	obs Observation
	out chan answerTo
}

type answerTo struct {
	name string
	a    Answer
}

func (p *usageProbe) set(o Observation) {
	p.mu.Lock()
	p.obs = o
	p.mu.Unlock()
}

func (p *usageProbe) Observe([]string) Observation {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.obs
}

// until returns the first answer that ok accepts, failing after 10s.
func (p *usageProbe) until(t *testing.T, what string, ok func(answerTo) bool) answerTo {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case a := <-p.out:
			if ok(a) {
				return a
			}
		case <-deadline:
			t.Fatalf("no %s within 10s", what)
		}
	}
}

func TestEvictionFollowsUsage(t *testing.T) {
	big := func(name string) config.Model {
		return config.Model{Name: name, Enabled: true, Activation: config.ActivationOnDemand, TensorParallel: 1, GPUMemoryUtilization: 0.6}
	}
	for _, tc := range []struct {
		name  string
		usage map[string]Usage
		evict bool
	}{
		{"past min_awake", map[string]Usage{"a": {MinAwake: time.Second}}, true},
		{"within min_awake", map[string]Usage{"a": {MinAwake: time.Hour}}, false},
		{"not on demand", map[string]Usage{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &usageProbe{out: make(chan answerTo, 64)}
			p.set(Observation{Usage: tc.usage})
			reader := oneGPU{{UUID: "GPU-0", Name: "Sim H100", MemoryTotal: 80 << 30, MemoryFree: 80 << 30, Up: true}}
			now := time.Now()
			s := New(Options{Reader: reader, ReleaseTimeout: 10 * time.Second, Models: p, Out: OutboxFunc(func(name string, a Answer) { p.out <- answerTo{name, a} }),
				Now: func() time.Time { return now }})
			ctx, cancel := context.WithCancel(context.Background())
			go s.Run(ctx)
			t.Cleanup(func() { cancel(); <-s.Done() })

			s.Want(big("a"), 1, nil)
			p.until(t, "GPUs for a", func(a answerTo) bool {
				pl, ok := a.a.(Placement)
				return a.name == "a" && ok && pl.GPUs != nil
			})
			s.Ready("a", now.Add(-time.Minute))
			s.Want(big("b"), 1, nil)
			if tc.evict {
				got := p.until(t, "an eviction", func(a answerTo) bool { _, ok := a.a.(Eviction); return ok })
				if got.name != "a" || got.a != (Eviction{For: "b"}) {
					t.Fatalf("evicted %s: %+v; want a, for b", got.name, got.a)
				}
				return
			}
			p.until(t, "a wait for b", func(a answerTo) bool {
				pl, ok := a.a.(Placement)
				return a.name == "b" && ok && strings.Contains(pl.Reason, "needs")
			})
			Sync(s)
			for {
				select {
				case a := <-p.out:
					if _, ok := a.a.(Eviction); ok {
						t.Fatalf("%s evicted (%+v); want no eviction", a.name, a.a)
					}
					continue
				default:
				}
				break
			}
		})
	}
}
