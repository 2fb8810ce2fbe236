package supervisor

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"citadel-supervisor/cmd/fake-vllm/fakevllm"
	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
	"citadel-supervisor/probe"
)

// selfEnv makes this test binary act as fake-vllm when it is re-executed as
// a model (and as that model's workers, which inherit the environment).
const selfEnv = "FAKE_VLLM_SELF"

// testReaper is the process's one Reaper: the test binary is the
// supervisor's parent process here, so it is the subreaper.
var testReaper *Reaper

func TestMain(m *testing.M) {
	if os.Getenv(selfEnv) == "1" {
		os.Exit(fakevllm.Main(os.Args[1:]))
	}
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

// waitFor polls cond until it holds or the deadline passes. Every wait in
// these tests has a deadline; none sleeps to synchronise.
func waitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// harness runs a Supervisor over fake-vllm models in a temp dir.
type harness struct {
	t      testing.TB
	dir    string
	cfg    *config.Config
	sup    *Supervisor
	cancel context.CancelFunc
	done   chan error
}

// modelSpec is one test model: YAML lines under its key, and fake flags.
type modelSpec struct {
	name string
	yaml string   // extra YAML keys, e.g. "restart: {delay: 100ms}"
	fake []string // fake-vllm flags
}

// newHarness writes a config for specs (ports chosen free, paths created)
// and returns it unstarted.
func newHarness(t testing.TB, specs ...modelSpec) *harness {
	t.Helper()
	dir := t.TempDir()
	var b strings.Builder
	fmt.Fprintf(&b, "listen: \"\"\ncontrol_socket: %s\ngpu: {backend: none}\n", filepath.Join(dir, "s.sock"))
	fmt.Fprintf(&b, "defaults:\n  command: [%q]\n  env: {%s: \"1\"}\n", os.Args[0], selfEnv)
	b.WriteString("  stop_timeout: 2s\n  restart: {delay: 50ms, max_delay: 1s, burst: 5, interval: 1m, retry_failed_after: 0s}\n")
	b.WriteString("  probe: {period: 50ms, timeout: 1s, failure_threshold: 3, startup_timeout: 30s}\nmodels:\n")
	for i, s := range specs {
		mdir := filepath.Join(dir, "models", s.name)
		pids := filepath.Join(dir, "pids", s.name)
		for _, d := range []string{mdir, pids} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		args := append([]string{"--fake-pid-dir", pids}, s.fake...)
		// vllm_port set explicitly: the value derived from random ports
		// could clash between models, which validation rightly refuses.
		fmt.Fprintf(&b, "  %s:\n    model: %s\n    port: %d\n    vllm_port: %d\n    args: [%s]\n",
			s.name, mdir, freePort(t), 20000+config.VLLMPortBlock*i, quoteAll(args))
		for _, line := range strings.Split(strings.TrimSpace(s.yaml), "\n") {
			if line != "" {
				fmt.Fprintf(&b, "    %s\n", line)
			}
		}
	}
	cfg, err := config.Parse([]byte(b.String()), nil)
	if err != nil {
		t.Fatalf("test config:\n%s\n%v", b.String(), err)
	}
	return &harness{t: t, dir: dir, cfg: cfg}
}

func quoteAll(ss []string) string {
	q := make([]string, len(ss))
	for i, s := range ss {
		q[i] = strconv.Quote(s)
	}
	return strings.Join(q, ", ")
}

// start runs the supervisor; Cleanup stops it and checks Run's result.
func (h *harness) start(o Options) *harness {
	h.t.Helper()
	if o.Logger == nil {
		o.Logger = zaptest.NewLogger(h.t, zaptest.Level(zap.WarnLevel))
	}
	if o.Placer == nil {
		o.Placer = gpu.NewStatic(h.cfg)
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
	h.done = make(chan error, 1)
	go func() { h.done <- sup.Run(ctx) }()
	h.t.Cleanup(func() { h.stop() })
	select {
	case <-sup.Ready():
	case err := <-h.done:
		h.t.Fatalf("Run returned early: %v", err)
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
	case err := <-h.done:
		if err != nil {
			h.t.Errorf("Run: %v", err)
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
	waitFor(h.t, d, fmt.Sprintf("%s to be %s", name, want), func() bool {
		st = h.status(name)
		return st.State == want
	})
	return st
}

// procs lists every process a model started, from fake-vllm's own records:
// pid → role ("server" or "worker").
func (h *harness) procs(name string) map[int]string {
	h.t.Helper()
	return readPIDDir(h.t, filepath.Join(h.dir, "pids", name))
}

func readPIDDir(t testing.TB, dir string) map[int]string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]string{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		role, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		out[pid] = string(role)
	}
	return out
}

// running reports whether pid is a live (non-zombie) process.
func running(pid int) bool {
	s, err := readStat(pid)
	return err == nil && s.State != 'Z'
}

// liveOf returns the live pids of procs, by role.
func liveOf(procs map[int]string, role string) []int {
	var out []int
	for pid, r := range procs {
		if running(pid) && (role == "" || r == role) {
			out = append(out, pid)
		}
	}
	return out
}
