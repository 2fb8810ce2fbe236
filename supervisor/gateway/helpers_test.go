package gateway

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"citadel-supervisor/supervisor/supervisortest"
)

func TestMain(m *testing.M) {
	supervisortest.RunFakeIfAsked()
	supervisortest.ExitWithoutDelay()
	os.Exit(m.Run())
}

// fake is a fake-vllm process: the test binary re-executed.
type fake struct {
	cmd  *exec.Cmd
	port int
	base string

	mu    sync.Mutex
	lines []string
	more  chan struct{} // closed and replaced at each new line
}

// startFake runs fake-vllm serving served on a free port, and returns once
// it listens. The process is killed and reaped when the test ends.
func startFake(t *testing.T, served string, args ...string) *fake {
	t.Helper()
	f := &fake{port: supervisortest.FreePort(t), more: make(chan struct{})}
	f.base = "http://127.0.0.1:" + strconv.Itoa(f.port)
	argv := append([]string{"--model", "/models/" + served, "--served-model-name", served, "--port", strconv.Itoa(f.port)}, args...)
	f.cmd = exec.Command(os.Args[0], argv...)
	f.cmd.Env = append(os.Environ(), supervisortest.SelfEnv+"=1")
	f.cmd.Stderr = os.Stderr
	out, err := f.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := f.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			f.mu.Lock()
			f.lines = append(f.lines, sc.Text())
			close(f.more)
			f.more = make(chan struct{})
			f.mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		f.cmd.Process.Kill() //nolint:errcheck // may be gone already
		f.cmd.Wait()         //nolint:errcheck // killed
	})
	// vLLM (and the fake) print this just before they listen: wait for the
	// line, then for the port to accept.
	f.waitLine(t, "Starting vLLM API server", 10*time.Second)
	supervisortest.WaitFor(t, 10*time.Second, "fake-vllm to listen", func() bool {
		c, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(f.port))
		if err != nil {
			return false
		}
		c.Close()
		return true
	})
	return f
}

// waitLine waits for a line of the fake's output containing s.
func (f *fake) waitLine(t *testing.T, s string, d time.Duration) { f.waitLines(t, s, 1, d) }

// waitLines waits for n lines of the fake's output containing s.
func (f *fake) waitLines(t *testing.T, s string, n int, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for {
		f.mu.Lock()
		seen := 0
		for _, l := range f.lines {
			if strings.Contains(l, s) {
				seen++
			}
		}
		if seen >= n {
			f.mu.Unlock()
			return
		}
		more := f.more
		f.mu.Unlock()
		select {
		case <-more:
		case <-deadline:
			t.Fatalf("fake-vllm did not print %q within %s", s, d)
		}
	}
}

// running is the fake's own count of requests in flight.
func (f *fake) running(t *testing.T) string {
	t.Helper()
	resp, err := http.Get(f.base + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "vllm:num_requests_running") {
			return l[strings.LastIndexByte(l, ' ')+1:]
		}
	}
	t.Fatalf("no vllm:num_requests_running in %s", b)
	return ""
}

// stubModels is a Models the test drives.
type stubModels struct {
	mu      sync.Mutex
	models  []Model
	changed chan struct{}
	demands map[string]int // Demand calls by model
	unwants map[string]int // Unwanted calls by model
}

func newStub(models ...Model) *stubModels {
	return &stubModels{models: models, changed: make(chan struct{})}
}

func (s *stubModels) Models() []Model {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Model(nil), s.models...)
}

func (s *stubModels) Changed() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

func (s *stubModels) Demand(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.demands == nil {
		s.demands = map[string]int{}
	}
	s.demands[name]++
}

func (s *stubModels) Unwanted(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.unwants == nil {
		s.unwants = map[string]int{}
	}
	s.unwants[name]++
}

// calls reads how often Demand and Unwanted were called for name.
func (s *stubModels) calls(name string) (demands, unwants int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.demands[name], s.unwants[name]
}

// set changes one model's state and tells the gateway.
func (s *stubModels) set(name, state, reason string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range s.models {
		if s.models[i].Name == name {
			s.models[i].State, s.models[i].Reason = state, reason
			s.models[i].Seq++
		}
	}
	close(s.changed)
	s.changed = make(chan struct{})
}

// setAndWait changes a model's state and waits until the gateway applied it.
func (s *site) setAndWait(t *testing.T, stub *stubModels, name, state, reason string) {
	t.Helper()
	stub.set(name, state, reason)
	waitFor(t, 5*time.Second, "the gateway to see "+name+" "+state, func() bool {
		rt := s.gw.table.Load().byName[name]
		return rt != nil && rt.model.State == state && rt.model.Reason == reason
	})
}

// site is a running gateway over stub models.
type site struct {
	gw   *Gateway
	url  string
	reg  *prometheus.Registry
	logs *observer.ObservedLogs
}

func defaultSettings() Settings {
	return Settings{MaxQueue: 8, MaxWait: time.Minute, MaxBody: 32 << 20}
}

// startGateway runs a gateway on a free port until the test ends.
func startGateway(t *testing.T, models Models, set Settings, timer Timer) *site {
	t.Helper()
	core, logs := observer.New(zap.DebugLevel)
	reg := prometheus.NewRegistry()
	gw, err := Listen("127.0.0.1:0", Options{Models: models, Logger: zap.New(core), Settings: set, Registerer: reg, Timer: timer})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- gw.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("gateway Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Error("gateway Run did not return within 10s of its context ending")
		}
	})
	waitFor(t, 5*time.Second, "gateway serving", func() bool { return gw.Serving() == nil })
	return &site{gw: gw, url: "http://" + gw.Addr(), reg: reg, logs: logs}
}

func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	supervisortest.WaitFor(t, d, what, cond)
}

// post sends body to path with an optional bearer token.
func post(t *testing.T, ctx context.Context, url, body, token string) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil && !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	return resp
}

func readAll(t *testing.T, resp *http.Response) string {
	t.Helper()
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// metric returns a series' value (a histogram's count), and whether it
// exists.
func (s *site) metric(t *testing.T, name string, labels map[string]string) (float64, bool) {
	t.Helper()
	fams, err := s.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
	series:
		for _, m := range f.GetMetric() {
			have := map[string]string{}
			for _, l := range m.GetLabel() {
				have[l.GetName()] = l.GetValue()
			}
			for k, v := range labels {
				if have[k] != v {
					continue series
				}
			}
			switch {
			case m.Counter != nil:
				return m.GetCounter().GetValue(), true
			case m.Gauge != nil:
				return m.GetGauge().GetValue(), true
			case m.Histogram != nil:
				return float64(m.GetHistogram().GetSampleCount()), true
			}
		}
	}
	return 0, false
}

// value is metric's value, 0 when absent.
func (s *site) value(t *testing.T, name string, labels map[string]string) float64 {
	t.Helper()
	v, _ := s.metric(t, name, labels)
	return v
}

// killFake SIGKILLs the fake, as a crashing vLLM dies.
func (f *fake) kill(t *testing.T) {
	t.Helper()
	if err := f.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
}
