//go:build benchdriver

package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
)

// The driver behind `make bench`: the same fake-vllm children under
// citadel-supervisor and, where Debian's supervisor package is installed,
// under supervisord, measured the same way (new PIDs seen in fake-vllm's
// own pid files, polled every millisecond). It prints a table.

type row struct{ what, citadel, supervisord, note string }

func median(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// process is supervisord as a supervisortest.Daemon.
type process struct {
	cmd  *exec.Cmd
	done chan struct{}
}

func (p *process) Done() <-chan struct{} { return p.done }
func (p *process) Exit() string          { return p.cmd.ProcessState.String() }

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }

// newServer waits for a server pid not in seen to appear in dir.
func newServer(t *testing.T, s *supervisortest.Site, model string, seen map[int]string) int {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		for pid, role := range s.PIDs(t, model) {
			if role == "server" && seen[pid] == "" && supervisortest.Running(pid) {
				return pid
			}
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("%s: no new server", model)
	return 0
}

func killRespawn(t *testing.T, d supervisortest.Daemon, s *supervisortest.Site, model string, rounds int) time.Duration {
	var lat []time.Duration
	for range rounds {
		seen := s.PIDs(t, model)
		cur := supervisortest.Live(seen, "server")
		if len(cur) != 1 {
			t.Fatalf("%s: live servers %v", model, cur)
		}
		start := time.Now()
		syscall.Kill(cur[0], syscall.SIGKILL) //nolint:errcheck // measured
		newServer(t, s, model, seen)
		lat = append(lat, time.Since(start))
		// Let it become ready before the next kill.
		supervisortest.WaitOn(t, d, 10*time.Second, "ready", func() bool { return portUp(s, model) })
	}
	return median(lat)
}

func portUp(s *supervisortest.Site, model string) bool {
	for _, m := range s.Models {
		if m.Name == model {
			resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(m.Port) + "/health")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == 200
		}
	}
	return false
}

func rssAndIdleCPU(t *testing.T, d supervisortest.Daemon, pid int, over time.Duration) (string, string) {
	read := func() (int64, float64) {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		ut, _ := strconv.ParseFloat(f[11], 64)
		st, _ := strconv.ParseFloat(f[12], 64)
		rss, _ := strconv.ParseInt(f[21], 10, 64)
		return rss * int64(os.Getpagesize()), (ut + st) / 100
	}
	_, c0 := read()
	deadline := time.Now().Add(over)
	supervisortest.WaitOn(t, d, over+5*time.Second, "the idle period", func() bool { return time.Now().After(deadline) })
	rss, c1 := read()
	return fmt.Sprintf("%.1f MiB", float64(rss)/(1<<20)), fmt.Sprintf("%.2f %%", 100*(c1-c0)/over.Seconds())
}

func sevenModels(extra string, stopDelays bool) []testModel {
	names := []string{"mixtral", "hermes", "openchat", "phi3", "yi34b", "coder", "vision"}
	var out []testModel
	for i, n := range names {
		m := testModel{Name: n, YAML: extra}
		if stopDelays {
			m.Fake = []string{"--fake-stop-delay", fmt.Sprintf("%dms", 100*(i+1))}
		}
		out = append(out, m)
	}
	return out
}

func TestBenchTable(t *testing.T) {
	var rows []row
	const idle = 10 * time.Second

	// citadel-supervisor, the seven models, restart delay 0.
	listen := "127.0.0.1:" + strconv.Itoa(supervisortest.FreePort(t))
	s := &site{Site: supervisortest.NewSite(t, "listen: "+listen+"\n",
		sevenModels("restart: {delay: 0s, max_delay: 0s, burst: 1000}\nprobe: {period: 10s}", true)...), t: t}
	d := s.start()
	d.waitFor(t, 60*time.Second, "seven models healthy", s.healthy)
	kr := killRespawn(t, d, s.Site, "phi3", 20)
	rss, cpu := rssAndIdleCPU(t, d, d.cmd.Process.Pid, idle)
	c := client.New(s.Socket)
	var reloads []time.Duration
	for range 20 {
		start := time.Now()
		if _, err := c.Reload(context.Background()); err != nil {
			t.Fatal(err)
		}
		reloads = append(reloads, time.Since(start))
	}
	var scrapes []time.Duration
	for range 50 {
		start := time.Now()
		resp, err := http.Get("http://" + listen + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		scrapes = append(scrapes, time.Since(start))
	}
	start := time.Now()
	d.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // measured
	d.wait(t)
	stopAll := time.Since(start)

	// Hang → restart, against the configured bound.
	h := &site{Site: supervisortest.NewSite(t, "", testModel{Name: "hangs",
		YAML: "probe: {period: 200ms, timeout: 150ms, failure_threshold: 3}\nrestart: {delay: 0s, max_delay: 0s, burst: 1000}",
		Fake: []string{"--fake-hang-after", "500ms"}}), t: t}
	hd := h.start()
	var hangs []time.Duration
	for range 5 {
		var seen map[int]string
		var cur []int
		hd.waitFor(t, 10*time.Second, "hangs up", func() bool {
			seen = h.PIDs(t, "hangs")
			cur = supervisortest.Live(seen, "server")
			return len(cur) == 1
		})
		hungAt := processStart(t, cur[0]).Add(500 * time.Millisecond)
		newServer(t, h.Site, "hangs", seen)
		hangs = append(hangs, time.Since(hungAt))
	}
	hd.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // done
	hd.wait(t)
	bound := 3*200*time.Millisecond + 150*time.Millisecond

	sd := supervisordRun(t, idle)
	rows = append(rows,
		row{"kill -9 → new process (restart delay 0)", ms(kr), sd["kill"], "median of 20"},
		row{"hang → restarted", ms(median(hangs)), "never (no health checks)", fmt.Sprintf("bound period×threshold+timeout = %s", bound)},
		row{"stop all 7 (slowest takes 700 ms)", ms(stopAll), sd["stop"], "parallel stop ≈ the slowest one"},
		row{"reload of an unchanged config", ms(median(reloads)), sd["reload"], "citadelctl reload / supervisorctl update"},
		row{"/metrics scrape, 7 models", ms(median(scrapes)), "n/a", "median of 50, over HTTP"},
		row{"daemon RSS, 7 models running", rss, sd["rss"], ""},
		row{"daemon CPU while idle", cpu, sd["cpu"], fmt.Sprintf("over %s; citadel probes every 10 s", idle)},
	)
	var b strings.Builder
	fmt.Fprintf(&b, "\n| measure | citadel-supervisor | supervisord | supervisord ÷ citadel | note |\n|---|---|---|---|---|\n")
	for _, r := range rows {
		fmt.Fprintf(&b, "| %s | %s | %s | %s | %s |\n", r.what, r.citadel, r.supervisord, ratio(r.citadel, r.supervisord), r.note)
	}
	t.Log(b.String())
	if out := os.Getenv("BENCH_TABLE"); out != "" {
		os.WriteFile(out, []byte(b.String()), 0o644) //nolint:errcheck // best effort
	}
}

// ratio divides two figures of the same unit ("12.4 ms", "30.4 MiB").
func ratio(a, b string) string {
	fa, ua, okA := strings.Cut(a, " ")
	fb, ub, okB := strings.Cut(b, " ")
	x, errA := strconv.ParseFloat(fa, 64)
	y, errB := strconv.ParseFloat(fb, 64)
	if !okA || !okB || ua != ub || errA != nil || errB != nil || x == 0 {
		return "–"
	}
	return fmt.Sprintf("%.1f×", y/x)
}

// processStart is when pid started, from /proc/PID/stat and the boot time.
func processStart(t *testing.T, pid int) time.Time {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ticks, _ := strconv.ParseInt(f[19], 10, 64)
	up, _ := os.ReadFile("/proc/uptime")
	secs, _ := strconv.ParseFloat(strings.Fields(string(up))[0], 64)
	boot := time.Now().Add(-time.Duration(secs * float64(time.Second)))
	return boot.Add(time.Duration(ticks) * 10 * time.Millisecond)
}

// supervisordRun measures Debian's supervisord with the same seven
// fake-vllm programs; "not installed" rows if it is not there.
func supervisordRun(t *testing.T, idle time.Duration) map[string]string {
	out := map[string]string{}
	bin, err := exec.LookPath("supervisord")
	if err != nil {
		for _, k := range []string{"kill", "stop", "reload", "rss", "cpu"} {
			out[k] = "not installed"
		}
		return out
	}
	sdSite := supervisortest.NewSite(t, "", sevenModels("", true)...)
	dir := t.TempDir()
	conf := filepath.Join(dir, "supervisord.conf")
	var b strings.Builder
	fmt.Fprintf(&b, "[supervisord]\nnodaemon=true\nlogfile=%s/sd.log\npidfile=%s/sd.pid\nchildlogdir=%s\n", dir, dir, dir)
	fmt.Fprintf(&b, "[unix_http_server]\nfile=%s/sd.sock\n[rpcinterface:supervisor]\nsupervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n", dir)
	fmt.Fprintf(&b, "[supervisorctl]\nserverurl=unix://%s/sd.sock\n", dir)
	for i, m := range sdSite.Models {
		fmt.Fprintf(&b, "[program:%s]\ncommand=%s --model %s --port %d --fake-pid-dir %s --fake-stop-delay %dms\n",
			m.Name, os.Args[0], filepath.Join(sdSite.Dir, "models", m.Name), m.Port, filepath.Join(sdSite.Dir, "pids", m.Name), 100*(i+1))
		fmt.Fprintf(&b, "environment=%s=\"1\"\nautorestart=true\nstartsecs=0\nstopwaitsecs=30\nstopasgroup=true\nkillasgroup=true\n", supervisortest.SelfEnv)
	}
	os.WriteFile(conf, []byte(b.String()), 0o644) //nolint:errcheck // checked by start
	cmd := exec.Command(bin, "-c", conf)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }() //nolint:errcheck // measured
	t.Cleanup(func() { cmd.Process.Kill(); <-p.done })
	ss := &site{Site: sdSite, t: t}
	supervisortest.WaitOn(t, p, 60*time.Second, "supervisord's seven healthy", ss.healthy)
	out["kill"] = ms(killRespawn(t, p, sdSite, "phi3", 20))
	out["rss"], out["cpu"] = rssAndIdleCPU(t, p, cmd.Process.Pid, idle)
	var reloads []time.Duration
	for range 5 {
		start := time.Now()
		if err := exec.Command("supervisorctl", "-c", conf, "update").Run(); err != nil {
			t.Fatal(err)
		}
		reloads = append(reloads, time.Since(start))
	}
	out["reload"] = ms(median(reloads))
	start := time.Now()
	cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // measured
	<-p.done
	out["stop"] = ms(time.Since(start))
	return out
}
