package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"citadel-supervisor/config"
	"citadel-supervisor/probe"
	"citadel-supervisor/supervisor"
	"citadel-supervisor/supervisor/control"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
)

// clientEnv makes the re-executed test binary act as citadelctl (for the
// test that connects as another user).
const clientEnv = "CITADELCTL_TEST_AS_CLIENT"

func TestMain(m *testing.M) {
	supervisortest.RunFakeIfAsked()
	supervisortest.ExitWithoutDelay()
	if os.Getenv(clientEnv) == "1" {
		os.Exit(run(context.Background(), os.Args[1:], nil, os.Stdout, os.Stderr))
	}
	if spec := os.Getenv(hostileEnv); spec != "" {
		os.Exit(hostileClient(spec, os.Args[1]))
	}
	os.Exit(m.Run())
}

var waitFor = supervisortest.WaitFor

type model = supervisortest.Model

// daemon is a supervisor and its control server over a real socket.
type daemon struct {
	site   *supervisortest.Site
	sup    *supervisor.Supervisor
	done   chan struct{} // closed when the supervisor's Run has returned
	runErr error
}

var _ supervisortest.Daemon = (*daemon)(nil)

func (d *daemon) Done() <-chan struct{} { return d.done }
func (d *daemon) Exit() string          { return fmt.Sprintf("Run returned %v", d.runErr) }

// waitFor waits for cond, which the running daemon d is to bring about:
// it fails at once if d's Run returns first.
func (d *daemon) waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	supervisortest.WaitOn(t, d, timeout, what, cond)
}

func startDaemon(t *testing.T, top string, models ...model) *daemon {
	t.Helper()
	return startDaemonWith(t, nil, top, models...)
}

// startDaemonWith is startDaemon with the control socket's options
// adjusted by opt.
func startDaemonWith(t *testing.T, opt func(*control.Options), top string, models ...model) *daemon {
	t.Helper()
	return startSite(t, supervisortest.NewSite(t, top, models...), opt)
}

// startSite runs a daemon and its control socket on site's configuration.
func startSite(t *testing.T, site *supervisortest.Site, opt func(*control.Options)) *daemon {
	t.Helper()
	cfg, err := config.Load(site.Path, nil)
	if err != nil {
		t.Fatal(err)
	}
	log := zaptest.NewLogger(t, zaptest.Level(zap.WarnLevel))
	sup, err := supervisor.New(cfg, supervisor.Options{Logger: log, Prober: probe.NewHTTP(), Environ: os.Environ()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	d := &daemon{site: site, sup: sup, done: make(chan struct{})}
	wg.Go(func() {
		defer close(d.done)
		if d.runErr = sup.Run(ctx); d.runErr != nil {
			t.Errorf("Run: %v", d.runErr)
		}
	})
	<-sup.Ready()
	o := control.Options{
		Path: site.Socket, Logger: log, Backend: sup,
		Reload: func(ctx context.Context) ([]config.Change, error) {
			return sup.ReloadFile(ctx, site.Path, nil)
		},
	}
	if opt != nil {
		opt(&o)
	}
	srv, err := control.Listen(o)
	if err != nil {
		t.Fatal(err)
	}
	wg.Go(func() {
		if err := srv.Run(ctx); err != nil {
			t.Errorf("control Run: %v", err)
		}
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
	return d
}

// ctl runs citadelctl against d and returns exit code, stdout, stderr.
func (d *daemon) ctl(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), append([]string{"--socket", d.site.Socket}, args...), nil, &out, &errb)
	return code, out.String(), errb.String()
}

func (d *daemon) waitAll(t *testing.T, want supervisor.State) {
	t.Helper()
	d.waitFor(t, 30*time.Second, "every model "+string(want), func() bool {
		st, _ := d.sup.Status()
		for _, s := range st {
			if s.State != want {
				return false
			}
		}
		return true
	})
}

func (d *daemon) state(t *testing.T, name string) supervisor.Status {
	t.Helper()
	st, err := d.sup.Status(name)
	if err != nil {
		t.Fatal(err)
	}
	return st[0]
}

var seven = []model{{Name: "mixtral"}, {Name: "hermes"}, {Name: "openchat"}, {Name: "phi3"}, {Name: "yi34b"}, {Name: "coder"}, {Name: "vision"}}

func TestStatusFitsEightyColumns(t *testing.T) {
	d := startDaemon(t, "", seven...)
	d.waitAll(t, supervisor.Ready)
	// A long reason must not widen the table.
	if code, _, errb := d.ctl(t, "stop", "phi3"); code != 0 {
		t.Fatalf("stop: %d %s", code, errb)
	}
	code, out, errb := d.ctl(t, "status")
	if code != 0 {
		t.Fatalf("status: exit %d: %s", code, errb)
	}
	t.Logf("\n%s", out)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 9 || !strings.HasPrefix(lines[0], "NAME ") || !strings.HasSuffix(lines[0], "REASON") {
		t.Fatalf("want a header, 7 rows and the GPU note:\n%s", out)
	}
	if lines[8] != "GPUs: gpu.backend is none: no GPU readings" {
		t.Errorf("no note on the missing GPU readings: %q", lines[8])
	}
	lines = lines[:8]
	for _, l := range lines {
		if n := utf8.RuneCountInString(l); n > 80 {
			t.Errorf("line is %d columns: %q", n, l)
		}
	}
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		want := "ready"
		if f[0] == "phi3" {
			want = "stopped"
		}
		if f[1] != want {
			t.Errorf("row %q: state %s, want %s", l, f[1], want)
		}
	}
	_, long, _ := d.ctl(t, "status", "-l", "phi3")
	if !strings.Contains(long, "held stopped by operator") {
		t.Errorf("status -l does not show the whole reason:\n%s", long)
	}
}

func TestStatusJSONKeys(t *testing.T) {
	d := startDaemon(t, "", model{Name: "a"}, model{Name: "b"})
	d.waitAll(t, supervisor.Ready)
	code, out, _ := d.ctl(t, "-o", "json", "status", "a")
	var rows []map[string]any
	if err := json.Unmarshal([]byte(out), &rows); err != nil || code != 0 || len(rows) != 1 {
		t.Fatalf("exit %d, %v:\n%s", code, err, out)
	}
	for _, k := range []string{"name", "state", "reason", "pid", "port", "gpus", "restarts", "last_exit_code", "since"} {
		if _, ok := rows[0][k]; !ok {
			t.Errorf("key %q missing from %v", k, rows[0])
		}
	}
	if rows[0]["name"] != "a" || rows[0]["state"] != "ready" {
		t.Errorf("row = %v", rows[0])
	}
}

func TestVerbs(t *testing.T) {
	d := startDaemon(t, "", model{Name: "a"}, model{Name: "b"}, model{Name: "c", Fake: []string{"--fake-exit-at-start"}, YAML: "restart: {delay: 10ms, burst: 2}"})
	d.waitFor(t, 30*time.Second, "a, b ready and c failed", func() bool {
		return d.state(t, "a").State == supervisor.Ready && d.state(t, "b").State == supervisor.Ready && d.state(t, "c").State == supervisor.Failed
	})

	if code, out, _ := d.ctl(t, "health"); code != 1 || !strings.Contains(out, "2/3 enabled models serving") || !strings.Contains(out, "c: failed: start limit") {
		t.Errorf("health with c failed: exit %d\n%s", code, out)
	}
	// Asked by name, a failed model shows its last output.
	if code, out, _ := d.ctl(t, "status", "c"); code != 0 || !strings.Contains(out, "c failed: start limit") || !strings.Contains(out, "CUDA out of memory") {
		t.Errorf("status c: exit %d\n%s", code, out)
	}
	if code, out, errb := d.ctl(t, "stop", "a"); code != 0 || out != "a: stopped: held stopped by operator\n" {
		t.Errorf("stop a: exit %d %q %q", code, out, errb)
	}
	if got := d.state(t, "a"); got.State != supervisor.Stopped || supervisortest.Running(got.PID) {
		t.Errorf("after stop: %s, pid %d", got.State, got.PID)
	}
	if code, _, _ := d.ctl(t, "start", "a"); code != 0 {
		t.Errorf("start a: exit %d", code)
	}
	d.waitFor(t, 30*time.Second, "a ready again", func() bool { return d.state(t, "a").State == supervisor.Ready })

	before := d.state(t, "b").PID
	if code, _, _ := d.ctl(t, "restart", "b"); code != 0 {
		t.Errorf("restart b: exit %d", code)
	}
	d.waitFor(t, 30*time.Second, "b ready with a new pid", func() bool {
		s := d.state(t, "b")
		return s.State == supervisor.Ready && s.PID != before
	})
	if got := d.state(t, "b").RestartsByReason["manual"]; got != 1 {
		t.Errorf("manual restarts of b = %d", got)
	}

	starts := len(d.site.PIDs(t, "c"))
	if code, _, _ := d.ctl(t, "reset", "c"); code != 0 {
		t.Errorf("reset c: exit %d", code)
	}
	d.waitFor(t, 30*time.Second, "c started twice more and failed", func() bool {
		return len(d.site.PIDs(t, "c")) == starts+2 && d.state(t, "c").State == supervisor.Failed
	})

	if code, out, _ := d.ctl(t, "stop", "all"); code != 0 || strings.Count(out, ": stopped: ") != 3 {
		t.Errorf("stop all: exit %d\n%s", code, out)
	}
	if code, _, _ := d.ctl(t, "start", "a", "b"); code != 0 {
		t.Errorf("start a b: exit %d", code)
	}
	d.waitFor(t, 30*time.Second, "a, b ready", func() bool {
		return d.state(t, "a").State == supervisor.Ready && d.state(t, "b").State == supervisor.Ready
	})
	if code, out, _ := d.ctl(t, "stop", "c"); code != 0 {
		t.Errorf("stop c: exit %d %s", code, out)
	}
	// c is held stopped by an operator: reported, not counted (docs/on-demand.md).
	if code, out, _ := d.ctl(t, "health"); code != 0 || out != "2/2 enabled models serving\n  c: held stopped (not counted): held stopped by operator\n" {
		t.Errorf("health: exit %d\n%s", code, out)
	}
}

func TestHealthExitCodes(t *testing.T) {
	d := startDaemon(t, "", model{Name: "a"}, model{Name: "off", YAML: "enabled: false"})
	d.waitFor(t, 30*time.Second, "a ready", func() bool { return d.state(t, "a").State == supervisor.Ready })
	// A disabled model does not count against health.
	if code, out, _ := d.ctl(t, "health"); code != 0 || out != "1/1 enabled models serving\n" {
		t.Errorf("healthy: exit %d %q", code, out)
	}
	// A model that cannot start is not serving.
	if err := os.RemoveAll(filepath.Join(d.site.Dir, "models", "a")); err != nil {
		t.Fatal(err)
	}
	d.ctl(t, "restart", "a")
	d.waitFor(t, 30*time.Second, "a pending on storage", func() bool { return d.state(t, "a").State == supervisor.Pending })
	if code, out, _ := d.ctl(t, "health"); code != 1 || !strings.HasPrefix(out, "0/1 enabled models serving\n  a: pending: storage: ") {
		t.Errorf("unhealthy: exit %d %q", code, out)
	}
}

func TestUnknownModelAndUsage(t *testing.T) {
	d := startDaemon(t, "", model{Name: "a"})
	cases := []struct {
		args     []string
		code     int
		inStderr string
	}{
		{[]string{"status", "nope"}, 1, `unknown model "nope"`},
		{[]string{"stop", "nope"}, 1, `unknown model "nope"`},
		{[]string{"logs", "nope"}, 1, `unknown model "nope"`},
		{[]string{"stop"}, 2, "usage: citadelctl stop"},
		{[]string{"logs"}, 2, "usage: citadelctl logs"},
		{[]string{"bogus"}, 2, `unknown command "bogus"`},
		{[]string{}, 2, "usage: citadelctl"},
		{[]string{"-o", "yaml", "status"}, 2, `-o "yaml": use table or json`},
		{[]string{"completion", "fish"}, 2, `"fish": use bash or zsh`},
	}
	for _, tc := range cases {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			code, _, errb := d.ctl(t, tc.args...)
			if code != tc.code || !strings.Contains(errb, tc.inStderr) {
				t.Errorf("exit %d (want %d), stderr %q (want it to contain %q)", code, tc.code, errb, tc.inStderr)
			}
		})
	}
	if code, out, _ := d.ctl(t, "help", "logs"); code != 0 || !strings.Contains(out, "usage: citadelctl [--socket PATH] [-o table|json] logs MODEL [-n N] [-f]") {
		t.Errorf("help logs: exit %d\n%s", code, out)
	}
	if code, out, _ := d.ctl(t, "stop", "--help"); code != 0 || !strings.Contains(out, "hold them stopped") {
		t.Errorf("stop --help: exit %d\n%s", code, out)
	}
}

func TestDaemonNotRunning(t *testing.T) {
	var out, errb bytes.Buffer
	sock := filepath.Join(t.TempDir(), "none.sock")
	code := run(context.Background(), []string{"status"}, []string{"CITADEL_SOCKET=" + sock}, &out, &errb)
	want := "citadelctl: no control socket at " + sock + ": is citadel-supervisor running? (systemctl status citadel-supervisor; or --socket / CITADEL_SOCKET)\n"
	if code != 3 || errb.String() != want {
		t.Errorf("exit %d, stderr %q", code, errb.String())
	}
	// A socket left behind by a daemon that died: nobody answers.
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	errb.Reset()
	code = run(context.Background(), []string{"status"}, []string{"CITADEL_SOCKET=" + sock}, &out, &errb)
	want = "citadelctl: daemon not reachable at " + sock + ": is citadel-supervisor running? (systemctl status citadel-supervisor)\n"
	if code != 3 || errb.String() != want {
		t.Errorf("stale socket: exit %d, stderr %q", code, errb.String())
	}
}

func TestLogs(t *testing.T) {
	d := startDaemon(t, "", model{Name: "a", Fake: []string{"--fake-log-every", "20ms"}})
	d.waitAll(t, supervisor.Ready)
	d.waitFor(t, 10*time.Second, "a few ticks", func() bool {
		_, out, _ := d.ctl(t, "logs", "a", "-n", "3")
		return strings.Count(out, "tick") == 3
	})
	code, out, _ := d.ctl(t, "logs", "a", "-n", "2")
	if lines := strings.Split(strings.TrimSpace(out), "\n"); code != 0 || len(lines) != 2 {
		t.Errorf("logs -n 2: exit %d, %d lines:\n%s", code, len(lines), out)
	}

	// -f streams new lines until interrupted.
	ctx, cancel := context.WithCancel(context.Background())
	var w supervisortest.SyncBuffer
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"--socket", d.site.Socket, "logs", "-f", "-n", "0", "a"}, nil, &w, &w)
	}()
	d.waitFor(t, 10*time.Second, "5 streamed lines", func() bool { return strings.Count(w.String(), "tick") >= 5 })
	cancel()
	select {
	case code := <-done:
		if code != 0 {
			t.Errorf("logs -f: exit %d after interrupt\n%s", code, w.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("logs -f did not end after interrupt")
	}
}

func TestReload(t *testing.T) {
	d := startDaemon(t, "", model{Name: "a"}, model{Name: "b"})
	d.waitAll(t, supervisor.Ready)
	aPID, bPID := d.state(t, "a").PID, d.state(t, "b").PID

	if code, out, _ := d.ctl(t, "reload"); code != 0 || out != "reloaded: nothing changed\n" {
		t.Errorf("no-op reload: exit %d %q", code, out)
	}
	// Give b one more variable.
	cfg := d.site.Edit(t, supervisortest.Set("models.b.env.EXTRA", "1"))
	if err := os.WriteFile(d.site.Path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, out, errb := d.ctl(t, "reload"); code != 0 || out != "b: respawn (env)\n" {
		t.Errorf("reload: exit %d %q %q", code, out, errb)
	}
	d.waitFor(t, 30*time.Second, "b ready with a new pid", func() bool {
		s := d.state(t, "b")
		return s.State == supervisor.Ready && s.PID != bPID
	})
	if d.state(t, "a").PID != aPID {
		t.Error("a was restarted by a reload that did not change it")
	}

	if err := os.WriteFile(d.site.Path, []byte(cfg+"bogus: 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, _, errb := d.ctl(t, "reload"); code != 1 || !strings.Contains(errb, "bogus: unknown key") || !strings.Contains(errb, "nothing changed") {
		t.Errorf("invalid reload: exit %d %q", code, errb)
	}
	if d.state(t, "a").PID != aPID || d.state(t, "a").State != supervisor.Ready {
		t.Error("an invalid reload disturbed a")
	}
}

func TestGPUs(t *testing.T) {
	d := startDaemon(t, "", model{Name: "a"})
	if code, out, _ := d.ctl(t, "gpus"); code != 0 || out != "no GPUs: gpu.backend is none: no GPU readings\n" {
		t.Errorf("backend none: exit %d %q", code, out)
	}
	sim := startDaemon(t, `gpu:
  backend: sim
  sim:
    devices:
      - {uuid: GPU-aaaa, name: Sim H100, memory: 80GiB}
      - {uuid: GPU-bbbb, name: Sim H100, memory: 80GiB}
`, model{Name: "big", YAML: "tensor_parallel: 2\ngpu_memory_utilization: 0.5"})
	sim.waitAll(t, supervisor.Ready)
	code, out, _ := sim.ctl(t, "gpus")
	want := `GPU  UUID      NAME      TOTAL    USED     FREE     MODELS
0    GPU-aaaa  Sim H100  80.0GiB  40.0GiB  40.0GiB  big
1    GPU-bbbb  Sim H100  80.0GiB  40.0GiB  40.0GiB  big
`
	if code != 0 || out != want {
		t.Errorf("gpus: exit %d\n%s\nwant\n%s", code, out, want)
	}
	if _, st, _ := sim.ctl(t, "status"); !strings.Contains(st, " 0,1 ") {
		t.Errorf("status does not show GPU indexes:\n%s", st)
	}
}

// TestPeerWithoutRightsRefused runs citadelctl as other users against a
// daemon whose socket belongs to a read-only group (control_socket_read_group):
// a member may read but not change state, and is told so; a member of the
// control group (here the daemon's own, root's) may change state; a user in
// neither group cannot open the socket at all.
func TestPeerWithoutRightsRefused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another user; control.TestAuthorize covers the rule")
	}
	g, err := user.LookupGroup("nogroup")
	if err != nil {
		t.Skipf("no group nogroup to be the read-only group: %v", err)
	}
	readGID, _ := strconv.ParseUint(g.Gid, 10, 32)
	d := startDaemonWith(t, func(o *control.Options) { o.ReadGroup = "nogroup" }, "", model{Name: "a"}, model{Name: "b"})
	d.waitAll(t, supervisor.Ready)
	fi, err := os.Stat(d.site.Socket)
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Gid != uint32(readGID) || fi.Mode().Perm() != 0o660 {
		t.Fatalf("socket is group %d mode %v, want group %d mode 0660", st.Gid, fi.Mode().Perm(), readGID)
	}
	// Let other users reach the socket's directory, so what decides is
	// the socket's own group and the daemon's check (SO_PEERCRED).
	for p := filepath.Dir(d.site.Socket); p != "/" && p != "/tmp"; p = filepath.Dir(p) {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// Go's build directory is root's alone: run a copy others can execute.
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(d.site.Dir, "citadelctl.test")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	as := func(cred *syscall.Credential, args ...string) (int, string) {
		t.Helper()
		cmd := exec.Command(bin, append([]string{"--socket", d.site.Socket}, args...)...)
		cmd.Env = []string{clientEnv + "=1"}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		out, err := cmd.CombinedOutput()
		if cmd.ProcessState == nil {
			t.Fatalf("citadelctl %v did not run: %v", args, err)
		}
		return cmd.ProcessState.ExitCode(), string(out)
	}
	reader := &syscall.Credential{Uid: 65534, Gid: uint32(readGID), Groups: []uint32{}}
	if code, out := as(reader, "status"); code != 0 || !strings.Contains(out, "ready") {
		t.Errorf("status as a reader: exit %d\n%s", code, out)
	}
	if code, out := as(reader, "health"); code != 0 {
		t.Errorf("health as a reader: exit %d\n%s", code, out)
	}
	for _, args := range [][]string{{"stop", "a"}, {"restart", "a"}, {"sleep", "a"}, {"reload"}} {
		code, out := as(reader, args...)
		if code != exitFailed || !strings.Contains(out, "permission denied: uid 65534 is not root") ||
			!strings.Contains(out, "you may read but not change state") {
			t.Errorf("%v as a reader: exit %d, want %d and the refusal\n%s", args, code, exitFailed, out)
		}
	}
	if st := d.state(t, "a"); st.State != supervisor.Ready {
		t.Errorf("a is %s after refused operations", st.State)
	}
	// The same user with the control group (gid 0, the daemon's) among
	// its supplementary groups may change state.
	operator := &syscall.Credential{Uid: 65534, Gid: uint32(readGID), Groups: []uint32{0}}
	if code, out := as(operator, "stop", "b"); code != 0 {
		t.Errorf("stop as a member of the control group: exit %d\n%s", code, out)
	}
	if st := d.state(t, "b"); st.State != supervisor.Stopped {
		t.Errorf("b is %s after a permitted stop", st.State)
	}
	// In neither group: the file system refuses, and citadelctl says so.
	stranger := &syscall.Credential{Uid: 65534, Gid: 65533, Groups: []uint32{}}
	if code, out := as(stranger, "status"); code != exitFailed || !strings.Contains(out, "permission denied") {
		t.Errorf("status as a stranger: exit %d\n%s", code, out)
	}
}

func TestCompletionScripts(t *testing.T) {
	d := startDaemon(t, "", model{Name: "alpha"}, model{Name: "beta"})
	code, script, _ := d.ctl(t, "completion", "bash")
	if code != 0 {
		t.Fatalf("completion bash: exit %d", code)
	}
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Fatal("bash is needed to check the bash completion script")
	}
	if out, err := exec.Command(bash, "-n", "-c", script).CombinedOutput(); err != nil {
		t.Errorf("bash completion does not parse: %v\n%s", err, out)
	}
	if code, zsh, _ := d.ctl(t, "completion", "zsh"); code != 0 || !strings.HasPrefix(zsh, "#compdef citadelctl") {
		t.Errorf("completion zsh: exit %d", code)
	}
	// What the scripts call for model names.
	if code, out, _ := d.ctl(t, "__models"); code != 0 || out != "alpha\nbeta\n" {
		t.Errorf("__models: exit %d %q", code, out)
	}
}

// completionCases are command lines being completed (the last word is the
// one under the cursor) and what the scripts offer. The fake citadelctl
// of completionSite names different models per --socket.
var completionCases = []struct {
	words      []string // bash's COMP_WORDS: "--socket=/y" is split at "="
	zshWords   []string // when zsh's words differ
	want       string   // sorted, space-separated
	wantZsh    string   // when zsh's differs (file completion is _files there)
	wantCalled string   // the fake's argument list, if it must be called
}{
	{words: []string{""}, want: "completion fleet gpus health help logs reload reset restart sleep start status stop upgrade usage wake"},
	{words: []string{"st"}, want: "start status stop"},
	{words: []string{"-"}, want: "--help --socket --version -o"},
	{words: []string{"status", ""}, want: "all default-model", wantCalled: "__models"},
	{words: []string{"--socket", "/x", "status", ""}, want: "all alpha beta", wantCalled: "--socket /x __models"},
	{words: []string{"-o", "json", "--socket", "/x", "logs", ""}, want: "alpha beta", wantCalled: "--socket /x __models"},
	{words: []string{"--socket", "=", "/y", "wake", ""}, zshWords: []string{"--socket=/y", "wake", ""}, want: "all gamma"},
	{words: []string{"--socket", "/x", "stop", "a"}, want: "all alpha"},
	{words: []string{"--socket", "/x", "stop", "--"}, want: "--help --timeout"},
	{words: []string{"logs", "-"}, want: "--help -f -n -o"},
	{words: []string{"usage", "-"}, want: "--by --help -o"},
	{words: []string{"usage", "--by", ""}, want: "key model"},
	{words: []string{"status", "-"}, want: "--help -l -o"},
	{words: []string{"-o", ""}, want: "json table"},
	{words: []string{"--socket", ""}, want: "sock-here", wantZsh: "_files"},
	{words: []string{"completion", ""}, want: "bash zsh"},
}

// completionSite writes the script and a fake citadelctl to a directory
// and returns it; the fake logs its arguments to dir/called. Completions
// run in dir/cwd, which holds one file.
func completionSite(t *testing.T, shell string) string {
	t.Helper()
	dir := t.TempDir()
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"completion", shell}, nil, &out, &errb); code != 0 {
		t.Fatalf("completion %s: exit %d: %s", shell, code, errb.String())
	}
	fake := `#!/bin/sh
echo "$*" >> "$(dirname "$0")/called"
case "$*" in
"--socket /x __models") printf 'alpha\nbeta\n' ;;
"--socket=/y __models" | "--socket /y __models") printf 'gamma\n' ;;
"__models") printf 'default-model\n' ;;
*) echo "unexpected arguments: $*" >&2; exit 2 ;;
esac
`
	if err := os.Mkdir(filepath.Join(dir, "cwd"), 0o755); err != nil {
		t.Fatal(err)
	}
	for name, body := range map[string]string{"script": out.String(), "citadelctl": fake, "cwd/sock-here": ""} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// completeWith runs one completion in a fresh shell in dir and returns the
// candidates sorted and what the fake was called with.
func completeWith(t *testing.T, dir string, args ...string) (string, string) {
	t.Helper()
	os.Remove(filepath.Join(dir, "called"))
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Dir = filepath.Join(dir, "cwd")
	cmd.Env = []string{"PATH=" + dir + ":/usr/bin:/bin", "HOME=" + dir}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", args, err, out)
	}
	got := strings.Fields(string(out))
	slices.Sort(got)
	called, _ := os.ReadFile(filepath.Join(dir, "called"))
	return strings.Join(got, " "), strings.TrimSpace(string(called))
}

// TestCompletionBash runs the bash script's function as bash's completion
// would, for each case.
func TestCompletionBash(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Fatal("bash is needed to check the bash completion script")
	}
	dir := completionSite(t, "bash")
	const harness = `source ../script
COMP_WORDS=("${@:2}"); COMP_CWORD=$1; _citadelctl
printf '%s\n' "${COMPREPLY[@]}"`
	for _, tc := range completionCases {
		words := append([]string{"citadelctl"}, tc.words...)
		args := append([]string{bash, "--norc", "-c", harness, "bash", strconv.Itoa(len(words) - 1)}, words...)
		got, called := completeWith(t, dir, args...)
		if got != tc.want || (tc.wantCalled != "" && called != tc.wantCalled) {
			t.Errorf("bash %q: got %q (called %q), want %q (called %q)", words, got, called, tc.want, tc.wantCalled)
		}
	}
}

// TestCompletionZsh runs the zsh script's function with zsh's completion
// builtins replaced by ones that print what they are given (filtered by
// the prefix under the cursor, as compadd does).
func TestCompletionZsh(t *testing.T) {
	zsh, err := exec.LookPath("zsh")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("CI: zsh is needed to check the zsh completion script (.ci/run installs it)")
		}
		t.Skip("zsh is not installed (apt-get install zsh): TestCompletionBash covers the bash script only")
	}
	dir := completionSite(t, "zsh")
	const harness = `compdef() { : }
_files() { print -- _files }
compadd() {
    local -a c
    if [[ $1 == -a ]]; then c=(${(P)2}); else [[ $1 == -- ]] && shift; c=("$@"); fi
    local w; for w in $c; do [[ $w == ${PREFIX}* ]] && print -r -- $w; done
}
source ../script
CURRENT=$1; shift; words=("$@"); PREFIX=$words[CURRENT]
_citadelctl
true`
	for _, tc := range completionCases {
		words := append([]string{"citadelctl"}, tc.words...)
		if tc.zshWords != nil {
			words = append([]string{"citadelctl"}, tc.zshWords...)
		}
		args := append([]string{zsh, "-f", "-c", harness, "zsh", strconv.Itoa(len(words))}, words...)
		got, called := completeWith(t, dir, args...)
		want := cmp.Or(tc.wantZsh, tc.want)
		if got != want || (tc.wantCalled != "" && called != tc.wantCalled) {
			t.Errorf("zsh %q: got %q (called %q), want %q (called %q)", words, got, called, want, tc.wantCalled)
		}
	}
}

// TestControlSocketFlood: many clients hammer the socket with reads,
// operations and log reads at once; the answers stay right, the models are
// untouched, and the daemon's goroutines return to where they were.
func TestControlSocketFlood(t *testing.T) {
	d := startDaemon(t, "", model{Name: "a"}, model{Name: "b"})
	d.waitAll(t, supervisor.Ready)
	before := map[string]int{"a": d.state(t, "a").PID, "b": d.state(t, "b").PID}
	base := runtime.NumGoroutine()
	c := client.New(d.site.Socket)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var requests atomic.Int64
	for i := range 32 {
		wg.Go(func() {
			for ctx.Err() == nil {
				var err error
				switch i % 4 {
				case 0:
					var st []supervisor.Status
					st, err = c.Status(ctx)
					if err == nil && len(st) != 2 {
						t.Errorf("status returned %d models", len(st))
					}
				case 1:
					_, err = c.Op(ctx, "start", "a") // a no-op on a running model
				case 2:
					err = c.Logs(ctx, "b", 20, false, func(string) {})
				default:
					_, err = c.Health(ctx)
				}
				if err != nil && ctx.Err() == nil {
					t.Errorf("request failed under load: %v", err)
					return
				}
				requests.Add(1)
			}
		})
	}
	wg.Wait()
	c.Close()
	t.Logf("%d requests in 2 s from 32 clients", requests.Load())
	for n, pid := range before {
		if st := d.state(t, n); st.State != supervisor.Ready || st.PID != pid {
			t.Errorf("%s disturbed by the flood: %s pid %d", n, st.State, st.PID)
		}
	}
	if code, _, _ := d.ctl(t, "health"); code != 0 {
		t.Error("health fails after the flood")
	}
	d.waitFor(t, 10*time.Second, "goroutines back to the baseline", func() bool { return runtime.NumGoroutine() <= base+4 })
}

// TestOnDemandVerbs: an on-demand model by name says how it is used;
// sleep and wake by hand; an always model refuses them, saying why.
func TestOnDemandVerbs(t *testing.T) {
	d := startDaemon(t, "", model{Name: "od", YAML: "activation: on_demand\nsleep_level: 0"}, model{Name: "al"})
	d.waitFor(t, 30*time.Second, "al ready, od idle", func() bool {
		return d.state(t, "al").State == supervisor.Ready && d.state(t, "od").State == supervisor.Stopped
	})
	if code, out, _ := d.ctl(t, "status", "od"); code != 0 || !strings.Contains(out, "od: on demand, not awake; last request never") {
		t.Errorf("status od: exit %d\n%s", code, out)
	}
	if code, out, _ := d.ctl(t, "wake", "od"); code != 0 {
		t.Errorf("wake od: exit %d %s", code, out)
	}
	d.waitFor(t, 30*time.Second, "od ready", func() bool { return d.state(t, "od").State == supervisor.Ready })
	if code, out, _ := d.ctl(t, "sleep", "od"); code != 0 {
		t.Errorf("sleep od: exit %d %s", code, out)
	}
	d.waitFor(t, 30*time.Second, "od stopped (sleep_level 0)", func() bool { return d.state(t, "od").State == supervisor.Stopped })
	if code, out, errb := d.ctl(t, "sleep", "al"); code != 1 || !strings.Contains(out+errb, "not on demand") {
		t.Errorf("sleep al: exit %d %s %s", code, out, errb)
	}
	if code, out, _ := d.ctl(t, "health"); code != 0 {
		t.Errorf("health with od idle: exit %d %s", code, out)
	}
}

// TestSocketProblemsSaidAsTheyAre: nothing at the path, a directory and a
// regular file are reported as what they are, not as "daemon not running".
func TestSocketProblemsSaidAsTheyAre(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		path string
		code int
		want string
	}{
		{filepath.Join(dir, "none"), 3, "no control socket at"},
		{dir, 2, "is a directory, not the control socket"},
		{file, 2, "is not a socket (a regular file)"},
	} {
		var out, errb bytes.Buffer
		code := run(context.Background(), []string{"--socket", tc.path, "status"}, nil, &out, &errb)
		if code != tc.code || !strings.Contains(errb.String(), tc.want) {
			t.Errorf("%s: exit %d %q, want %d %q", tc.path, code, errb.String(), tc.code, tc.want)
		}
	}
}

// TestVisible: escape sequences and binary in model output are shown, not
// sent to the terminal.
func TestVisible(t *testing.T) {
	for in, want := range map[string]string{
		"plain\ttab":             "plain\ttab",
		"\x1b[31mred\x1b[0m":     `\x1b[31mred\x1b[0m`,
		"\x1b]52;c;ZXZpbA==\x07": `\x1b]52;c;ZXZpbA==\x07`,
		"caf\xe9 \xc3\xa9":       `caf\xe9 é`,
		"progress\r50%\x08":      `progress\x0d50%\x08`,
	} {
		if got := visible(in); got != want {
			t.Errorf("visible(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestFlagsSayWhatTheyWant: --version, and a bad --timeout says what it
// expects.
func TestFlagsSayWhatTheyWant(t *testing.T) {
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"--version"}, nil, &out, &errb); code != 0 || !strings.HasPrefix(out.String(), "citadelctl ") {
		t.Errorf("--version: exit %d %q", code, out.String())
	}
	out.Reset()
	errb.Reset()
	code := run(context.Background(), []string{"--socket", "/nonexistent", "stop", "--timeout", "5", "a"}, nil, &out, &errb)
	if code != 2 || !strings.Contains(errb.String(), "a duration such as 5s") {
		t.Errorf("--timeout 5: exit %d %q", code, errb.String())
	}
}

// TestStatusPipedIsNotCut, TestLogsAllRefused and the operations' JSON.
func TestStatusPipedAndJSONOps(t *testing.T) {
	long := strings.Repeat("x", 300)
	d := startDaemon(t, "", model{Name: "a"}, model{Name: "b", YAML: "env_files: [/nonexistent/" + long + "]"})
	d.waitFor(t, 30*time.Second, "a ready", func() bool { return d.state(t, "a").State == supervisor.Ready })
	// Piped: the long reason whole.
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	var errb bytes.Buffer
	code := run(context.Background(), []string{"--socket", d.site.Socket, "status"}, []string{"COLUMNS=80"}, w, &errb)
	w.Close()
	piped, _ := io.ReadAll(r)
	if code != 0 || !strings.Contains(string(piped), long) {
		t.Errorf("piped status cut: exit %d\n%s", code, piped)
	}
	if code, _, errb := d.ctl(t, "logs", "all"); code != 2 || !strings.Contains(errb, "logs takes one model") {
		t.Errorf("logs all: exit %d %q", code, errb)
	}
	code, out, _ := d.ctl(t, "-o", "json", "restart", "a")
	var res []map[string]string
	if err := json.Unmarshal([]byte(out), &res); code != 0 || err != nil || len(res) != 1 || res[0]["model"] != "a" || res[0]["state"] == "" {
		t.Errorf("restart -o json: exit %d %v\n%s", code, err, out)
	}
}

// TestFailedOpShowsOnlyItsModels: an operation that fails for every model
// named prints the failure, not the state of every other model.
func TestFailedOpShowsOnlyItsModels(t *testing.T) {
	d := startDaemon(t, "", model{Name: "a"}, model{Name: "b"})
	d.waitAll(t, supervisor.Ready)
	code, out, errOut := d.ctl(t, "sleep", "a")
	if code != exitFailed || out != "" || !strings.HasPrefix(errOut, "a: ") {
		t.Errorf("sleep of an always-on model: exit %d\nstdout %q\nstderr %q", code, out, errOut)
	}
	code, out, _ = d.ctl(t, "-o", "json", "sleep", "a")
	var res []map[string]string
	if err := json.Unmarshal([]byte(out), &res); code != exitFailed || err != nil || len(res) != 1 || res[0]["model"] != "a" || res[0]["error"] == "" {
		t.Errorf("-o json sleep: exit %d %v\n%s", code, err, out)
	}
}

// TestCompletionListsEveryCommand: both scripts offer exactly the commands
// citadelctl has (a new command is completed, a removed one is not).
func TestCompletionListsEveryCommand(t *testing.T) {
	var want []string
	for name := range commands {
		if !strings.HasPrefix(name, "__") {
			want = append(want, name)
		}
	}
	want = append(want, "help")
	slices.Sort(want)
	for script, re := range map[string]*regexp.Regexp{
		bashCompletion: regexp.MustCompile(`local cmds="([^"]*)"`),
		zshCompletion:  regexp.MustCompile(`cmds=\(([^)]*)\)`),
	} {
		m := re.FindStringSubmatch(script)
		if m == nil {
			t.Fatalf("no command list in\n%s", script)
		}
		got := strings.Fields(m[1])
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("completion offers %v, citadelctl has %v", got, want)
		}
	}
}

// TestUsage: citadelctl usage prints the gateway's requests and tokens per
// model and key, summed by key or by model, and says when no gateway runs.
func TestUsage(t *testing.T) {
	since := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	rows := []api.UsageRow{
		{Model: "coder", Key: "team-a", Requests: 3, PromptTokens: 30, CompletionTokens: 300},
		{Model: "mixtral", Key: "team-a", Requests: 5, PromptTokens: 50, CompletionTokens: 500},
		{Model: "mixtral", Key: "team-b", Requests: 2, PromptTokens: 20, CompletionTokens: 200},
	}
	var gateway atomic.Bool
	gateway.Store(true)
	d := startDaemonWith(t, func(o *control.Options) {
		o.Usage = func() api.Usage {
			if !gateway.Load() {
				return api.Usage{Rows: []api.UsageRow{}}
			}
			return api.Usage{Gateway: true, Since: since, Rows: rows}
		}
	}, "gpu: {backend: none}\n")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, `
MODEL    KEY     REQUESTS  PROMPT  COMPLETION  TOTAL
coder    team-a  3         30      300         330
mixtral  team-a  5         50      500         550
mixtral  team-b  2         20      200         220
all              10        100     1000        1100
`},
		{[]string{"--by", "key"}, `
KEY     REQUESTS  PROMPT  COMPLETION  TOTAL
team-a  8         80      800         880
team-b  2         20      200         220
all     10        100     1000        1100
`},
		{[]string{"--by", "model"}, `
MODEL    REQUESTS  PROMPT  COMPLETION  TOTAL
coder    3         30      300         330
mixtral  7         70      700         770
all      10        100     1000        1100
`},
	} {
		code, out, errOut := d.ctl(t, append([]string{"usage"}, tc.args...)...)
		head, table, _ := strings.Cut(out, "\n")
		if code != 0 || !strings.HasPrefix(head, "since ") || "\n"+strings.ReplaceAll(table, " \n", "\n") != tc.want {
			t.Errorf("usage %v: exit %d %s\n%s\nwant:%s", tc.args, code, errOut, out, tc.want)
		}
	}
	code, out, _ := d.ctl(t, "-o", "json", "usage", "--by", "key")
	var u api.Usage
	if err := json.Unmarshal([]byte(out), &u); code != 0 || err != nil || len(u.Rows) != 2 || u.Rows[0].Key != "team-a" || u.Rows[0].CompletionTokens != 800 {
		t.Errorf("json: %d %v %s", code, err, out)
	}
	if code, _, _ := d.ctl(t, "usage", "--by", "host"); code != 2 {
		t.Errorf("--by host: exit %d, want 2", code)
	}
	gateway.Store(false)
	if code, _, errOut := d.ctl(t, "usage"); code != 1 || !strings.Contains(errOut, "no gateway runs") {
		t.Errorf("no gateway: %d %q", code, errOut)
	}
}

// TestStopSaysWhatItWaitsFor: a stop of a model on a GPU where another
// loads waits until that one is ready (docs/on-demand.md, "Quiet GPUs"),
// and citadelctl says so while it waits, then returns once it stopped.
func TestStopSaysWhatItWaitsFor(t *testing.T) {
	top := "gpu:\n  backend: sim\n  sim:\n    devices:\n      - {uuid: GPU-00000000-0000-0000-0000-000000000000, name: Sim H100, memory: 80GiB}\n"
	d := startDaemon(t, top,
		model{Name: "a", YAML: "gpu_memory_utilization: 0.3"},
		model{Name: "b", YAML: "activation: on_demand\nsleep_level: 0\ngpu_memory_utilization: 0.3", Fake: []string{"--fake-load-time", "3s"}},
	)
	d.waitFor(t, 30*time.Second, "a ready", func() bool { return d.state(t, "a").State == supervisor.Ready })
	if code, out, errb := d.ctl(t, "wake", "b"); code != 0 {
		t.Fatalf("wake b: exit %d %s %s", code, out, errb)
	}
	d.waitFor(t, 10*time.Second, "b loading", func() bool { return d.state(t, "b").State == supervisor.Starting })
	code, out, errb := d.ctl(t, "stop", "a")
	if code != 0 || !strings.Contains(out, "a: stopped") {
		t.Errorf("stop a: exit %d\n%s%s", code, out, errb)
	}
	if want := "a: waiting for b, which is starting or waking on GPU0, before it stops"; !strings.Contains(errb, want) {
		t.Errorf("stop a said:\n%s\nwant a line %q", errb, want)
	}
	if st := d.state(t, "b"); st.State != supervisor.Ready {
		t.Errorf("b %s (%s); want ready: a's stop waited for its load", st.State, st.Reason)
	}
}
