//go:build benchdriver

package gateway

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"citadel-supervisor/supervisor/supervisortest"
)

// The gateway's share of `make bench`: the same fake-vllm process asked
// directly and through the gateway, alternating, in one run: throughput at
// 32 concurrent clients, median latency at 8, median time to the first
// event of a 64-event stream. It prints a table; docs/performance.md holds
// a run. Not a test of speed: nothing here fails on a slow figure.

func newClient() *http.Client {
	return &http.Client{Transport: &http.Transport{MaxIdleConns: 128, MaxIdleConnsPerHost: 128, DisableCompression: true}}
}

// bearer sends every request with an API key, as a client of a gateway
// with api_keys_file does.
type bearer struct {
	token string
	rt    http.RoundTripper
}

// RoundTrip sets the header on the request itself, against the
// RoundTripper rule: each request here is built for one call (Post), and a
// clone per request would count as the gateway's cost in the CPU figures.
func (b bearer) RoundTrip(r *http.Request) (*http.Response, error) {
	r.Header["Authorization"] = []string{"Bearer " + b.token}
	return b.rt.RoundTrip(r)
}

func newKeyClient(token string) *http.Client {
	c := newClient()
	c.Transport = bearer{token, c.Transport}
	return c
}

func call(c *http.Client, url, body string) error {
	resp, err := c.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != 200 {
		return fmt.Errorf("status %d", resp.StatusCode)
	}
	return nil
}

// cpu is the CPU time used so far by this process and by the processes
// pids (the model; HAProxy when it is in the path).
func cpu(t *testing.T, pids ...int) (self, other time.Duration) {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatal(err)
	}
	self = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			t.Fatal(err)
		}
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		ut, _ := strconv.ParseInt(f[11], 10, 64) // utime, stime in clock ticks (100 Hz)
		st, _ := strconv.ParseInt(f[12], 10, 64)
		other += time.Duration(ut+st) * 10 * time.Millisecond
	}
	return self, other
}

// throughput runs clients loops for d and returns requests per second.
func throughput(t *testing.T, c *http.Client, url, body string, clients int, d time.Duration) float64 {
	tp, _ := throughputCPU(t, c, url, body, clients, d)
	return tp
}

// throughputCPU is throughput, also returning the CPU time per request of
// this process (client, and gateway when it is in the path) and of the
// processes pids (the model, and HAProxy when it is in the path).
func throughputCPU(t *testing.T, c *http.Client, url, body string, clients int, d time.Duration, pids ...int) (float64, time.Duration) {
	var s0, o0 time.Duration
	if len(pids) > 0 {
		s0, o0 = cpu(t, pids...)
	}
	var n atomic.Int64
	stop := time.Now().Add(d)
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for time.Now().Before(stop) {
				if err := call(c, url, body); err != nil {
					t.Error(err)
					return
				}
				n.Add(1)
			}
		})
	}
	wg.Wait()
	var per time.Duration
	if len(pids) > 0 {
		s1, o1 := cpu(t, pids...)
		per = (s1 - s0 + o1 - o0) / time.Duration(n.Load())
	}
	return float64(n.Load()) / d.Seconds(), per
}

// latencies runs clients loops of per requests each and returns every
// request's latency.
func latencies(t *testing.T, c *http.Client, url, body string, clients, per int) []time.Duration {
	var mu sync.Mutex
	var out []time.Duration
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for range per {
				start := time.Now()
				if err := call(c, url, body); err != nil {
					t.Error(err)
					return
				}
				d := time.Since(start)
				mu.Lock()
				out = append(out, d)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return out
}

// firstEvent is the time to the first SSE event of a stream read whole.
func firstEvent(t *testing.T, c *http.Client, url, body string) time.Duration {
	first, _ := eventTimes(t, c, url, body)
	return first
}

// eventTimes are the times to the first SSE event of a stream and to its
// end, read whole.
func eventTimes(t *testing.T, c *http.Client, url, body string) (first, whole time.Duration) {
	start := time.Now()
	resp, err := c.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	r := bufio.NewReader(resp.Body)
	events := 0
	for {
		line, err := r.ReadString('\n')
		if strings.HasPrefix(line, "data: ") {
			if events == 0 {
				first = time.Since(start)
			}
			events++
		}
		if err != nil {
			break
		}
	}
	if events != 65 {
		t.Fatalf("%d events, want 64 and [DONE]", events)
	}
	return first, time.Since(start)
}

func med(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

func us(d time.Duration) string { return fmt.Sprintf("%.3f ms", float64(d.Nanoseconds())/1e6) }

// added is a difference with its sign.
func added(d time.Duration) string {
	if d < 0 {
		return "−" + us(-d)
	}
	return "+" + us(d)
}

func TestBenchGateway(t *testing.T) {
	up := startFake(t, "m")
	// The gateway's goroutines carry a profiler label, so a CPU profile
	// of this test (-cpuprofile, then pprof -tagfocus part=gateway, or
	// part=gateway-keys for the one with keys and limits) shows the
	// gateway's share alone.
	via := benchGateway(t, up.base)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// The same gateway with API keys and every policy on: a scope, both
	// rate limits (high enough not to refuse), a max_concurrency per key
	// and a weight; its answers carry the x-ratelimit-* headers and charge
	// the tokens of each answer.
	keys, err := LoadKeys(writeKeys(t, 0o600, "bench "+aliceToken+"\nother "+bobToken+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	gwK, err := Listen("127.0.0.1:0", Options{
		Models: newStub(ready("m", "m", up.base)), Logger: zap.NewNop(), Registerer: prometheus.NewRegistry(),
		Settings: Settings{MaxQueue: 64, MaxWait: time.Minute, MaxBody: 32 << 20, Keys: keys, Policies: map[string]Policy{
			"bench": {Models: []string{"m"}, RequestsPerMinute: 1 << 30, TokensPerMinute: 1 << 30, MaxConcurrency: 64, Weight: 2},
			"other": {RequestsPerMinute: 60},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	doneK := make(chan error, 1)
	go pprof.Do(ctx, pprof.Labels("part", "gateway-keys"), func(ctx context.Context) { doneK <- gwK.Run(ctx) })
	defer func() { cancel(); <-doneK }()

	direct, viaK := up.base, "http://"+gwK.Addr()
	dc, gc, kc := newClient(), newClient(), newKeyClient(aliceToken)
	// Debian's HAProxy in front of the same model, when it is installed:
	// the hop the gateway's is measured against.
	hp, hpPID := startHAProxy(t, up.base, true)
	hc := newClient()
	plain := `{"model":"m","prompt":"hi","max_tokens":1}`
	stream := `{"model":"m","prompt":"hi","max_tokens":64,"stream":true}`
	path := "/v1/completions"
	// Warm both paths' connections.
	throughput(t, dc, direct+path, plain, 32, 300*time.Millisecond)
	throughput(t, gc, via+path, plain, 32, 300*time.Millisecond)
	throughput(t, kc, viaK+path, plain, 32, 300*time.Millisecond)
	if hp != "" {
		throughput(t, hc, hp+path, plain, 32, 300*time.Millisecond)
	}

	// Alternate direct and gateway rounds so all see the same machine.
	var tpD, tpG, tpK float64
	var cpuD, cpuG, cpuK time.Duration
	pid := up.cmd.Process.Pid
	var latD, latG, latK, ttfbD, ttfbG, ttfbK []time.Duration
	var tpH float64
	var cpuH time.Duration
	var latH, ttfbH []time.Duration
	var wholeD, wholeG, wholeK, wholeH []time.Duration
	stream2 := func(c *http.Client, url string, first, whole *[]time.Duration) {
		f, w := eventTimes(t, c, url, stream)
		*first, *whole = append(*first, f), append(*whole, w)
	}
	const rounds = 3
	for range rounds {
		tp, c := throughputCPU(t, dc, direct+path, plain, 32, time.Second, pid)
		tpD, cpuD = tpD+tp/rounds, cpuD+c/rounds
		tp, c = throughputCPU(t, gc, via+path, plain, 32, time.Second, pid)
		tpG, cpuG = tpG+tp/rounds, cpuG+c/rounds
		tp, c = throughputCPU(t, kc, viaK+path, plain, 32, time.Second, pid)
		tpK, cpuK = tpK+tp/rounds, cpuK+c/rounds
		if hp != "" {
			tp, c = throughputCPU(t, hc, hp+path, plain, 32, time.Second, pid, hpPID)
			tpH, cpuH = tpH+tp/rounds, cpuH+c/rounds
			latH = append(latH, latencies(t, hc, hp+path, plain, 8, 100)...)
		}
		latD = append(latD, latencies(t, dc, direct+path, plain, 8, 100)...)
		latG = append(latG, latencies(t, gc, via+path, plain, 8, 100)...)
		latK = append(latK, latencies(t, kc, viaK+path, plain, 8, 100)...)
		for range 50 {
			stream2(dc, direct+path, &ttfbD, &wholeD)
			stream2(gc, via+path, &ttfbG, &wholeG)
			stream2(kc, viaK+path, &ttfbK, &wholeK)
			if hp != "" {
				stream2(hc, hp+path, &ttfbH, &wholeH)
			}
		}
	}
	ratio := func(a, b float64) string { return fmt.Sprintf("%.0f %%", 100*a/b) }
	rows := [][]string{
		{"measure", "direct", "gateway", "gateway vs direct", "gateway, keys and limits", "keys and limits vs direct", "target"},
		{"---", "---", "---", "---", "---", "---", "---"},
		{"throughput, 32 clients", fmt.Sprintf("%.0f req/s", tpD), fmt.Sprintf("%.0f req/s", tpG), ratio(tpG, tpD), fmt.Sprintf("%.0f req/s", tpK), ratio(tpK, tpD), "≥ 50 %"},
		{"CPU per request, 32 clients (client + gateway + model)", us(cpuD), us(cpuG), ratio(float64(cpuD), float64(cpuG)), us(cpuK), ratio(float64(cpuD), float64(cpuK)), "≥ 50 %"},
		{fmt.Sprintf("median latency, 8 clients (%d requests)", len(latD)), us(med(latD)), us(med(latG)), added(med(latG) - med(latD)), us(med(latK)), added(med(latK) - med(latD)), "≤ +0.3 ms"},
		{fmt.Sprintf("median time to first event, 64-event stream (%d streams)", len(ttfbD)), us(med(ttfbD)), us(med(ttfbG)), added(med(ttfbG) - med(ttfbD)), us(med(ttfbK)), added(med(ttfbK) - med(ttfbD)), "≤ +0.5 ms"},
		{fmt.Sprintf("median time to a stream's end, 64 events (%d streams)", len(wholeD)), us(med(wholeD)), us(med(wholeG)), added(med(wholeG) - med(wholeD)), us(med(wholeK)), added(med(wholeK) - med(wholeD)), ""},
	}
	var b strings.Builder
	for _, r := range rows {
		fmt.Fprintf(&b, "    | %s |\n", strings.Join(r, " | "))
	}
	if hp == "" {
		b.WriteString("    (HAProxy not installed: apt-get install haproxy for the side-by-side rows)\n")
	} else {
		hrows := [][]string{
			{"measure", "direct", "HAProxy", "HAProxy vs direct", "gateway vs direct", "gateway vs HAProxy", "target"},
			{"---", "---", "---", "---", "---", "---", "---"},
			{"throughput, 32 clients", fmt.Sprintf("%.0f req/s", tpD), fmt.Sprintf("%.0f req/s", tpH), ratio(tpH, tpD), ratio(tpG, tpD), fmt.Sprintf("%.2f×", tpG/tpH), "gateway ≥ HAProxy"},
			{"CPU per request, 32 clients (client + proxy + model)", us(cpuD), us(cpuH), ratio(float64(cpuD), float64(cpuH)), ratio(float64(cpuD), float64(cpuG)), fmt.Sprintf("%.2f×", float64(cpuG)/float64(cpuH)), ""},
			{fmt.Sprintf("median latency added, 8 clients (%d requests)", len(latD)), us(med(latD)), us(med(latH)), added(med(latH) - med(latD)), added(med(latG) - med(latD)), "", "gateway ≤ HAProxy"},
			{fmt.Sprintf("median time to first event added (%d streams)", len(ttfbD)), us(med(ttfbD)), us(med(ttfbH)), added(med(ttfbH) - med(ttfbD)), added(med(ttfbG) - med(ttfbD)), "", ""},
			{fmt.Sprintf("median time to a stream's end added (%d streams)", len(wholeD)), us(med(wholeD)), us(med(wholeH)), added(med(wholeH) - med(wholeD)), added(med(wholeG) - med(wholeD)), "", ""},
		}
		b.WriteString("\n")
		for _, r := range hrows {
			fmt.Fprintf(&b, "    | %s |\n", strings.Join(r, " | "))
		}
	}
	fmt.Fprint(os.Stdout, b.String())
}

// startHAProxy runs Debian's HAProxy in http mode in front of upstream,
// keep-alive on both sides and server connections reused, as one would
// put it in front of a model, with option http-no-delay when noDelay (as
// citadelctl fleet haproxy writes it); "" when haproxy is not installed.
// It runs in the foreground (-db): pid is the process that proxies.
func startHAProxy(t *testing.T, upstream string, noDelay bool) (base string, pid int) {
	t.Helper()
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		return "", 0
	}
	port := supervisortest.FreePort(t)
	cfg := fmt.Sprintf(`global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option http-keep-alive
    http-reuse always
%sfrontend gateway
    bind 127.0.0.1:%d
    default_backend model
backend model
    server m %s
`, map[bool]string{true: "    option http-no-delay\n"}[noDelay], port, strings.TrimPrefix(upstream, "http://"))
	path := filepath.Join(t.TempDir(), "haproxy.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-db", "-f", path)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill() //nolint:errcheck // may be gone already
		cmd.Wait()         //nolint:errcheck // killed
	})
	base = "http://127.0.0.1:" + strconv.Itoa(port)
	deadline := time.Now().Add(10 * time.Second)
	for {
		if conn, err := net.Dial("tcp", "127.0.0.1:"+strconv.Itoa(port)); err == nil {
			conn.Close()
			return base, cmd.Process.Pid
		}
		if time.Now().After(deadline) {
			t.Fatal("haproxy not listening after 10s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestBenchGatewayStreamPacing: a model that sends a token every 50 ms,
// asked directly, through the gateway and through HAProxy at its defaults
// and with option http-no-delay: when the first event arrives and the
// longest wait between two. HAProxy at its defaults asks the kernel to
// hold small writes for more (MSG_MORE), so a stream's events come late
// and in bursts; citadelctl fleet haproxy therefore sets the option. A
// measurement: nothing here fails on a figure.
func TestBenchGatewayStreamPacing(t *testing.T) {
	up := startFake(t, "m", "--fake-token-delay", "50ms")
	paths := [][2]string{{"direct", up.base}, {"gateway", benchGateway(t, up.base)}}
	if hp, _ := startHAProxy(t, up.base, false); hp != "" {
		hpNoDelay, _ := startHAProxy(t, up.base, true)
		paths = append(paths, [2]string{"HAProxy, defaults", hp}, [2]string{"HAProxy, option http-no-delay", hpNoDelay})
	}
	c := newClient()
	fmt.Printf("    | path (10 tokens, one every 50 ms; 10 streams) | first event, median | longest wait between events | events that came in a burst |\n    |---|---|---|---|\n")
	for _, p := range paths {
		var firsts []time.Duration
		var longest time.Duration
		burst, events := 0, 0
		for range 10 {
			start := time.Now()
			resp, err := c.Post(p[1]+"/v1/completions", "application/json", strings.NewReader(`{"model":"m","prompt":"hi","max_tokens":10,"stream":true}`))
			if err != nil {
				t.Fatal(err)
			}
			r := bufio.NewReader(resp.Body)
			var last time.Time
			for {
				line, err := r.ReadString('\n')
				if strings.HasPrefix(line, "data: ") && !strings.HasPrefix(line, "data: [DONE]") {
					now := time.Now()
					if last.IsZero() {
						firsts = append(firsts, now.Sub(start))
					} else {
						longest = max(longest, now.Sub(last))
						if now.Sub(last) < 5*time.Millisecond {
							burst++
						}
					}
					last = now
					events++
				}
				if err != nil {
					break
				}
			}
			resp.Body.Close()
		}
		fmt.Printf("    | %s | %s | %s | %d of %d |\n", p[0], us(med(firsts)), us(longest), burst, events)
	}
}

// benchGateway runs a gateway with no keys in front of the model at
// upstream until the test ends, its goroutines labelled part=gateway for
// a CPU profile, and returns its base URL.
func benchGateway(t *testing.T, upstream string) string {
	t.Helper()
	gw, err := Listen("127.0.0.1:0", Options{
		Models: newStub(ready("m", "m", upstream)), Logger: zap.NewNop(), Registerer: prometheus.NewRegistry(),
		Settings: Settings{MaxQueue: 64, MaxWait: time.Minute, MaxBody: 32 << 20},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go pprof.Do(ctx, pprof.Labels("part", "gateway"), func(ctx context.Context) { done <- gw.Run(ctx) })
	t.Cleanup(func() { cancel(); <-done })
	return "http://" + gw.Addr()
}
