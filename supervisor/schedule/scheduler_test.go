package schedule

import (
	"context"
	"strings"
	"testing"
	"time"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
)

// The scheduler alone, driven as runners drive it: its answers are what
// a quiet GPU rests on (docs/on-demand.md, "Quiet GPUs").

type staticReader []gpu.Device

func (r staticReader) Read(context.Context) ([]gpu.Device, error) { return r, nil }

type quietAnswer struct {
	name   string
	seq    int
	ok     bool
	reason string
}

type schedProbe struct {
	t      *testing.T
	s      *Scheduler
	placed chan placementTo
	quiet  chan quietAnswer
}

type placementTo struct {
	name string
	p    Placement
}

const oneGPU = "GPU-00000000-0000-0000-0000-000000000000"

func newSchedProbe(t *testing.T) *schedProbe {
	t.Helper()
	reader := staticReader{{UUID: oneGPU, Name: "Sim H100", MemoryTotal: 80 << 30, MemoryFree: 80 << 30, Up: true}}
	sp := &schedProbe{t: t, placed: make(chan placementTo, 64), quiet: make(chan quietAnswer, 64)}
	s := New(Options{Reader: reader, ReleaseTimeout: 10 * time.Second, Out: OutboxFunc(func(name string, a Answer) {
		switch a := a.(type) {
		case Placement:
			sp.placed <- placementTo{name, a}
		case QuietAnswer:
			sp.quiet <- quietAnswer{name, a.Seq, a.OK, a.Reason}
		}
	})})
	sp.s = s
	ctx, cancel := context.WithCancel(context.Background())
	go s.Run(ctx)
	t.Cleanup(func() { cancel(); <-s.Done() })
	return sp
}

func schedModel(name string) config.Model {
	return config.Model{Name: name, Enabled: true, Activation: config.ActivationOnDemand, TensorParallel: 1, GPUMemoryUtilization: 0.3}
}

// next is the next answer for name: a placement with GPUs or a reason.
func (sp *schedProbe) next(name string) Placement {
	sp.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case a := <-sp.placed:
			if a.name == name {
				return a.p
			}
		case <-deadline:
			sp.t.Fatalf("no answer for %s within 10s", name)
		}
	}
}

// granted waits until name is given GPUs.
func (sp *schedProbe) granted(name string) {
	sp.t.Helper()
	for p := sp.next(name); p.GPUs == nil; p = sp.next(name) {
	}
}

func (sp *schedProbe) quietAnswer(name string) quietAnswer {
	sp.t.Helper()
	select {
	case a := <-sp.quiet:
		if a.name != name {
			sp.t.Fatalf("a quiet answer for %s, want one for %s", a.name, name)
		}
		return a
	case <-time.After(10 * time.Second):
		sp.t.Fatalf("no quiet answer for %s within 10s", name)
	}
	return quietAnswer{}
}

// noQuietAnswer checks that nothing answered a quiet request by now: the
// scheduler has decided on everything sent before it.
func (sp *schedProbe) noQuietAnswer() {
	sp.t.Helper()
	handled := make(chan struct{})
	sp.s.send(func() { close(handled) })
	<-handled
	select {
	case a := <-sp.quiet:
		sp.t.Fatalf("quiet answered %+v; want no answer yet", a)
	default:
	}
}

// TestDeclinedEvictionKeepsAChangeBusy: a model whose quiet GPUs were
// granted (its sleep or stop has begun) declines an eviction decided
// meanwhile. The decline withdraws the eviction only: its GPU stays busy
// while its memory changes, so no start is placed there until it has
// slept. Before, the decline cleared the change, and a neighbour began to
// load while the model went to sleep beside it: vLLM aborts that load
// (vllm#56830), which the swap soak found.
func TestDeclinedEvictionKeepsAChangeBusy(t *testing.T) {
	sp := newSchedProbe(t)
	a, b := schedModel("a"), schedModel("b")
	sp.s.Want(a, 1, nil)
	sp.granted("a")
	sp.s.Ready("a", time.Now())
	sp.s.Quiet("a", 1)
	if q := sp.quietAnswer("a"); !q.ok {
		t.Fatalf("quiet for a: %+v; want granted", q)
	}
	sp.s.Declined("a")
	sp.s.Want(b, 1, nil)
	if p := sp.next("b"); p.GPUs != nil || !strings.Contains(p.Reason, "a is giving its memory back") {
		t.Fatalf("b while a goes to sleep: %+v; want it to wait for a", p)
	}
	sp.s.Slept("a")
	sp.granted("b")
}

// TestNoQuietWhileModelsAreTakenOver: after an upgrade or a crash, every
// runner tells the scheduler what its model holds, each in its own time.
// A model whose stop waits for quiet GPUs is not answered until all have:
// before, a sleeper taken over first was granted quiet GPUs, and stopped,
// beside a neighbour still loading whose runner had not told yet.
func TestNoQuietWhileModelsAreTakenOver(t *testing.T) {
	sp := newSchedProbe(t)
	sp.s.Restoring()
	sp.s.Adopt(schedModel("a"), []string{oneGPU}, gpu.Asleep, time.Time{}, false)
	sp.s.Quiet("a", 1)
	sp.noQuietAnswer()
	sp.s.Adopt(schedModel("b"), []string{oneGPU}, gpu.Starting, time.Time{}, false)
	sp.s.Restored()
	if q := sp.quietAnswer("a"); q.ok || !strings.Contains(q.reason, "b, which is starting") {
		t.Fatalf("quiet for a while b loads: %+v; want it to wait for b", q)
	}
	sp.s.Ready("b", time.Now())
	// (A reading in between names the GPU anew: the same wait, said again.)
	for q := sp.quietAnswer("a"); !q.ok; q = sp.quietAnswer("a") {
		if !strings.Contains(q.reason, "b, which is starting") {
			t.Fatalf("quiet for a: %+v; want it granted once b is ready", q)
		}
	}
}
