package supervisor

import (
	"context"
	"testing"
	"time"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
	"citadel-supervisor/supervisor/schedule"
)

// A scheduler driven by hand beside a machine: what the machine's effects
// tell it, in the order a runner carries them out (supervisor/schedule has
// the scheduler's own tests).

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
	s      *schedule.Scheduler
	placed chan placementTo
	quiet  chan quietAnswer
}

type placementTo struct {
	name string
	p    schedule.Placement
}

const oneGPU = "GPU-00000000-0000-0000-0000-000000000000"

func newSchedProbe(t *testing.T) *schedProbe {
	t.Helper()
	reader := staticReader{{UUID: oneGPU, Name: "Sim H100", MemoryTotal: 80 << 30, MemoryFree: 80 << 30, Up: true}}
	sp := &schedProbe{t: t, placed: make(chan placementTo, 64), quiet: make(chan quietAnswer, 64)}
	sp.s = schedule.New(schedule.Options{Reader: reader, ReleaseTimeout: 10 * time.Second, Out: schedule.OutboxFunc(func(name string, a schedule.Answer) {
		switch a := a.(type) {
		case schedule.Placement:
			sp.placed <- placementTo{name, a}
		case schedule.QuietAnswer:
			sp.quiet <- quietAnswer{name, a.Seq, a.OK, a.Reason}
		}
	})})
	ctx, cancel := context.WithCancel(context.Background())
	go sp.s.Run(ctx)
	t.Cleanup(func() { cancel(); <-sp.s.Done() })
	return sp
}

func schedModel(name string) config.Model {
	return config.Model{Name: name, Enabled: true, Activation: config.ActivationOnDemand, TensorParallel: 1, GPUMemoryUtilization: 0.3}
}

// next is the next answer for name: a placement with GPUs or a reason.
func (sp *schedProbe) next(name string) schedule.Placement {
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

// TestObserveSeesLeavingModels: a model a reload removed keeps its claim
// until its processes are gone, and the scheduler's answers still reach
// its runner (reachable); its processes are still its own in what the
// scheduler reads (a claim without them counts its share on top of the
// memory they hold) and in what the reaper asks of an orphan (accounts).
func TestObserveSeesLeavingModels(t *testing.T) {
	s := &Supervisor{d: &deps{}, leaving: map[string]*runner{}}
	s.cfg.Store(&config.Config{})
	listed, gone := &runner{name: "a"}, &runner{name: "b"}
	pa, pb := []int{11}, []int{22}
	listed.pids.Store(&pa)
	gone.pids.Store(&pb)
	s.runners.Store(&[]*runner{listed})
	s.leaving["b"] = gone
	obs := s.observe([]string{"a", "b"})
	if obs.PIDs[11] != "a" || obs.PIDs[22] != "b" {
		t.Fatalf("observed processes %v, want 11 of a and 22 of b (removed, still stopping)", obs.PIDs)
	}
}
