// Package scheduletest drives a scheduler by hand on one simulated GPU and
// collects its answers, for the scheduler's own tests and for tests of
// what runs beside it (a model's machine, told what the scheduler says).
// Test code only.
package scheduletest

import (
	"context"
	"testing"
	"time"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
	"citadel-supervisor/supervisor/schedule"
)

// GPU is the UUID of the probe's one GPU, an 80 GiB H100, all of it free.
const GPU = "GPU-00000000-0000-0000-0000-000000000000"

// Reader answers every GPU reading with the same devices.
type Reader []gpu.Device

// Read returns the devices.
func (r Reader) Read(context.Context) ([]gpu.Device, error) { return r, nil }

// Quiet is the scheduler's answer to a model's request for quiet GPUs.
type Quiet struct {
	Model string
	schedule.QuietAnswer
}

// Probe is a running scheduler and what it has answered, by kind.
type Probe struct {
	S      *schedule.Scheduler
	t      testing.TB
	placed chan placed
	quiet  chan Quiet
}

type placed struct {
	model string
	p     schedule.Placement
}

// New runs a scheduler on GPU until the test ends.
func New(t testing.TB) *Probe {
	t.Helper()
	reader := Reader{{UUID: GPU, Name: "Sim H100", MemoryTotal: 80 << 30, MemoryFree: 80 << 30, Up: true}}
	p := &Probe{t: t, placed: make(chan placed, 64), quiet: make(chan Quiet, 64)}
	p.S = schedule.New(schedule.Options{Reader: reader, ReleaseTimeout: 10 * time.Second, Out: schedule.OutboxFunc(func(name string, a schedule.Answer) {
		switch a := a.(type) {
		case schedule.Placement:
			p.placed <- placed{name, a}
		case schedule.QuietAnswer:
			p.quiet <- Quiet{name, a}
		}
	})})
	ctx, cancel := context.WithCancel(context.Background())
	go p.S.Run(ctx)
	t.Cleanup(func() { cancel(); <-p.S.Done() })
	return p
}

// Model is an on-demand model that takes 30 % of a GPU.
func Model(name string) config.Model {
	return config.Model{Name: name, Enabled: true, Activation: config.ActivationOnDemand, TensorParallel: 1, GPUMemoryUtilization: 0.3}
}

// Next is the next placement for name: GPUs, or why it waits.
func (p *Probe) Next(name string) schedule.Placement {
	p.t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case a := <-p.placed:
			if a.model == name {
				return a.p
			}
		case <-deadline:
			p.t.Fatalf("no answer for %s within 10s", name)
		}
	}
}

// Granted waits until name is given GPUs.
func (p *Probe) Granted(name string) {
	p.t.Helper()
	for a := p.Next(name); a.GPUs == nil; a = p.Next(name) {
	}
}

// Quiet is the next quiet answer, which must be name's.
func (p *Probe) Quiet(name string) Quiet {
	p.t.Helper()
	select {
	case a := <-p.quiet:
		if a.Model != name {
			p.t.Fatalf("a quiet answer for %s, want one for %s", a.Model, name)
		}
		return a
	case <-time.After(10 * time.Second):
		p.t.Fatalf("no quiet answer for %s within 10s", name)
	}
	return Quiet{}
}

// NoQuiet checks that no quiet answer has come by the time the scheduler
// has decided on everything sent to it before (sync: schedule's Sync).
func (p *Probe) NoQuiet(sync func()) {
	p.t.Helper()
	sync()
	select {
	case a := <-p.quiet:
		p.t.Fatalf("quiet answered %+v; want no answer yet", a)
	default:
	}
}
