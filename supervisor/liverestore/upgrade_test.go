package liverestore

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"
	"golang.org/x/sys/unix"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/netguard"
	"citadel-supervisor/supervisor/proc"
)

// The upgrade protocol in one test process: the old daemon is a fake
// owner of real child processes (fakeModels), the new binary a shell
// script that answers the preflight, and the exec is injected: the new
// image runs as a function that reads the handed-over payload and takes
// the descriptors it names, as main does after a real exec. The real
// re-exec of the daemon binary is covered end to end in
// cmd/citadel-supervisor (restore_test.go, and the e2e-tagged suites).

// fakeModels owns real children (shell loops writing to a pipe) and
// freezes them as the supervisor would: their state and output pipes.
type fakeModels struct {
	t     *testing.T
	id    string // the supervisor's identity in the children's markers
	cmds  []*exec.Cmd
	pipes map[string]*os.File // "<model>/stdout": the read ends
	busy  error               // a model that cannot be written down now

	mu             sync.Mutex
	frozen, thawed int
}

func newFakeModels(t *testing.T, names ...string) *fakeModels {
	f := &fakeModels{t: t, id: fmt.Sprintf("test%d-%d", os.Getpid(), time.Now().UnixNano()), pipes: map[string]*os.File{}}
	for _, name := range names {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command("/bin/sh", "-c", `while :; do echo "$0 alive"; sleep 0.05; done`, name)
		cmd.Stdout = w
		cmd.Env = append(os.Environ(), proc.MarkerEnv+"="+f.marker(name))
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		w.Close()
		f.cmds = append(f.cmds, cmd)
		f.pipes[name+"/stdout"] = r
	}
	t.Cleanup(func() {
		for _, c := range f.cmds {
			_ = c.Process.Kill()
			_ = c.Wait()
		}
		for _, p := range f.pipes {
			p.Close()
		}
	})
	return f
}

func (f *fakeModels) marker(name string) string { return f.id + "/" + name + "/token" }

func (f *fakeModels) pids() map[string]int {
	out := map[string]int{}
	for i, c := range f.cmds {
		out[c.Args[len(c.Args)-1]] = f.cmds[i].Process.Pid
	}
	return out
}

func (f *fakeModels) Freeze(ctx context.Context) (*Handover, map[string]*os.File, func(), error) {
	if f.busy != nil {
		<-ctx.Done()
		return nil, nil, nil, fmt.Errorf("%w (it did not settle in time)", f.busy)
	}
	f.mu.Lock()
	f.frozen++
	f.mu.Unlock()
	h := &Handover{Version: HandoverVersion}
	for name, pid := range f.pids() {
		h.Models = append(h.Models, ModelState{Name: name, State: "ready",
			Instance: &InstanceState{Model: name, PID: pid, Marker: f.marker(name), GPUs: []string{"GPU-0"}}})
	}
	slices.SortFunc(h.Models, func(a, b ModelState) int { return strings.Compare(a.Name, b.Name) })
	once := sync.OnceFunc(func() {
		f.mu.Lock()
		f.thawed++
		f.mu.Unlock()
	})
	return h, f.pipes, once, nil
}

func (f *fakeModels) counts() (frozen, thawed int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.frozen, f.thawed
}

// alive fails the test unless every child still runs with its PID.
func (f *fakeModels) alive(t *testing.T) {
	t.Helper()
	for name, pid := range f.pids() {
		if err := syscall.Kill(pid, 0); err != nil {
			t.Errorf("%s (pid %d): %v", name, pid, err)
		}
	}
}

// reaper is the daemon's reaper as the preflight meets it: every child
// the upgrade starts must be started through it.
type reaper struct {
	mu   sync.Mutex
	args [][]string
}

func (r *reaper) Exec(cmd *exec.Cmd) error {
	r.mu.Lock()
	r.args = append(r.args, cmd.Args[1:])
	r.mu.Unlock()
	return cmd.Run()
}

type notifier struct {
	mu               sync.Mutex
	ready, reloading int
}

func (n *notifier) Ready()     { n.mu.Lock(); n.ready++; n.mu.Unlock() }
func (n *notifier) Reloading() { n.mu.Lock(); n.reloading++; n.mu.Unlock() }

// binary writes a new binary that answers the preflight: handover version
// takes, and --check's exit code.
func binary(t *testing.T, takes string, check int) string {
	t.Helper()
	exe := filepath.Join(t.TempDir(), "citadel-supervisor")
	script := fmt.Sprintf("#!/bin/sh\ncase \"$1\" in\n--handover-version) echo '%s v-new';;\n--check) echo 'config: checked'; exit %d;;\nesac\n", takes, check)
	if err := os.WriteFile(exe, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return exe
}

// oldDaemon is the image being upgraded: its models, its control listener
// answering "old", and its upgrader with exec injected.
type oldDaemon struct {
	models *fakeModels
	reaper *reaper
	notify *notifier
	u      *Upgrader
	addr   string
	kept   bool
}

func newOldDaemon(t *testing.T, exe string, execve ExecFunc, models ...string) *oldDaemon {
	t.Helper()
	if len(models) == 0 {
		models = []string{"a", "b"}
	}
	d := &oldDaemon{models: newFakeModels(t, models...), reaper: &reaper{}, notify: &notifier{}}
	d.u = &Upgrader{
		Log: zaptest.NewLogger(t), Notify: d.notify, Exe: exe, Args: []string{exe, "--config", "c.yaml"},
		Environ: []string{"PATH=" + os.Getenv("PATH"), "LISTEN_FDS=3", Env + "=9"}, Config: "c.yaml",
		Version: "v-old", Upgrades: 2, Starter: d.reaper, Models: d.models, Exec: execve,
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	guard := netguard.Limit(ln, 8, zap.NewNop())
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "old") })}
	go srv.Serve(guard) //nolint:errcheck // closed at the test's end
	t.Cleanup(func() { srv.Close() })
	d.addr = ln.Addr().String()
	d.u.Serve(&Server{Name: "control", Guard: guard, HTTP: srv, Bound: ControlDrain}, func() { d.kept = true })
	return d
}

// get asks addr's server who answers, without keep-alives.
func get(t *testing.T, addr string) string {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	res, err := c.Get("http://" + addr + "/")
	if err != nil {
		t.Fatalf("GET %s: %v", addr, err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return string(b)
}

// TestUpgradeKeepsEveryProcess: a successful upgrade hands the next image
// every model with its PID and its output pipe, and the listener with the
// connections that waited in its backlog meanwhile.
func TestUpgradeKeepsEveryProcess(t *testing.T) {
	var (
		got     *Payload
		lines   = map[string]string{}
		queued  = make(chan string, 1)
		newDone = make(chan struct{})
	)
	var d *oldDaemon
	// The new image: what main does with the handover after a real exec.
	newImage := func(path string, argv, env []string) error {
		defer close(newDone)
		if path != d.u.Exe || !slices.Equal(argv, d.u.Args) {
			t.Errorf("exec %s %q; want %s %q", path, argv, d.u.Exe, d.u.Args)
		}
		for _, kv := range env {
			if strings.HasPrefix(kv, "LISTEN_") {
				t.Errorf("the new image is given %s: systemd's variables are for the first image only", kv)
			}
		}
		// A client connects while no image accepts: it waits in the
		// backlog for the new one.
		go func() { queued <- get(t, d.addr) }()
		p, kept, err := Read(env)
		if err != nil {
			t.Errorf("read the handover: %v", err)
			return nil
		}
		if slices.ContainsFunc(kept, func(kv string) bool { return strings.HasPrefix(kv, Env+"=") }) {
			t.Errorf("%s is left in the environment the models inherit", Env)
		}
		got = p
		ln, err := p.Listener("control")
		if err != nil || ln == nil {
			t.Errorf("the control listener: %v, %v", ln, err)
			return nil
		}
		srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "new") })}
		go srv.Serve(ln) //nolint:errcheck // closed at the test's end
		t.Cleanup(func() { srv.Close() })
		for _, m := range p.Supervisor.Models {
			f := Inherited(m.Instance.StdoutFD, m.Name+" stdout")
			if f == nil {
				t.Errorf("%s: no output pipe handed over", m.Name)
				continue
			}
			line, err := bufio.NewReader(f).ReadString('\n')
			f.Close()
			if err != nil {
				t.Errorf("%s: read its output: %v", m.Name, err)
			}
			lines[m.Name] = strings.TrimSpace(line)
		}
		return nil
	}
	d = newOldDaemon(t, binary(t, "1", 0), newImage)
	if s := get(t, d.addr); s != "old" {
		t.Fatalf("before the upgrade: %q", s)
	}
	before := d.models.pids()

	res, commit, err := d.u.Prepare(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	if res.From != "v-old" || res.To != "v-new" || res.Models != 2 || res.Running != 2 {
		t.Errorf("upgrade answer: %+v", res)
	}
	commit()
	select {
	case <-newDone:
	case <-time.After(10 * time.Second):
		t.Fatal("the new image never ran")
	}
	if got == nil {
		t.FailNow()
	}

	if got.Version != HandoverVersion || got.From != "v-old" || got.Upgrades != 2 {
		t.Errorf("payload: version %d from %q upgrades %d", got.Version, got.From, got.Upgrades)
	}
	for _, m := range got.Supervisor.Models {
		if m.Instance.PID != before[m.Name] {
			t.Errorf("%s: handed over pid %d; it runs as %d", m.Name, m.Instance.PID, before[m.Name])
		}
		if lines[m.Name] != m.Name+" alive" {
			t.Errorf("%s: read %q from its handed-over pipe", m.Name, lines[m.Name])
		}
	}
	if len(got.Supervisor.Models) != 2 {
		t.Errorf("handed over %d models; want 2", len(got.Supervisor.Models))
	}
	// The new image's reaper is told these are its children, waited for
	// by their runners.
	children := got.Supervisor.Children()
	slices.Sort(children)
	want := []int{before["a"], before["b"]}
	slices.Sort(want)
	if !slices.Equal(children, want) {
		t.Errorf("handed-over children %v; want %v", children, want)
	}
	d.models.alive(t)
	select {
	case s := <-queued:
		if s != "new" {
			t.Errorf("a client that connected during the exec was answered %q; want the new image", s)
		}
	case <-time.After(10 * time.Second):
		t.Error("a client that connected during the exec was never answered")
	}
	// Replaced: the old image thaws nothing, and told systemd it reloads.
	if frozen, thawed := d.models.counts(); frozen != 2 || thawed != 1 {
		t.Errorf("froze %d times and thawed %d; want 2 and 1 (the check before the drain only)", frozen, thawed)
	}
	if d.notify.reloading != 1 || d.notify.ready != 0 || !d.kept {
		t.Errorf("reloading %d, ready %d, socket file kept %v; want 1, 0, true", d.notify.reloading, d.notify.ready, d.kept)
	}
	preflight := [][]string{{"--handover-version"}, {"--check", "--config", "c.yaml"}}
	if !slices.EqualFunc(d.reaper.args, preflight, slices.Equal) {
		t.Errorf("children started through the reaper: %q; want %q", d.reaper.args, preflight)
	}
}

// TestUpgradeRefusedLeavesEverythingRunning: a new binary that refuses
// (another handover version, a configuration it rejects, or none that
// runs) is never executed; nothing was paused or frozen, and the old
// image serves on with every model.
func TestUpgradeRefusedLeavesEverythingRunning(t *testing.T) {
	for _, tc := range []struct {
		name, takes string
		check       int
		want        string
	}{
		{name: "another handover version", takes: "99", want: `takes handover version "99", this daemon hands over version 1`},
		{name: "the configuration refused", takes: "1", check: 1, want: "--check --config c.yaml: exit status 1:\nconfig: checked"},
		{name: "a check that only warns", takes: "1", check: 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			execs := 0
			d := newOldDaemon(t, binary(t, tc.takes, tc.check), func(string, []string, []string) error { execs++; return nil })
			before := d.models.pids()
			_, commit, err := d.u.Prepare(context.Background(), false)
			if tc.want == "" {
				// Exit 4: warnings the running daemon has as well.
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				commit()
				if execs != 1 {
					t.Errorf("executed %d times; want 1", execs)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "the running daemon (version v-old) keeps running") {
				t.Fatalf("got %v; want an error saying %q", err, tc.want)
			}
			if execs != 0 {
				t.Errorf("executed %d times; want never", execs)
			}
			if frozen, _ := d.models.counts(); frozen != 0 {
				t.Errorf("froze the models %d times before the preflight passed", frozen)
			}
			if s := get(t, d.addr); s != "old" {
				t.Errorf("after the refusal: %q", s)
			}
			if !maps.Equal(d.models.pids(), before) {
				t.Errorf("pids %v → %v", before, d.models.pids())
			}
			d.models.alive(t)
			var dm api.Daemon
			d.u.Daemon(&dm)
			if dm.UpgradeFailures != 1 || !strings.Contains(dm.LastUpgradeError, tc.want) {
				t.Errorf("the daemon's description: %d failures, last %q", dm.UpgradeFailures, dm.LastUpgradeError)
			}
			// Nothing is held: the next upgrade may begin.
			if _, _, err := d.u.Prepare(context.Background(), false); err == nil || strings.Contains(err.Error(), "already in progress") {
				t.Errorf("a second try: %v", err)
			}
		})
	}
}

// TestUpgradeBusyModelThawsAndResumes: a model that cannot be written down
// (a stop in flight) refuses the upgrade before anything pauses.
func TestUpgradeBusyModelThawsAndResumes(t *testing.T) {
	d := newOldDaemon(t, binary(t, "1", 0), func(string, []string, []string) error { t.Error("executed"); return nil })
	d.models.busy = errors.New("not now: a is stopping")
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, _, err := d.u.Prepare(ctx, false); err == nil || !strings.Contains(err.Error(), "a is stopping") {
		t.Fatalf("got %v", err)
	}
	if s := get(t, d.addr); s != "old" {
		t.Errorf("after the refusal: %q", s)
	}
}

// TestUpgradeExecFailsResumes: an exec that fails (the binary is gone
// since its preflight) leaves the old image as it was: the models thawed,
// the listener accepting, systemd told it is ready again, the failure
// counted; the next upgrade may begin.
func TestUpgradeExecFailsResumes(t *testing.T) {
	var memfd int
	d := newOldDaemon(t, binary(t, "1", 0), func(_ string, _, env []string) error {
		for _, kv := range env {
			if v, ok := strings.CutPrefix(kv, Env+"="); ok {
				fmt.Sscan(v, &memfd)
			}
		}
		return syscall.ENOENT
	})
	_, commit, err := d.u.Prepare(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	commit()
	// What it opened for the next image is closed again.
	if _, err := unix.FcntlInt(uintptr(memfd), unix.F_GETFD, 0); !errors.Is(err, unix.EBADF) {
		t.Errorf("the handover's memfd %d is still open after the failed exec (%v)", memfd, err)
	}
	if frozen, thawed := d.models.counts(); frozen != 2 || thawed != 2 {
		t.Errorf("froze %d times and thawed %d; want 2 and 2", frozen, thawed)
	}
	if d.notify.reloading != 1 || d.notify.ready != 1 {
		t.Errorf("reloading %d, ready %d; want 1 and 1", d.notify.reloading, d.notify.ready)
	}
	if s := get(t, d.addr); s != "old" {
		t.Errorf("after the failed exec: %q", s)
	}
	d.models.alive(t)
	var dm api.Daemon
	d.u.Daemon(&dm)
	if dm.UpgradeFailures != 1 || !strings.Contains(dm.LastUpgradeError, "no such file or directory") {
		t.Errorf("the daemon's description: %d failures, last %q", dm.UpgradeFailures, dm.LastUpgradeError)
	}
	if _, _, err := d.u.Prepare(context.Background(), false); err != nil {
		t.Errorf("a second try after a failed exec: %v", err)
	}
}

// TestNewImageThatCannotTakeOver: a new image that cannot take the
// handover (here: a build of another handover version, put in place after
// the preflight) exits without touching anything, as main does: the old
// image is gone, so nothing is thawed, and the models run on with their
// PIDs. The successor (systemd restarts the daemon) adopts them as after a
// crash: by their markers and instance records; a process without a
// record is stopped.
func TestNewImageThatCannotTakeOver(t *testing.T) {
	recs := Records{Dir: t.TempDir()}
	var readErr error
	d := newOldDaemon(t, binary(t, "1", 0), func(_ string, _, env []string) error {
		_, _, readErr = read(env, HandoverVersion+1)
		return nil // it was executed; it exits 1 on its own
	}, "a", "b", "c")
	before := d.models.pids()
	for _, name := range []string{"a", "b"} { // c's record is lost
		st, err := proc.ReadStat(before[name])
		if err != nil {
			t.Fatal(err)
		}
		if err := recs.Write(InstanceState{Model: name, PID: before[name], Start: st.Start, Marker: d.models.marker(name)}); err != nil {
			t.Fatal(err)
		}
	}
	_, commit, err := d.u.Prepare(context.Background(), false)
	if err != nil {
		t.Fatal(err)
	}
	commit()
	want := fmt.Sprintf("handover version %d; this binary takes %d", HandoverVersion, HandoverVersion+1)
	if readErr == nil || readErr.Error() != want {
		t.Errorf("the new image's read: %v; want %q", readErr, want)
	}
	if _, thawed := d.models.counts(); thawed != 1 {
		t.Errorf("thawed %d times; want 1 (the check before the drain only: the old image is gone)", thawed)
	}
	d.models.alive(t)

	var cfg config.Config
	for _, name := range []string{"a", "b", "c"} {
		cfg.Models = append(cfg.Models, config.Model{Name: name, StopTimeout: time.Second})
	}
	got := Successor{ID: d.models.id, Keep: Keep{Records: recs, Log: zaptest.NewLogger(t)}}.TakeOver(&cfg, nil)
	for _, name := range []string{"a", "b"} {
		tk := got[name]
		if tk == nil || tk.State.Instance == nil {
			t.Errorf("%s: not adopted", name)
			continue
		}
		if tk.State.Instance.PID != before[name] || tk.Child {
			t.Errorf("%s: adopted pid %d (child %v); want %d, not a child (a crash re-parents it)", name, tk.State.Instance.PID, tk.Child, before[name])
		}
		if err := syscall.Kill(before[name], 0); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	if got["c"] != nil {
		t.Errorf("c, without a record, was adopted: %+v", got["c"])
	}
	if st, err := proc.ReadStat(before["c"]); err == nil && st.State != 'Z' {
		t.Errorf("c (pid %d), without a record, still runs", before["c"])
	}
	all, err := recs.All()
	if err != nil || len(all) != 2 {
		t.Errorf("records after the adoption: %v, %v; want a's and b's", all, err)
	}
}

// TestHandoverVersionAnswer: the answer to --handover-version, as main
// writes it and Preflight reads it.
func TestHandoverVersionAnswer(t *testing.T) {
	var b strings.Builder
	if err := WriteHandoverVersion(&b, "v9"); err != nil {
		t.Fatal(err)
	}
	if got, want := b.String(), fmt.Sprintf("%d v9\n", HandoverVersion); got != want {
		t.Errorf("answer %q; want %q", got, want)
	}
}
