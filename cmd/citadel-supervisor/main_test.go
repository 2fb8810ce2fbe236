package main

import (
	"bytes"
	"fmt"
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

	"citadel-supervisor/cmd/fake-vllm/fakevllm"
)

// The test binary plays three parts: the tests, the daemon (roleEnv) and
// the models (fakeEnv, set in the models' env so their workers inherit it).
const (
	roleEnv = "CITADEL_TEST_AS_DAEMON"
	fakeEnv = "FAKE_VLLM_SELF"
)

func TestMain(m *testing.M) {
	if os.Getenv(fakeEnv) == "1" {
		os.Exit(fakevllm.Main(os.Args[1:]))
	}
	if os.Getenv(roleEnv) == "1" {
		os.Exit(run(os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

type testModel struct {
	name string
	port int
	fake []string
}

// site is one daemon configuration in a temp dir.
type site struct {
	t      *testing.T
	dir    string
	config string
	models []testModel
}

func newSite(t *testing.T, models ...testModel) *site {
	t.Helper()
	s := &site{t: t, dir: t.TempDir(), models: models}
	var b strings.Builder
	fmt.Fprintf(&b, "listen: \"\"\ncontrol_socket: %s\nlog: {level: debug}\ngpu: {backend: none}\n", filepath.Join(s.dir, "s.sock"))
	fmt.Fprintf(&b, "defaults:\n  command: [%q]\n  env: {%s: \"1\"}\n  stop_timeout: 1s\n", os.Args[0], fakeEnv)
	b.WriteString("  restart: {delay: 100ms}\n  probe: {period: 100ms, timeout: 1s}\nmodels:\n")
	for i := range s.models {
		m := &s.models[i]
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		m.port = ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		for _, d := range []string{"models/" + m.name, "pids/" + m.name} {
			if err := os.MkdirAll(filepath.Join(s.dir, d), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		args := append([]string{"--fake-pid-dir", filepath.Join(s.dir, "pids", m.name)}, m.fake...)
		fmt.Fprintf(&b, "  %s: {model: %s, port: %d, vllm_port: %d, args: [%s]}\n",
			m.name, filepath.Join(s.dir, "models", m.name), m.port, 20000+16*i, strings.Join(args, ", "))
	}
	s.config = filepath.Join(s.dir, "supervisor.yaml")
	if err := os.WriteFile(s.config, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return s
}

// daemon is one running citadel-supervisor process.
type daemon struct {
	cmd  *exec.Cmd
	log  *bytes.Buffer
	done chan struct{}
}

func (s *site) start() *daemon {
	s.t.Helper()
	cmd := exec.Command(os.Args[0], "--config", s.config)
	cmd.Env = append(os.Environ(), roleEnv+"=1")
	d := &daemon{cmd: cmd, log: &bytes.Buffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = d.log, d.log
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	go func() { cmd.Wait(); close(d.done) }() //nolint:errcheck // ProcessState says
	s.t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill() //nolint:errcheck // best effort
			<-d.done
		}
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
	for _, m := range s.models {
		resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(m.port) + "/health")
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

// procs lists every process each model ever started: pid → role.
func (s *site) procs(model string) map[int]string {
	s.t.Helper()
	dir := filepath.Join(s.dir, "pids", model)
	ents, err := os.ReadDir(dir)
	if err != nil {
		s.t.Fatal(err)
	}
	out := map[int]string{}
	for _, e := range ents {
		pid, _ := strconv.Atoi(e.Name())
		role, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		out[pid] = string(role)
	}
	return out
}

// running reports whether pid is a live process (zombies are dead).
func running(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	return len(f) > 0 && f[0] != "Z"
}

func live(procs map[int]string, role string) []int {
	var out []int
	for pid, r := range procs {
		if running(pid) && (role == "" || r == role) {
			out = append(out, pid)
		}
	}
	return out
}

var stubborn = []string{"--fake-ignore-sigterm", "--fake-workers", "1", "--fake-detached-workers", "1", "--fake-worker-ignore-sigterm"}

func TestSIGTERMStopsEveryTreeAndExitsZero(t *testing.T) {
	s := newSite(t,
		testModel{name: "a", fake: stubborn},
		testModel{name: "b", fake: []string{"--fake-detached-workers", "2"}},
	)
	d := s.start()
	waitFor(t, 30*time.Second, "models healthy", s.healthy)
	all := map[int]string{}
	waitFor(t, 10*time.Second, "all workers recorded", func() bool {
		return len(live(s.procs("a"), "")) == 3 && len(live(s.procs("b"), "")) == 3
	})
	for _, m := range []string{"a", "b"} {
		for pid, r := range s.procs(m) {
			all[pid] = r
		}
	}

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

func TestSIGKILLThenRestartLeavesOneCopy(t *testing.T) {
	s := newSite(t,
		testModel{name: "a", fake: stubborn},
		testModel{name: "b", fake: []string{"--fake-detached-workers", "1"}},
	)
	first := s.start()
	waitFor(t, 30*time.Second, "models healthy", s.healthy)
	waitFor(t, 10*time.Second, "all workers recorded", func() bool {
		return len(live(s.procs("a"), "")) == 3 && len(live(s.procs("b"), "")) == 2
	})
	old := map[int]string{}
	for _, m := range []string{"a", "b"} {
		for pid, r := range s.procs(m) {
			old[pid] = r
		}
	}

	first.cmd.Process.Kill() //nolint:errcheck // checked by wait
	first.wait(t)
	// The case only means something if the models outlived their daemon,
	// as vLLM does (it ignores SIGPIPE on its dead stdout).
	if len(live(old, "server")) != 2 {
		t.Fatalf("expected both servers to outlive the SIGKILLed daemon; alive: %v", live(old, ""))
	}

	second := s.start()
	waitFor(t, 30*time.Second, "one new server per model, healthy, and no leftovers", func() bool {
		for _, m := range []string{"a", "b"} {
			servers := live(s.procs(m), "server")
			if len(servers) != 1 || old[servers[0]] != "" {
				return false
			}
		}
		return len(live(old, "")) == 0 && s.healthy()
	})

	second.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // checked by wait
	if code := second.wait(t); code != 0 {
		t.Errorf("second daemon exit code %d", code)
	}
	for _, m := range []string{"a", "b"} {
		if l := live(s.procs(m), ""); len(l) != 0 {
			t.Errorf("%s: alive after stop: %v", m, l)
		}
	}
}

func TestSecondDaemonOnSameSocketRefuses(t *testing.T) {
	s := newSite(t, testModel{name: "a"})
	first := s.start()
	waitFor(t, 30*time.Second, "model healthy", s.healthy)
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

func TestCheck(t *testing.T) {
	var out, errb bytes.Buffer
	code := run([]string{"--check", "--config", "../../config/testdata/bad/duplicate_port.yaml"}, nil, &out, &errb)
	want := `../../config/testdata/bad/duplicate_port.yaml is invalid:
  models.mixtral.port: 11400 already used by models.hermes
  models.phi3.port: 9400 is the supervisor's own listen port`
	if code != 1 || !strings.Contains(errb.String(), want) {
		t.Errorf("exit %d, stderr:\n%s\nwant it to contain:\n%s", code, errb.String(), want)
	}

	out.Reset()
	errb.Reset()
	code = run([]string{"--check"}, []string{"CITADEL_CONFIG=../../config/testdata/good.yaml"}, &out, &errb)
	if code != 0 || !strings.Contains(out.String(), "valid, 3 models") {
		t.Errorf("exit %d, stdout %q, stderr %q", code, out.String(), errb.String())
	}
}

func TestVersion(t *testing.T) {
	var out bytes.Buffer
	if code := run([]string{"--version"}, nil, &out, &out); code != 0 || !strings.HasPrefix(out.String(), "citadel-supervisor dev") {
		t.Errorf("exit %d: %q", code, out.String())
	}
}
