// Package supervisortest holds what the tests of several packages share: a
// test binary that re-executes itself as fake-vllm, configurations of fake
// models in a temp dir, and bounded waits. Test code only.
package supervisortest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/supervisortest/fakevllm"
)

// SelfEnv, set in a model's env, makes the test binary act as fake-vllm
// when it is re-executed as that model (and as its workers, which inherit
// the environment).
const SelfEnv = "FAKE_VLLM_SELF"

// RunFakeIfAsked is the first thing a TestMain calls: in a re-executed
// model it runs fake-vllm and exits.
//
// A model or child started with an empty environment (command: [env, -i,
// ...]) is recognised by its first argument, --fake-self.
func RunFakeIfAsked() {
	if os.Getenv(SelfEnv) == "1" || (len(os.Args) > 1 && os.Args[1] == "--fake-self") {
		os.Exit(fakevllm.Main(os.Args[1:]))
	}
}

// ExitWithoutDelay makes the processes a test starts from now on exit at
// once when they are built with the race detector. By default
// (GORACE=atexit_sleep_ms=1000) every instrumented process sleeps a second
// at its exit, so that goroutines still running can report races; every
// fake model, daemon and client of the real-process tests is this test
// binary, built with -race, so each stop of a model took a second longer,
// and those seconds were most of a real-process test's time. A race is
// still reported when it happens, and the process still exits 66; only the
// wait at exit goes. A TestMain calls it before m.Run. Options the caller
// set in GORACE still win: they come after, and the last of an option
// counts.
func ExitWithoutDelay() {
	os.Setenv("GORACE", strings.TrimSpace("atexit_sleep_ms=0 "+os.Getenv("GORACE"))) //nolint:errcheck // cannot fail for this name
}

// daemonUnset are variables of this process's environment a daemon under
// test must not see: systemd's (a test run from a unit would hand the
// daemon the unit's notify socket, descriptors and directories); and the
// CITADEL_* overrides of the configuration's keys (CITADEL_LISTEN …) are
// left out by prefix.
var daemonUnset = []string{"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
	"INVOCATION_ID", "STATE_DIRECTORY", "CACHE_DIRECTORY", "RUNTIME_DIRECTORY", "SERVICE_RESULT"}

// DaemonEnviron is the environment for a daemon a test starts: this
// process's without what would make the daemon run on anything but its
// site's configuration and the test's own settings (see daemonUnset), and
// extra after it.
func DaemonEnviron(extra ...string) []string {
	var out []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(k, config.EnvPrefix) && !slices.Contains(daemonUnset, k) {
			out = append(out, kv)
		}
	}
	return append(out, extra...)
}

// WaitFor polls cond until it holds or d passes. Every wait in the tests has
// a deadline; none sleeps to synchronise. A wait for something a daemon
// does is WaitOn.
func WaitFor(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A Daemon is what a wait watches besides its condition: the daemon (a
// process, or a Supervisor's Run) the condition depends on. Once it has
// exited the condition will not come true, so WaitOn fails at once,
// saying so, rather than waiting out its deadline.
type Daemon interface {
	// Done is closed when the daemon has exited.
	Done() <-chan struct{}
	// Exit says how it exited, with the end of its output.
	Exit() string
}

// WaitOn is WaitFor on a daemon: it also fails as soon as d has exited
// with cond still false.
func WaitOn(t testing.TB, d Daemon, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-d.Done():
			if cond() {
				return
			}
			t.Fatalf("the daemon exited while the test waited for %s: %s", what, d.Exit())
		case <-deadline.C:
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		case <-tick.C:
		}
	}
}

// AnyOf is a Daemon that has exited once any of ds has: for a wait on
// what several daemons do together.
func AnyOf(ds ...Daemon) Daemon {
	a := &anyOf{ds: ds, done: make(chan struct{})}
	var once sync.Once
	for _, d := range ds {
		go func() {
			<-d.Done()
			once.Do(func() { close(a.done) })
		}()
	}
	return a
}

type anyOf struct {
	ds   []Daemon
	done chan struct{}
}

func (a *anyOf) Done() <-chan struct{} { return a.done }

func (a *anyOf) Exit() string {
	for _, d := range a.ds {
		select {
		case <-d.Done():
			return d.Exit()
		default:
		}
	}
	return "none has exited"
}

// FailureOf runs f as a test would, with a testing.TB whose failures are
// recorded instead of failing t (a Fatal ends f's goroutine, as in a
// test), and returns what f failed with, "" if nothing: for tests of the
// harness's own checks. f must return within two minutes.
func FailureOf(t testing.TB, f func(tb testing.TB)) string {
	t.Helper()
	r := &recorder{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		f(r)
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		t.Fatal("the function under test did not return within 2m")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Join(r.failures, "\n")
}

// recorder is a testing.TB that records failures; see FailureOf.
type recorder struct {
	testing.TB
	mu       sync.Mutex
	failures []string
}

func (r *recorder) Helper() {}

func (r *recorder) Errorf(format string, args ...any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failures = append(r.failures, fmt.Sprintf(format, args...))
}

func (r *recorder) Error(args ...any) { r.Errorf("%s", fmt.Sprint(args...)) }

func (r *recorder) Fatalf(format string, args ...any) {
	r.Errorf(format, args...)
	runtime.Goexit()
}

func (r *recorder) Fatal(args ...any) { r.Fatalf("%s", fmt.Sprint(args...)) }

func (r *recorder) FailNow() { r.Fatalf("FailNow") }

// Tail is the end of a daemon's output for a failure: its last n lines.
func Tail(out string, n int) string {
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("[%d lines before]", len(lines)-n)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

// FreePort returns a loopback port that was free a moment ago, and that
// it has not returned before in this process: the kernel may hand the
// same port to two listens in a row once the first is closed, and two
// "free" ports a test puts in one configuration must differ.
func FreePort(t testing.TB) int {
	t.Helper()
	for {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		freePorts.Lock()
		given := freePorts.given[port]
		freePorts.given[port] = true
		freePorts.Unlock()
		if !given {
			return port
		}
	}
}

// freePorts are the ports FreePort has returned.
var freePorts = struct {
	sync.Mutex
	given map[int]bool
}{given: map[int]bool{}}

// Model is one fake model of a test configuration.
type Model struct {
	Name string
	YAML string   // extra keys, one per line, e.g. "restart: {delay: 100ms}"
	Fake []string // fake-vllm flags
	Port int      // set by Config
}

// Site is a configuration of fake models in a temp dir.
type Site struct {
	Dir    string
	Path   string // the YAML file
	YAML   string
	Socket string
	Models []Model
	// Events is the fake models' shared event log (--fake-event-log).
	Events string
	// Ledger is the sim backend's usage_dir, the ledger of GPU memory the
	// fakes keep (gpu.SimLedger); "" without the sim backend.
	Ledger string
	// Tolerate lists the event kinds (oom, misuse) a test provokes on
	// purpose; any other is a failure at cleanup.
	Tolerate []string
}

// Defaults are the test defaults: fast probes and restarts.
const Defaults = `  stop_timeout: 2s
  restart: {delay: 50ms, max_delay: 1s, burst: 5, interval: 1m, retry_failed_after: 0s}
  probe: {period: 50ms, timeout: 1s, failure_threshold: 3, startup_timeout: 30s}
`

// NewSite writes a configuration for models: top's keys (YAML: gpu, the
// gateway, log …) and what the harness sets (see buildSite): no HTTP
// server and no gateway unless top asks for one, on a port from the kernel
// (a fixed port or a production default fails the test), backend none
// unless top says otherwise, the test binary as every model's command,
// free ports, model directories and a pid directory per model (see PIDs).
func NewSite(t testing.TB, top string, models ...Model) *Site {
	t.Helper()
	s := &Site{Dir: t.TempDir()}
	s.Socket = filepath.Join(s.Dir, "s.sock")
	s.Events = filepath.Join(s.Dir, "events.jsonl")
	spec := siteSpec{
		dir: s.Dir, socket: s.Socket, events: s.Events, cacheDir: filepath.Join(s.Dir, "cache"),
		ledger: filepath.Join(s.Dir, "gpu-ledger"), command: os.Args[0],
	}
	// Hold every chosen port until all are chosen: a port released at once
	// can be handed out again by the next request.
	var held []net.Listener
	defer func() {
		for _, ln := range held {
			ln.Close()
		}
	}()
	for _, m := range models {
		for _, d := range []string{"models/" + m.Name, "pids/" + m.Name} {
			if err := os.MkdirAll(filepath.Join(s.Dir, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, ln)
		m.Port = ln.Addr().(*net.TCPAddr).Port
		spec.models = append(spec.models, m)
	}
	root, ledger, err := buildSite(top, spec)
	if err != nil {
		t.Fatal(err)
	}
	if ledger != "" {
		if err := os.MkdirAll(ledger, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	s.Ledger, s.Models = ledger, spec.models
	if s.YAML, err = encode(root); err != nil {
		t.Fatal(err)
	}
	if err := checkListeners(s.YAML); err != nil {
		t.Fatal(err)
	}
	s.Path = filepath.Join(s.Dir, "supervisor.yaml")
	if err := os.WriteFile(s.Path, []byte(s.YAML), 0o644); err != nil {
		t.Fatal(err)
	}
	// What no test may leave unsaid: a model that ran out of GPU memory
	// (the supervisor overcommitted a GPU) or was misused (a request while
	// asleep, a sleep mid-request). Checked last: cleanups run in reverse,
	// so after the daemon and its models are gone.
	t.Cleanup(func() {
		for _, e := range s.ReadEvents(t) {
			if (e.Ev == "oom" || e.Ev == "misuse" || e.Ev == "profile_failed") && !slices.Contains(s.Tolerate, e.Ev) {
				t.Errorf("fake model %s (pid %d) reports %s: %v", e.Model, e.PID, e.Ev, e.More)
			}
		}
	})
	return s
}

// Edit returns the site's configuration with edits applied (Set, Delete);
// the test writes it where it wants it.
func (s *Site) Edit(t testing.TB, edits ...Edit) string {
	t.Helper()
	y, err := EditYAML(s.YAML, edits...)
	if err != nil {
		t.Fatal(err)
	}
	return y
}

// ReadEvents reads the fake models' event log.
func (s *Site) ReadEvents(t testing.TB) []fakevllm.Event {
	t.Helper()
	b, err := os.ReadFile(s.Events)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var out []fakevllm.Event
	for _, line := range bytes.Split(b, []byte("\n")) {
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var e fakevllm.Event
		if err := json.Unmarshal(line, &e); err != nil {
			t.Fatalf("event log %s: %v: %q", s.Events, err, line)
		}
		out = append(out, e)
	}
	return out
}

// PIDs lists every process a model ever started, from fake-vllm's own
// records (--fake-pid-dir): pid → "server" or "worker". The tests learn a
// model's processes from the model itself, not from the supervisor under
// test.
func (s *Site) PIDs(t testing.TB, model string) map[int]string {
	t.Helper()
	dir := filepath.Join(s.Dir, "pids", model)
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

// Running reports whether pid is a live process; a zombie is dead.
func Running(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	return len(f) > 0 && f[0] != "Z"
}

// Live returns the running pids of procs with role ("" for any). A PID
// the kernel has since given to another program is not counted: over a
// long run PIDs are reused (pid_max is often 32768), and every process a
// fake model starts has a --fake- flag (or is its pid-hopping shell) in its
// command line.
func Live(procs map[int]string, role string) []int {
	var out []int
	for pid, r := range procs {
		if Running(pid) && (role == "" || r == role) && fakeProcess(pid) {
			out = append(out, pid)
		}
	}
	return out
}

// fakeProcess reports whether pid's command line is fake-vllm's (or its
// pid-hopping shell's). An unreadable one counts as the fake's.
func fakeProcess(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	if err != nil {
		return true
	}
	return bytes.Contains(b, []byte("--fake-")) || bytes.Contains(b, []byte("hopper"))
}

// SyncBuffer collects output written by another goroutine (a child's
// stdout, a command run in the background) and can be read meanwhile.
type SyncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// FakeStats reads the sleep-mode counters of the fake-vllm on port
// (GET /fake/stats): served, refused_asleep, refused_sleeps, sleeps,
// wakes_l1, wakes_l2, host_bytes.
func FakeStats(t testing.TB, port int) map[string]float64 {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/fake/stats", port))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out map[string]float64
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	return out
}

// WaitGateway waits until the gateway at base, d's, answers GET
// /v1/models.
func WaitGateway(t testing.TB, d Daemon, base string) {
	t.Helper()
	WaitOn(t, d, 30*time.Second, "the gateway up", func() bool {
		resp, err := http.Get(base + "/v1/models")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
}

// FakeVenv makes a virtualenv in miniature whose interpreter is this test
// binary as fake-vllm (bin/python3, a link) and whose site-packages hold
// vllm-VERSION.dist-info: a model whose command is that python is learned
// as VERSION before it starts, and its fake-vllm plays VERSION. A test
// binary only acts as fake-vllm with SelfEnv in the model's env, which
// NewSite's defaults set. Returns the interpreter's path.
func FakeVenv(t testing.TB, version string) string {
	t.Helper()
	venv := filepath.Join(t.TempDir(), "vllm-"+version)
	bin := filepath.Join(venv, "bin")
	info := filepath.Join(venv, "lib", "python3.12", "site-packages", "vllm-"+version+".dist-info")
	for _, d := range []string{bin, info} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(info, "METADATA"), []byte("Metadata-Version: 2.1\nName: vllm\nVersion: "+version+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	python := filepath.Join(bin, "python3")
	if err := os.Symlink(os.Args[0], python); err != nil {
		t.Fatal(err)
	}
	return python
}
