//go:build !e2e

package main

// The daemon as a process, in make test: what only the binary does and no
// test at a lower level covers (its flags, signals, the socket's lock, its
// HTTP endpoints, systemd's notify protocol), each once and fast. The
// suites that drive the daemon hard (upgrades and crash adoption in every
// corner, hostile children and clients, soaks, the watchdog) are tagged
// e2e and run under make e2e; see the Makefile.

import (
	"bytes"
	"citadel-supervisor/supervisor"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
	"context"
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
)

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

// specFamilies are the metric families of docs/metrics.md.
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
	d.waitFor(t, 30*time.Second, "every family of docs/metrics.md", func() bool {
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

// TestSystemdNotifySequence runs the daemon as systemd would, with a real
// notify socket: READY=1 once the control socket answers (not waiting for
// models), STATUS= kept current, RELOADING=1 + MONOTONIC_USEC then READY=1
// around a reload, STOPPING=1 at SIGTERM. NOTIFY_SOCKET must not reach a
// model.
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
