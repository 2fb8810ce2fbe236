package main

import (
	"bytes"
	"citadel-supervisor/supervisor"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/proc"
	"citadel-supervisor/supervisor/supervisortest"
	"context"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"golang.org/x/sys/unix"
)

// The test binary plays three parts: the tests, the daemon (roleEnv) and
// the models (supervisortest.SelfEnv).
//
// This file holds what every suite shares, in every build. The tests are
// in files tagged !e2e (make test: the daemon's own behaviour, once each,
// fast) or e2e (make e2e: the suites that drive it hard); each test is in
// exactly one (TestEveryTestRunsOnce), and the Makefile says which is
// where.
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

// fakeSystemd is the part of systemd a daemon's crash involves: the notify
// socket with its file descriptor store (FDSTORE=1, FDSTOREREMOVE=1), and
// the hand-back of the stored descriptors to the next daemon (LISTEN_FDS,
// LISTEN_FDNAMES, LISTEN_PID), as systemd does for a service it restarts.
type fakeSystemd struct {
	t    *testing.T
	sock string
	mu   sync.Mutex
	fds  map[string]*os.File
	msgs []string
	// env is more of the daemon's environment (WATCHDOG_USEC=…).
	env []string
}

func newFakeSystemd(t *testing.T) *fakeSystemd {
	f := &fakeSystemd{t: t, sock: filepath.Join(t.TempDir(), "notify.sock"), fds: map[string]*os.File{}}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: f.sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		f.mu.Lock()
		defer f.mu.Unlock()
		for _, fd := range f.fds {
			fd.Close()
		}
	})
	go func() {
		buf, oob := make([]byte, 4096), make([]byte, 4096)
		for {
			n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			var files []*os.File
			if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, m := range msgs {
					fds, _ := unix.ParseUnixRights(&m)
					for _, fd := range fds {
						files = append(files, os.NewFile(uintptr(fd), "stored"))
					}
				}
			}
			f.receive(string(buf[:n]), files)
		}
	}()
	return f
}

func (f *fakeSystemd) receive(text string, files []*os.File) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.msgs = append(f.msgs, text)
	kv := map[string]string{}
	for _, line := range strings.Split(text, "\n") {
		if k, v, ok := strings.Cut(line, "="); ok {
			kv[k] = v
		}
	}
	name := kv["FDNAME"]
	switch {
	case kv["FDSTORE"] == "1" && len(files) == 1 && name != "":
		if old := f.fds[name]; old != nil {
			old.Close()
		}
		f.fds[name] = files[0]
		return
	case kv["FDSTOREREMOVE"] == "1":
		if old := f.fds[name]; old != nil {
			old.Close()
			delete(f.fds, name)
		}
	}
	for _, fd := range files {
		fd.Close()
	}
}

func (f *fakeSystemd) stored() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Sorted(maps.Keys(f.fds))
}

func (f *fakeSystemd) sent(prefix string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	n := 0
	for _, m := range f.msgs {
		if strings.HasPrefix(m, prefix) {
			n++
		}
	}
	return n
}

// start starts the daemon as systemd would: NOTIFY_SOCKET, and the stored
// descriptors handed back from descriptor 3 on, named, with LISTEN_PID set
// to the daemon's PID (by a shell that then execs it), with extra flags.
func (f *fakeSystemd) start(s *site, exe string, args ...string) *daemon {
	// Copies: the store may close its own while the daemon starts.
	f.mu.Lock()
	names := slices.Sorted(maps.Keys(f.fds))
	files := make([]*os.File, len(names))
	for i, n := range names {
		fd, err := -1, error(nil)
		if rc, cerr := f.fds[n].SyscallConn(); cerr != nil {
			err = cerr
		} else if cerr := rc.Control(func(s uintptr) { fd, err = unix.Dup(int(s)) }); cerr != nil {
			err = cerr
		}
		if err != nil {
			f.mu.Unlock()
			f.t.Fatal(err)
		}
		files[i] = os.NewFile(uintptr(fd), n)
	}
	f.mu.Unlock()
	defer func() {
		for _, file := range files {
			file.Close()
		}
	}()
	return s.startCmd(func(cmd *exec.Cmd) {
		cmd.Args = append(append([]string{"sh", "-c", `LISTEN_PID=$$ exec "$@"`, "sh", exe}, cmd.Args[1:]...), args...)
		cmd.Path = "/bin/sh"
		cmd.ExtraFiles = files
		cmd.Env = append(append(cmd.Env, f.env...), "NOTIFY_SOCKET="+f.sock)
		if len(files) > 0 {
			cmd.Env = append(cmd.Env, fmt.Sprintf("LISTEN_FDS=%d", len(files)), "LISTEN_FDNAMES="+strings.Join(names, ":"))
		}
	})
}

// statusOf maps each model to its status, as the daemon says.
func statusOf(t *testing.T, socket string) map[string]api.Status {
	t.Helper()
	c := client.New(socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := c.Status(ctx)
	if err != nil {
		return nil
	}
	out := map[string]api.Status{}
	for _, m := range st {
		out[m.Name] = m
	}
	return out
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// killSite kills whatever a site's daemons left: the processes in its
// cgroup subtree, the ones carrying its marker, and every process its
// models recorded. Tests that SIGKILL a daemon on purpose call it (through
// newSite's cleanup too), so `make test` leaves no process behind.
func killSite(s *supervisortest.Site) {
	id := supervisor.Identity(s.Socket)
	if cg, ok := proc.FindCgroups(id); ok {
		root := &proc.Cgroup{Path: cg.Root}
		_ = root.Kill()
		ctx, cancel := context.WithTimeout(context.Background(), proc.KillBound)
		_ = root.WaitEmpty(ctx)
		cancel()
		leaves, _ := cg.Leaves()
		for _, l := range leaves {
			_ = l.Remove()
		}
		_ = root.Remove()
	}
	if groups, err := proc.Marked(id + "/"); err == nil {
		for _, t := range groups {
			_ = t.Kill()
		}
	}
	for _, pid := range siteProcs(s) {
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
}

// daemonPID is the daemon's own PID: through prlimit, the process prlimit
// became (it execs).
func daemonPID(d *daemon) int { return d.cmd.Process.Pid }

// procStatus reads a field of /proc/PID/status, in kB for the memory ones.
func procStatus(t testing.TB, pid int, field string) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, field+":"); ok {
			f := strings.Fields(rest)
			n, _ := strconv.ParseInt(f[0], 10, 64)
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// openFlood opens up to n half-sent requests to addr (fewer if the
// kernel's backlog is full), and holds them until close.
func openFlood(t *testing.T, addr string, n int) *flood {
	t.Helper()
	f := &flood{}
	t.Cleanup(f.close)
	for range n {
		c, err := halfSent(addr, "a")
		if err != nil {
			break
		}
		f.conns = append(f.conns, c)
	}
	return f
}

// flood is many half-sent requests held open.
type flood struct {
	mu    sync.Mutex
	conns []net.Conn
}

func (f *flood) len() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.conns)
}

func (f *flood) close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, c := range f.conns {
		c.Close()
	}
	f.conns = nil
}

// repeatReader reads c for ever.
type repeatReader byte

func (r repeatReader) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = byte(r)
	}
	return len(p), nil
}

// siteProcs lists the running processes of the site: every process any of
// its models recorded, confirmed by its command line naming the site's
// directory (so a reused PID is not counted).
func siteProcs(s *supervisortest.Site) []int {
	var out []int
	for _, m := range s.Models {
		ents, _ := os.ReadDir(filepath.Join(s.Dir, "pids", m.Name))
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || !supervisortest.Running(pid) {
				continue
			}
			cmdline, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
			if err == nil && strings.Contains(string(cmdline), s.Dir) {
				out = append(out, pid)
			}
		}
	}
	slices.Sort(out)
	return out
}

// halfSent opens a connection to addr and sends the headers of a chat
// request whose body stops after its model: the client then goes silent.
func halfSent(addr, model string) (net.Conn, error) {
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	body := `{"model":"` + model + `","messages":[`
	_, err = io.WriteString(c, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4096\r\n\r\n"+body)
	if err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func chat(t *testing.T, gw, model string) (int, string) {
	t.Helper()
	resp, err := http.Post(gw+"/v1/chat/completions", "application/json",
		strings.NewReader(`{"model":"`+model+`","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// startStream sends a 40-token streaming completion for model through the
// gateway; the channel gets the whole body once it ends.
func startStream(t *testing.T, gw, model string) <-chan string {
	t.Helper()
	resp, err := http.Post(gw+"/v1/completions", "application/json",
		strings.NewReader(`{"model":"`+model+`","prompt":"hi","max_tokens":40,"stream":true}`))
	if err != nil {
		t.Fatal(err)
	}
	stream := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		stream <- string(b)
	}()
	return stream
}

// wholeStream reports whether a 40-token stream arrived whole: 40 events
// and the end.
func wholeStream(s string) bool {
	return strings.Count(s, "data: ") == 41 && strings.HasSuffix(strings.TrimSpace(s), "data: [DONE]")
}

// procEnviron reads a live process's environment.
func procEnviron(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		t.Fatal(err)
	}
	env := map[string]string{}
	for _, kv := range bytes.Split(b, []byte{0}) {
		if k, v, ok := strings.Cut(string(kv), "="); ok {
			env[k] = v
		}
	}
	return env
}

// installedDaemon runs the daemon from a copy of this binary, so a test
// can replace it as a package upgrade does.
type installedDaemon struct {
	exe string
}

func newInstalled(t *testing.T) *installedDaemon {
	t.Helper()
	in := &installedDaemon{exe: filepath.Join(t.TempDir(), "citadel-supervisor")}
	in.install(t, "v1")
	return in
}

// install puts a new file (this binary, saying version v) in place.
func (in *installedDaemon) install(t *testing.T, v string) {
	t.Helper()
	b, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(in.exe+".new", b, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(in.exe+".new", in.exe); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(in.exe+".version", []byte(v), 0o644); err != nil {
		t.Fatal(err)
	}
}

func (in *installedDaemon) start(s *site, args ...string) *daemon {
	return s.startCmd(func(cmd *exec.Cmd) {
		cmd.Path, cmd.Args[0] = in.exe, in.exe
		cmd.Args = append(cmd.Args, args...)
	})
}
