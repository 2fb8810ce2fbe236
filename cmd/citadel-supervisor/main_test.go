package main

import (
	"bytes"
	"citadel-supervisor/supervisor"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// The test binary plays three parts: the tests, the daemon (roleEnv) and
// the models (supervisortest.SelfEnv).
const roleEnv = "CITADEL_TEST_AS_DAEMON"

func TestMain(m *testing.M) {
	supervisortest.RunFakeIfAsked()
	supervisortest.ExitWithoutDelay()
	if os.Getenv(roleEnv) == "1" {
		// An upgrade test installs a copy of this binary with a version
		// beside it (restore_test.go).
		if exe, err := os.Executable(); err == nil {
			if v, err := os.ReadFile(exe + ".version"); err == nil {
				version = strings.TrimSpace(string(v))
			}
		}
		os.Exit(run(os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

var waitFor = supervisortest.WaitFor

type testModel = supervisortest.Model

// site is one daemon configuration in a temp dir.
type site struct {
	*supervisortest.Site
	t testing.TB
}

// oneSimGPU is the top of a config serving HTTP on port with one sim GPU.
func oneSimGPU(port int) string {
	return fmt.Sprintf(`listen: 127.0.0.1:%d
gpu:
  backend: sim
  sim:
    devices: [{uuid: GPU-00000000-0000-0000-0000-000000000000, name: Sim H100, memory: 80GiB}]
`, port)
}

func newSite(t *testing.T, models ...testModel) *site {
	t.Helper()
	return &site{Site: supervisortest.NewSite(t, "log: {level: debug}\ngpu: {backend: none}\n", models...), t: t}
}

// daemon is one running citadel-supervisor process.
type daemon struct {
	cmd  *exec.Cmd
	log  *supervisortest.SyncBuffer
	done chan struct{}
}

func (d *daemon) logText() string { return d.log.String() }

var _ supervisortest.Daemon = (*daemon)(nil)

// Done is closed when the daemon has exited.
func (d *daemon) Done() <-chan struct{} { return d.done }

// Exit says how the daemon exited and what it said last.
func (d *daemon) Exit() string {
	return fmt.Sprintf("pid %d, %s; its output ends:\n%s", d.cmd.Process.Pid, d.cmd.ProcessState, supervisortest.Tail(d.log.String(), 20))
}

// waitFor waits for cond, which the running daemon d is to bring about:
// it fails at once, with d's output, if d exits first.
func (d *daemon) waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	supervisortest.WaitOn(t, d, timeout, what, cond)
}

func (s *site) start() *daemon {
	s.t.Helper()
	return s.startArgs()
}

// startArgs starts a daemon with extra flags. Its cleanup kills the daemon
// if it still runs, and then whatever it left (killSite): a test that
// SIGKILLs its daemon leaves no model behind.
func (s *site) startArgs(args ...string) *daemon {
	s.t.Helper()
	return s.startWrapped(nil, args...)
}

// startWrapped starts the daemon through wrapper (a command that execs the
// rest, such as prlimit), with extra flags.
func (s *site) startWrapped(wrapper []string, args ...string) *daemon {
	s.t.Helper()
	argv := append(append(append([]string{}, wrapper...), os.Args[0], "--config", s.Path), args...)
	return s.startCmd(func(cmd *exec.Cmd) {
		cmd.Path, cmd.Args = argv[0], argv
		if lp, err := exec.LookPath(argv[0]); err == nil {
			cmd.Path = lp
		}
	})
}

// startCmd starts the daemon (this binary, --config) after prep has had
// its say on the command.
func (s *site) startCmd(prep func(cmd *exec.Cmd)) *daemon {
	s.t.Helper()
	cmd := exec.Command(os.Args[0], "--config", s.Path)
	cmd.Env = supervisortest.DaemonEnviron(roleEnv + "=1")
	if prep != nil {
		prep(cmd)
	}
	d := &daemon{cmd: cmd, log: &supervisortest.SyncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = d.log, d.log
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	go func() { cmd.Wait(); close(d.done) }() //nolint:errcheck // ProcessState says
	s.t.Cleanup(func() {
		if cmd.ProcessState == nil {
			// SIGTERM, so the daemon stops its models: a SIGKILL would
			// leave them running, orphaned, after the test.
			cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // best effort
			select {
			case <-d.done:
			case <-time.After(30 * time.Second):
				cmd.Process.Kill() //nolint:errcheck // best effort
				<-d.done
			}
		}
		killSite(s.Site)
		if s.t.Failed() {
			s.t.Logf("daemon %d output:\n%s", cmd.Process.Pid, d.log.String())
		}
	})
	return d
}

func (d *daemon) wait(t *testing.T) int {
	t.Helper()
	select {
	case <-d.done:
		return d.cmd.ProcessState.ExitCode()
	case <-time.After(30 * time.Second):
		t.Fatal("daemon did not exit within 30s")
		return -1
	}
}

// healthy reports whether every model answers /health.
func (s *site) healthy() bool {
	for _, m := range s.Models {
		resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(m.Port) + "/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return false
		}
	}
	return true
}

func (s *site) procs(model string) map[int]string { return s.PIDs(s.t, model) }

// allProcs is every process the models ever started: pid → role.
func (s *site) allProcs(models ...string) map[int]string {
	all := map[int]string{}
	for _, m := range models {
		for pid, r := range s.procs(m) {
			all[pid] = r
		}
	}
	return all
}

var live = supervisortest.Live

var stubborn = []string{"--fake-ignore-sigterm", "--fake-workers", "1", "--fake-detached-workers", "1", "--fake-worker-ignore-sigterm"}

func TestSIGTERMStopsEveryTreeAndExitsZero(t *testing.T) {
	s := newSite(t,
		testModel{Name: "a", Fake: stubborn},
		testModel{Name: "b", Fake: []string{"--fake-detached-workers", "2"}},
	)
	d := s.start()
	d.waitFor(t, 30*time.Second, "models healthy", s.healthy)
	d.waitFor(t, 10*time.Second, "all workers recorded", func() bool {
		return len(live(s.procs("a"), "")) == 3 && len(live(s.procs("b"), "")) == 3
	})
	all := s.allProcs("a", "b")

	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if code := d.wait(t); code != 0 {
		t.Errorf("exit code %d after SIGTERM, want 0", code)
	}
	if l := live(all, ""); len(l) != 0 {
		t.Errorf("processes alive after the daemon exited: %v", l)
	}
}

func TestSecondDaemonOnSameSocketRefuses(t *testing.T) {
	s := newSite(t, testModel{Name: "a"})
	first := s.start()
	first.waitFor(t, 30*time.Second, "model healthy", s.healthy)
	server := live(s.procs("a"), "server")

	second := s.start()
	if code := second.wait(t); code != 1 {
		t.Errorf("second daemon exit code %d, want 1", code)
	}
	if !strings.Contains(second.log.String(), "another citadel-supervisor is running with this control_socket") {
		t.Errorf("second daemon did not say why:\n%s", second.log.String())
	}
	// The first daemon's model was not touched.
	if now := live(s.procs("a"), "server"); len(now) != 1 || now[0] != server[0] {
		t.Errorf("model disturbed: before %v, after %v", server, now)
	}
	first.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // checked by wait
	first.wait(t)
}

func TestVersion(t *testing.T) {
	var out bytes.Buffer
	if code := run([]string{"--version"}, nil, &out, &out); code != 0 || !strings.HasPrefix(out.String(), "citadel-supervisor dev") {
		t.Errorf("exit %d: %q", code, out.String())
	}
}

func TestSIGHUPReloadsOverTheSocket(t *testing.T) {
	s := newSite(t, testModel{Name: "a"}, testModel{Name: "b"})
	d := s.start()
	c := client.New(s.Socket)
	ctx := context.Background()
	pids := func() map[string]int {
		st, err := c.Status(ctx)
		if err != nil {
			return nil
		}
		out := map[string]int{}
		for _, m := range st {
			if m.State == supervisor.Ready {
				out[m.Name] = m.PID
			}
		}
		return out
	}
	var before map[string]int
	d.waitFor(t, 30*time.Second, "both ready over the socket", func() bool {
		before = pids()
		return len(before) == 2
	})

	// An invalid file changes nothing.
	if err := os.WriteFile(s.Path, []byte(s.Edit(t, supervisortest.Set("bogus", 1))), 0o644); err != nil {
		t.Fatal(err)
	}
	d.cmd.Process.Signal(syscall.SIGHUP) //nolint:errcheck // the daemon's log says
	d.waitFor(t, 10*time.Second, "the rejection logged", func() bool {
		return strings.Contains(d.logText(), "bogus: unknown key")
	})
	if now := pids(); now["a"] != before["a"] || now["b"] != before["b"] {
		t.Errorf("invalid reload changed models: %v → %v", before, now)
	}

	// A valid change restarts only b.
	next := s.Edit(t, supervisortest.Set("models.b.env.EXTRA", "1"))
	if err := os.WriteFile(s.Path, []byte(next), 0o644); err != nil {
		t.Fatal(err)
	}
	d.cmd.Process.Signal(syscall.SIGHUP) //nolint:errcheck // checked below
	d.waitFor(t, 30*time.Second, "b restarted and ready", func() bool {
		now := pids()
		return len(now) == 2 && now["b"] != before["b"]
	})
	if now := pids(); now["a"] != before["a"] {
		t.Errorf("a restarted by a reload that did not change it: %d → %d", before["a"], now["a"])
	}
	d.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // checked by wait
	if code := d.wait(t); code != 0 {
		t.Errorf("exit %d", code)
	}
	if _, err := os.Stat(s.Socket); !os.IsNotExist(err) {
		t.Errorf("control socket left behind: %v", err)
	}
}

// specFamilies are the metric families of SPEC §6.
var specFamilies = []string{
	"citadel_model_up", "citadel_model_state", "citadel_model_restarts_total", "citadel_model_last_exit_code",
	"citadel_model_start_time_seconds", "citadel_model_startup_duration_seconds", "citadel_model_resident_memory_bytes",
	"citadel_model_cpu_seconds_total", "citadel_model_gpu_memory_bytes",
	"citadel_probe_success", "citadel_probe_duration_seconds", "citadel_probe_failures_total",
	"citadel_gpu_info", "citadel_gpu_up", "citadel_gpu_memory_total_bytes", "citadel_gpu_memory_used_bytes",
	"citadel_gpu_memory_free_bytes",
	"citadel_config_last_reload_successful", "citadel_config_last_reload_success_timestamp_seconds", "citadel_build_info",
	"go_goroutines", "process_resident_memory_bytes",
}

// The families that are not in specFamilies are covered elsewhere:
// citadel_gpu_xid_errors_total appears at the first Xid (gpu/nvmlgpu and
// gpu's golden test); utilization, temperature and power are not
// simulated (the gpu collector's golden test covers them).

func scrape(t *testing.T, url string) (string, map[string]*dto.MetricFamily) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("scrape: %d %v", resp.StatusCode, err)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parse exposition: %v", err)
	}
	return string(body), fams
}

func TestMetricsOfARunningDaemon(t *testing.T) {
	const secret = "hf_metrics_test_secret_value"
	port := supervisortest.FreePort(t)
	dir := t.TempDir()
	secrets := filepath.Join(dir, "secrets.env")
	if err := os.WriteFile(secrets, []byte("HF_TOKEN="+secret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := &site{Site: supervisortest.NewSite(t, oneSimGPU(port),
		testModel{Name: "a", YAML: "gpu_memory_utilization: 0.3\nenv_files: [" + secrets + "]"},
		testModel{Name: "b", YAML: "gpu_memory_utilization: 0.3"},
	), t: t}
	d := s.start()
	base := "http://127.0.0.1:" + strconv.Itoa(port)
	d.waitFor(t, 30*time.Second, "both models healthy", s.healthy)

	// b crashes once, so it has a last exit code.
	bServer := live(s.procs("b"), "server")
	syscall.Kill(bServer[0], syscall.SIGKILL) //nolint:errcheck // checked by the wait
	d.waitFor(t, 30*time.Second, "b restarted", func() bool {
		l := live(s.procs("b"), "server")
		return len(l) == 1 && l[0] != bServer[0] && s.healthy()
	})
	var body string
	var fams map[string]*dto.MetricFamily
	d.waitFor(t, 30*time.Second, "every SPEC family", func() bool {
		body, fams = scrape(t, base+"/metrics")
		for _, f := range specFamilies {
			if fams[f] == nil {
				return false
			}
		}
		return true
	})
	if strings.Contains(body, secret) {
		t.Error("a secret is on /metrics")
	}
	if got := value(fams["citadel_model_restarts_total"], "model=b", "reason=exit"); got != 1 {
		t.Errorf("b's exit restarts = %v", got)
	}
	if got := value(fams["citadel_model_last_exit_code"], "model=b"); got != 137 {
		t.Errorf("b's last exit code = %v", got)
	}
	// The daemon sees b ready at its next probe, a moment after we did.
	d.waitFor(t, 10*time.Second, "/readyz 200", func() bool {
		resp, err := http.Get(base + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
	for _, path := range []string{"/healthz", "/readyz", "/sd"} {
		resp, err := http.Get(base + path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || strings.Contains(string(b), secret) {
			t.Errorf("%s: %d %s", path, resp.StatusCode, b)
		}
		if path == "/sd" && !strings.Contains(string(b), `"targets":["127.0.0.1:`+strconv.Itoa(s.Models[0].Port)+`"],"labels":{`) ||
			path == "/sd" && !strings.Contains(string(b), `"model":"a"`) {
			t.Errorf("/sd: %s", b)
		}
	}
	resp, err := http.Post(base+"/metrics", "text/plain", nil)
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode != http.StatusMethodNotAllowed {
			t.Errorf("POST /metrics: %d", resp.StatusCode)
		}
	}

	// A reload that removes b leaves no series of b behind.
	next := s.Edit(t, supervisortest.Delete("models.b"))
	if err := os.WriteFile(s.Path, []byte(next), 0o644); err != nil {
		t.Fatal(err)
	}
	d.cmd.Process.Signal(syscall.SIGHUP) //nolint:errcheck // checked below
	d.waitFor(t, 30*time.Second, "b's series gone", func() bool {
		body, _ = scrape(t, base+"/metrics")
		return !strings.Contains(body, `model="b"`)
	})
	if !strings.Contains(body, `citadel_model_up{model="a"} 1`) {
		t.Errorf("a's series went too:\n%s", body)
	}
}

// value finds the sample of f whose labels include every "name=value".
func value(f *dto.MetricFamily, labels ...string) float64 {
	if f == nil {
		return -1
	}
next:
	for _, m := range f.Metric {
		have := map[string]string{}
		for _, l := range m.Label {
			have[l.GetName()] = l.GetValue()
		}
		for _, want := range labels {
			k, v, _ := strings.Cut(want, "=")
			if have[k] != v {
				continue next
			}
		}
		switch {
		case m.Gauge != nil:
			return m.Gauge.GetValue()
		case m.Counter != nil:
			return m.Counter.GetValue()
		}
	}
	return -1
}

// TestSystemdNotifySequence runs the daemon as systemd would, with a real
// notify socket: READY=1 once the control socket answers (not waiting for
// models), STATUS= kept current, RELOADING=1 + MONOTONIC_USEC then READY=1
// around a reload, STOPPING=1 at SIGTERM. NOTIFY_SOCKET must not reach a
// model.
// notifyMsg is one sd_notify datagram and when it arrived.
type notifyMsg struct {
	at   time.Time
	text string
}

// notifySocket is a systemd notify socket for a daemon under test: its
// path, and the datagrams as they arrive (closed with the socket, at the
// end of the test).
func notifySocket(t *testing.T) (string, <-chan notifyMsg) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	ns, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	msgs := make(chan notifyMsg, 1000)
	go func() {
		defer close(msgs)
		buf := make([]byte, 4096)
		for {
			n, err := ns.Read(buf)
			if err != nil {
				return
			}
			msgs <- notifyMsg{time.Now(), string(buf[:n])}
		}
	}()
	return path, msgs
}

func TestSystemdNotifySequence(t *testing.T) {
	sockPath, msgs := notifySocket(t)
	next := func(what string, ok func(string) bool) string {
		t.Helper()
		deadline := time.After(30 * time.Second)
		for {
			select {
			case m := <-msgs:
				if ok(m.text) {
					return m.text
				}
			case <-deadline:
				t.Fatalf("no %s from the daemon", what)
				return ""
			}
		}
	}

	envDump := filepath.Join(t.TempDir(), "env.json")
	s := newSite(t, testModel{Name: "a", Fake: []string{"--fake-load-time", "500ms", "--fake-env-file", envDump}})
	cmd := exec.Command(os.Args[0], "--config", s.Path)
	cmd.Env = supervisortest.DaemonEnviron(roleEnv+"=1", "NOTIFY_SOCKET="+sockPath, "WATCHDOG_USEC=2000000", "WATCHDOG_PID=")
	d := &daemon{cmd: cmd, log: &supervisortest.SyncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = d.log, d.log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { cmd.Wait(); close(d.done) }() //nolint:errcheck // ProcessState says
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill() //nolint:errcheck // best effort
			<-d.done
		}
		killSite(s.Site)
		if t.Failed() {
			t.Logf("daemon output:\n%s", d.log.String())
		}
	})

	next("READY=1", func(m string) bool { return m == "READY=1" })
	if _, err := os.Stat(s.Socket); err != nil {
		t.Errorf("READY=1 before the control socket exists: %v", err)
	}
	if s.healthy() {
		t.Error("READY=1 waited for the model (it must not)")
	}
	next("STATUS= with the model ready", func(m string) bool { return m == "STATUS=1/1 ready" })

	d.cmd.Process.Signal(syscall.SIGHUP) //nolint:errcheck // checked below
	next("RELOADING=1", func(m string) bool { return strings.HasPrefix(m, "RELOADING=1\nMONOTONIC_USEC=") })
	next("READY=1 after the reload", func(m string) bool { return m == "READY=1" })

	d.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // checked below
	next("STOPPING=1", func(m string) bool { return m == "STOPPING=1" })
	if code := d.wait(t); code != 0 {
		t.Errorf("exit %d", code)
	}
	b, err := os.ReadFile(envDump)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} {
		if strings.Contains(string(b), `"`+v+`"`) {
			t.Errorf("%s leaked into the model's environment", v)
		}
	}
}

// TestRepeatedDaemonSIGKILL kills the daemon again and again while its
// models start, run and crash, then starts it once more: exactly one copy
// of each model, nothing of the earlier incarnations, nothing after stop.
func TestRepeatedDaemonSIGKILL(t *testing.T) {
	s := newSite(t,
		testModel{Name: "steady"},
		testModel{Name: "crashy", YAML: "restart: {delay: 100ms, burst: 1000}", Fake: []string{"--fake-crash-after", "700ms"}},
		testModel{Name: "slow", Fake: []string{"--fake-load-time", "1s"}},
		testModel{Name: "stubborn", YAML: "stop_timeout: 300ms", Fake: stubborn},
	)
	for i, after := range []time.Duration{200 * time.Millisecond, 900 * time.Millisecond, 1500 * time.Millisecond, 2500 * time.Millisecond} {
		d := s.start()
		// Let it get somewhere: models starting, running, crashing.
		deadline := time.Now().Add(after)
		d.waitFor(t, after+10*time.Second, "time to pass", func() bool { return time.Now().After(deadline) })
		d.cmd.Process.Kill() //nolint:errcheck // checked by wait
		d.wait(t)
		t.Logf("round %d: daemon killed after %s", i, after)
	}
	old := s.allProcs("steady", "crashy", "slow", "stubborn")
	final := s.start()
	// Ask the new daemon itself: its models ready on processes of its own.
	c := client.New(s.Socket)
	current := map[int]bool{}
	final.waitFor(t, 30*time.Second, "steady, slow and stubborn ready", func() bool {
		st, err := c.Status(context.Background(), "steady", "slow", "stubborn")
		if err != nil {
			return false
		}
		for _, m := range st {
			if m.State != supervisor.Ready {
				return false
			}
			current[m.PID] = true
		}
		return true
	})
	// crashy's current process too (it may be an adopted one that has not
	// crashed yet), read after the others: an earlier process it had then
	// is not running by now.
	if st, err := c.Status(context.Background(), "crashy"); err == nil && len(st) == 1 && st[0].PID != 0 {
		current[st[0].PID] = true
	}
	// An earlier incarnation's server lives on only as a model's current
	// process (adopted); nothing else of theirs is left.
	for pid, role := range old {
		if role == "server" && supervisortest.Running(pid) && !current[pid] {
			t.Errorf("server %d of an earlier incarnation is alive and nobody's", pid)
		}
	}
	for _, m := range []string{"steady", "slow", "stubborn", "crashy"} {
		if n := len(live(s.procs(m), "server")); n > 1 {
			t.Errorf("%s: %d servers", m, n)
		}
	}
	if n := len(live(s.procs("stubborn"), "worker")); n != 2 {
		t.Errorf("stubborn: %d live workers, want its 2", n)
	}
	final.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // checked by wait
	if code := final.wait(t); code != 0 {
		t.Errorf("final daemon exit %d", code)
	}
	for _, m := range []string{"steady", "crashy", "slow", "stubborn"} {
		if l := live(s.procs(m), ""); len(l) != 0 {
			t.Errorf("%s: processes alive after the final stop: %v", m, l)
		}
	}
}

// TestAWaitSeesTheDaemonExit: a daemon that cannot start (another process
// holds its listen port, as another daemon on the host may) fails the
// test's wait at once, with the daemon's own words, rather than after the
// wait's deadline (an hour here).
func TestAWaitSeesTheDaemonExit(t *testing.T) {
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	s := &site{Site: supervisortest.NewSite(t, "listen: "+held.Addr().String()+"\n", testModel{Name: "a"}), t: t}
	d := s.start()
	client := &http.Client{Timeout: 100 * time.Millisecond}
	got := supervisortest.FailureOf(t, func(tb testing.TB) {
		d.waitFor(tb, time.Hour, "the daemon's /healthz", func() bool {
			resp, err := client.Get("http://" + held.Addr().String() + "/healthz")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == 200
		})
	})
	for _, want := range []string{"the daemon exited while the test waited for the daemon's /healthz: pid ", "exit status 1", "address already in use"} {
		if !strings.Contains(got, want) {
			t.Errorf("the wait's failure does not say %q:\n%s", want, got)
		}
	}
}
