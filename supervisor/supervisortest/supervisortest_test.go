package supervisortest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"citadel-supervisor/config"
)

// TestExitWithoutDelay: the children's GORACE asks for no sleep at exit,
// and an option the caller set comes after it, so it still wins.
func TestExitWithoutDelay(t *testing.T) {
	for _, tc := range []struct{ name, before, want string }{
		{"unset", "", "atexit_sleep_ms=0"},
		{"the caller's options kept, after", "halt_on_error=1", "atexit_sleep_ms=0 halt_on_error=1"},
		{"the caller's own exit sleep wins", "atexit_sleep_ms=500", "atexit_sleep_ms=0 atexit_sleep_ms=500"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("GORACE", tc.before)
			ExitWithoutDelay()
			if got := os.Getenv("GORACE"); got != tc.want {
				t.Errorf("GORACE=%q, want %q", got, tc.want)
			}
		})
	}
}

// TestSiteListensNowhereUnasked: whatever else a test's top-level YAML
// says, a site's daemon serves no HTTP and no gateway unless the test
// asks for one, so none is left on a production default (listen's
// 127.0.0.1:9400) that another daemon on the host may hold. Read back with
// the config package, as the daemon reads it.
func TestSiteListensNowhereUnasked(t *testing.T) {
	for name, top := range map[string]string{
		"nothing":                      "",
		"log only":                     "log: {level: debug}\n",
		"gateway without listen, flow": "gateway: {max_wait: 1m}\n",
		"gateway without listen":       "gateway:\n  max_wait: 1m\n",
		"listen said in a comment":     "# listen: 127.0.0.1:9400\ngpu: {backend: none}\n",
		"sim GPUs":                     "gpu:\n  backend: sim\n  sim:\n    devices: [{uuid: GPU-0, memory: 80GiB}]\n",
	} {
		t.Run(name, func(t *testing.T) {
			s := NewSite(t, top, Model{Name: "a"})
			cfg, err := config.Parse([]byte(s.YAML), nil)
			if err != nil {
				t.Fatal(err)
			}
			if cfg.Listen != "" || cfg.Gateway.Listen != "" {
				t.Errorf("listen %q, gateway.listen %q, want both off:\n%s", cfg.Listen, cfg.Gateway.Listen, s.YAML)
			}
			if cfg.ControlSocket != s.Socket || !strings.HasPrefix(cfg.CacheDir, s.Dir+"/") {
				t.Errorf("control_socket %q, cache_dir %q: not in the site's %s", cfg.ControlSocket, cfg.CacheDir, s.Dir)
			}
			if m := cfg.Models[0]; m.Port != s.Models[0].Port || m.Port < config.EphemeralPorts().Lo {
				t.Errorf("model port %d, site says %d", m.Port, s.Models[0].Port)
			}
		})
	}
}

// TestSiteRefusesFixedPorts: a listen address a test wrote by hand (the
// production default, or any port the kernel did not hand out) fails the
// site, naming the key; one from FreePort is taken as it is.
func TestSiteRefusesFixedPorts(t *testing.T) {
	eph := config.EphemeralPorts()
	fixed := fmt.Sprintf("a fixed port (the kernel hands out %d-%d); take one from the kernel (FreePort)", eph.Lo, eph.Hi)
	for _, tc := range []struct{ name, top, want string }{
		{"the default listen", "listen: 127.0.0.1:9400\n",
			"listen: 127.0.0.1:9400 is the production default's port, which a daemon on this host may hold; take one from the kernel (FreePort)"},
		{"the default port on every address", "listen: \":9400\"\n",
			"listen: :9400 is the production default's port, which a daemon on this host may hold; take one from the kernel (FreePort)"},
		{"a fixed gateway port", "gateway: {listen: 127.0.0.1:8000}\n", "gateway.listen: 127.0.0.1:8000 is " + fixed},
		{"a fixed gateway port, block style", "gateway:\n  listen: 127.0.0.1:8000\n", "gateway.listen: 127.0.0.1:8000 is " + fixed},
		{"both", "listen: 127.0.0.1:1\ngateway: {listen: 0.0.0.0:8000}\n",
			"listen: 127.0.0.1:1 is " + fixed + "\ngateway.listen: 0.0.0.0:8000 is " + fixed},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := checkListeners(build(t, tc.top))
			if err == nil || err.Error() != tc.want {
				t.Errorf("got %v\nwant %s", err, tc.want)
			}
		})
	}
	top := fmt.Sprintf("listen: 127.0.0.1:%d\ngateway: {listen: 127.0.0.1:%d}\n", FreePort(t), FreePort(t))
	if err := checkListeners(build(t, top)); err != nil {
		t.Errorf("ports from the kernel refused: %v", err)
	}
}

// TestSiteKeysOfTheHarness: the keys the harness sets cannot be set by a
// test as well (the file would set them twice, or the test's would be lost).
func TestSiteKeysOfTheHarness(t *testing.T) {
	for _, tc := range []struct {
		name, top string
		m         Model
		want      string
	}{
		{"control_socket", "control_socket: /run/citadel/supervisor.sock\n", Model{Name: "a"},
			"top-level YAML sets control_socket, which the harness sets (give models, and their keys in Model.YAML)"},
		{"models", "models: {b: {model: /m}}\n", Model{Name: "a"},
			"top-level YAML sets models, which the harness sets (give models, and their keys in Model.YAML)"},
		{"a model's port", "", Model{Name: "a", YAML: "port: 9400"},
			"models.a: Model.YAML sets port, which the harness sets (fake-vllm flags go in Model.Fake)"},
		{"a model's args", "", Model{Name: "a", YAML: "args: [--x]"},
			"models.a: Model.YAML sets args, which the harness sets (fake-vllm flags go in Model.Fake)"},
		{"not a mapping", "- listen\n", Model{Name: "a"}, "top-level YAML: not a mapping of keys:\n- listen\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := buildSite(tc.top, siteSpec{dir: t.TempDir(), models: []Model{tc.m}})
			if err == nil || err.Error() != tc.want {
				t.Errorf("got %v\nwant %s", err, tc.want)
			}
		})
	}
}

// TestSiteLedger: with the sim backend, written in either style, the
// fakes keep the ledger of GPU memory in the site unless the test names
// its own usage_dir; without it there is none.
func TestSiteLedger(t *testing.T) {
	for _, tc := range []struct{ name, top, want string }{
		{"block", "gpu:\n  backend: sim\n  sim:\n    devices: [{uuid: GPU-0, memory: 80GiB}]\n", "site"},
		{"flow", "gpu: {backend: sim, sim: {devices: [{uuid: GPU-0, memory: 80GiB}]}}\n", "site"},
		{"own usage_dir", "gpu:\n  backend: sim\n  sim:\n    usage_dir: /elsewhere\n    devices: [{uuid: GPU-0, memory: 80GiB}]\n", "/elsewhere"},
		{"backend none", "gpu: {backend: none}\n", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := NewSite(t, tc.top, Model{Name: "a"})
			want := tc.want
			if want == "site" {
				want = filepath.Join(s.Dir, "gpu-ledger")
			}
			if s.Ledger != want {
				t.Errorf("ledger %q, want %q", s.Ledger, want)
			}
			cfg, err := config.Parse([]byte(s.YAML), nil)
			if err != nil {
				t.Fatal(err)
			}
			args := strings.Join(cfg.Models[0].Args, " ")
			if cfg.GPU.Sim.UsageDir != want || (want != "") != strings.Contains(args, "--fake-usage-dir "+want) {
				t.Errorf("usage_dir %q, model a's args %q, want the ledger %q in both", cfg.GPU.Sim.UsageDir, args, want)
			}
		})
	}
}

// TestEditYAML: edits by key path, and their errors.
func TestEditYAML(t *testing.T) {
	const y = "gateway: {listen: \"\", keys: {team-a: {models: [a]}}}\nmodels:\n  a: {model: /m/a}\n  b:\n    model: /m/b\n"
	got, err := EditYAML(y, Set("models.b.env.EXTRA", "1"), Delete("models.a"), Set("gateway.keys.team-a.models", []string{"a", "b"}))
	if err != nil {
		t.Fatal(err)
	}
	want := "gateway: {listen: \"\", keys: {team-a: {models: [a, b]}}}\nmodels:\n  b:\n    model: /m/b\n    env:\n      EXTRA: \"1\"\n"
	if got != want {
		t.Errorf("got\n%s\nwant\n%s", got, want)
	}
	if v, ok := Value(got, "models.b.env.EXTRA"); v != "1" || !ok {
		t.Errorf("Value: %q %v", v, ok)
	}
	for _, tc := range []struct {
		edit Edit
		want string
	}{
		{Delete("models.c"), "delete models.c: no such key"},
		{Delete("gateway.listen.x"), "delete gateway.listen.x: no such key"},
		{Set("gateway.listen.x", 1), "set gateway.listen.x: gateway.listen is not a mapping"},
	} {
		if _, err := EditYAML(y, tc.edit); err == nil || err.Error() != tc.want {
			t.Errorf("got %v, want %s", err, tc.want)
		}
	}
}

// build is buildSite for top with one model, encoded.
func build(t *testing.T, top string) string {
	t.Helper()
	dir := t.TempDir()
	root, _, err := buildSite(top, siteSpec{dir: dir, socket: filepath.Join(dir, "s.sock"), events: filepath.Join(dir, "events.jsonl"),
		cacheDir: filepath.Join(dir, "cache"), ledger: filepath.Join(dir, "gpu-ledger"), command: os.Args[0],
		models: []Model{{Name: "a", Port: FreePort(t)}}})
	if err != nil {
		t.Fatal(err)
	}
	y, err := encode(root)
	if err != nil {
		t.Fatal(err)
	}
	return y
}

// TestDaemonEnviron: a daemon under test gets no CITADEL_* override (a
// developer's CITADEL_LISTEN would put it on that port) and none of
// systemd's variables, and the test's own come last.
func TestDaemonEnviron(t *testing.T) {
	t.Setenv("CITADEL_LISTEN", "127.0.0.1:9400")
	t.Setenv("CITADEL_GATEWAY_LISTEN", ":8000")
	t.Setenv("NOTIFY_SOCKET", "/run/systemd/notify")
	t.Setenv("LISTEN_FDS", "3")
	env := DaemonEnviron("NOTIFY_SOCKET=/tmp/test.sock", "CITADEL_TEST_AS_DAEMON=1")
	for _, kv := range env[:len(env)-2] {
		if strings.HasPrefix(kv, "CITADEL_") || strings.HasPrefix(kv, "NOTIFY_SOCKET=") || strings.HasPrefix(kv, "LISTEN_FDS=") {
			t.Errorf("%s reaches the daemon", kv)
		}
	}
	if got := env[len(env)-2:]; got[0] != "NOTIFY_SOCKET=/tmp/test.sock" || got[1] != "CITADEL_TEST_AS_DAEMON=1" {
		t.Errorf("the test's own variables: %q", got)
	}
	if !slices.Contains(env, "PATH="+os.Getenv("PATH")) {
		t.Error("PATH lost")
	}
}

// proc is a process as a Daemon.
type proc struct {
	cmd  *exec.Cmd
	out  SyncBuffer
	done chan struct{}
}

func startProc(t *testing.T, script string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command("sh", "-c", script), done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = &p.out, &p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.cmd.Wait(); close(p.done) }() //nolint:errcheck // ProcessState says
	t.Cleanup(func() {
		p.cmd.Process.Kill() //nolint:errcheck // gone already, mostly
		<-p.done
	})
	return p
}

func (p *proc) Done() <-chan struct{} { return p.done }
func (p *proc) Exit() string          { return p.cmd.ProcessState.String() + "; " + Tail(p.out.String(), 2) }

// TestWaitOnSeesTheDaemonExit: a wait on a daemon that exits fails at once
// (long before its deadline, an hour here), saying that the daemon exited,
// how, and what it said last; a condition that holds is no failure, even
// once the daemon is gone.
func TestWaitOnSeesTheDaemonExit(t *testing.T) {
	p := startProc(t, "echo one; echo two; echo 'listen: address already in use'; exit 3")
	got := FailureOf(t, func(tb testing.TB) {
		WaitOn(tb, p, time.Hour, "the gateway up", func() bool { return false })
	})
	want := "the daemon exited while the test waited for the gateway up: exit status 3; [1 lines before]\ntwo\nlisten: address already in use"
	if got != want {
		t.Errorf("got %q\nwant %q", got, want)
	}
	if got := FailureOf(t, func(tb testing.TB) {
		WaitOn(tb, p, time.Hour, "the output", func() bool { return strings.Contains(p.out.String(), "two") })
	}); got != "" {
		t.Errorf("a condition that holds failed: %s", got)
	}

	alive := startProc(t, "exec sleep 3600")
	n := 0
	if got := FailureOf(t, func(tb testing.TB) {
		WaitOn(tb, alive, time.Hour, "the third look", func() bool { n++; return n == 3 })
	}); got != "" {
		t.Errorf("a wait on a running daemon failed: %s", got)
	}
	if got, want := FailureOf(t, func(tb testing.TB) {
		WaitOn(tb, alive, 50*time.Millisecond, "nothing", func() bool { return false })
	}), "timed out after 50ms waiting for nothing"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}
