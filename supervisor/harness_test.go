package supervisor

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"citadel-supervisor/config"
	"citadel-supervisor/probe"
	"citadel-supervisor/supervisor/supervisortest"
)

// testReaper is the process's one Reaper: the test binary is the
// supervisor's parent process here, so it is the subreaper.
var testReaper *Reaper

func TestMain(m *testing.M) {
	supervisortest.RunFakeIfAsked()
	supervisortest.ExitWithoutDelay()
	r, err := NewReaper()
	if err != nil {
		fmt.Fprintln(os.Stderr, "NewReaper:", err)
		os.Exit(1)
	}
	testReaper = r
	ctx, cancel := context.WithCancel(context.Background())
	go r.Run(ctx) //nolint:errcheck // returns nil at cancel
	code := m.Run()
	cancel()
	os.Exit(code)
}

var waitFor = supervisortest.WaitFor

const selfEnv = supervisortest.SelfEnv

// modelSpec is one fake model of a harness.
type modelSpec = supervisortest.Model

// harness runs a Supervisor over fake-vllm models in a temp dir.
type harness struct {
	t      testing.TB
	site   *supervisortest.Site
	dir    string
	cfg    *config.Config
	sup    *Supervisor
	cancel context.CancelFunc
	exited chan struct{} // closed when Run has returned
	runErr error         // what it returned
}

var _ supervisortest.Daemon = (*harness)(nil)

// Done is closed when the supervisor's Run has returned.
func (h *harness) Done() <-chan struct{} { return h.exited }

// Exit says what Run returned.
func (h *harness) Exit() string { return fmt.Sprintf("Run returned %v", h.runErr) }

// waitFor waits for cond, which the running supervisor is to bring about:
// it fails at once if Run returns first.
func (h *harness) waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	supervisortest.WaitOn(t, h, d, what, cond)
}

// newHarness writes a config for specs and returns it unstarted.
func newHarness(t testing.TB, specs ...modelSpec) *harness {
	t.Helper()
	return newHarnessWith(t, "", specs...)
}

// newHarnessWith is newHarness with top-level YAML (gpu: …) of its own.
func newHarnessWith(t testing.TB, top string, specs ...modelSpec) *harness {
	t.Helper()
	site := supervisortest.NewSite(t, top, specs...)
	cfg, err := config.Parse([]byte(site.YAML), nil)
	if err != nil {
		t.Fatalf("test config:\n%s\n%v", site.YAML, err)
	}
	return &harness{t: t, site: site, dir: site.Dir, cfg: cfg}
}

// start runs the supervisor; Cleanup stops it and checks Run's result.
func (h *harness) start(o Options) *harness {
	h.t.Helper()
	if o.Logger == nil {
		o.Logger = zaptest.NewLogger(h.t, zaptest.Level(zap.WarnLevel))
	}
	if o.Prober == nil {
		o.Prober = probe.NewHTTP()
	}
	o.Reaper = testReaper
	if o.Environ == nil {
		o.Environ = os.Environ()
	}
	sup, err := New(h.cfg, o)
	if err != nil {
		h.t.Fatal(err)
	}
	h.sup = sup
	ctx, cancel := context.WithCancel(context.Background())
	h.cancel = cancel
	h.exited = make(chan struct{})
	go func() {
		h.runErr = sup.Run(ctx)
		close(h.exited)
	}()
	h.t.Cleanup(func() { h.stop() })
	select {
	case <-sup.Ready():
	case <-h.exited:
		h.t.Fatalf("Run returned early: %v", h.runErr)
	case <-time.After(10 * time.Second):
		h.t.Fatal("supervisor not running after 10s")
	}
	return h
}

// stop cancels Run and waits for it; idempotent.
func (h *harness) stop() {
	if h.cancel == nil {
		return
	}
	h.cancel()
	h.cancel = nil
	select {
	case <-h.exited:
		if h.runErr != nil {
			h.t.Errorf("Run: %v", h.runErr)
		}
	case <-time.After(30 * time.Second):
		h.t.Error("Run did not return within 30s of cancel")
	}
}

func (h *harness) status(name string) Status {
	h.t.Helper()
	st, err := h.sup.Status(name)
	if err != nil || len(st) != 1 {
		h.t.Fatalf("Status(%s): %v %v", name, st, err)
	}
	return st[0]
}

func (h *harness) waitState(name string, want State, d time.Duration) Status {
	h.t.Helper()
	var st Status
	h.waitFor(h.t, d, fmt.Sprintf("%s to be %s", name, want), func() bool {
		st = h.status(name)
		return st.State == want
	})
	return st
}

// procs lists every process a model started: pid → role.
func (h *harness) procs(name string) map[int]string {
	h.t.Helper()
	return h.site.PIDs(h.t, name)
}

// running reports whether pid is a live (non-zombie) process.
var running = supervisortest.Running

// liveOf returns the live pids of procs, by role.
var liveOf = supervisortest.Live
