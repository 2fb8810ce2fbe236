//go:build e2e

package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/supervisortest"
)

var (
	clientSoakDuration = flag.Duration("hostile-clients.duration", 8*time.Second, "how long TestSoakHostileClients attacks (make soak: 2m)")
	clientSoakSeed     = flag.Uint64("hostile-clients.seed", 0, "the seed of TestSoakHostileClients' attacks; 0 = a new one (printed)")
	clientSoakWorkers  = flag.Int("hostile-clients.workers", 8, "attackers at once in TestSoakHostileClients")
)

// clientSoakNofile is the daemon's descriptor limit in the soak: small, so
// a flood reaches it.
const clientSoakNofile = 2048

// The soak's memory bounds, in kB of RSS: growth under attack (8 MiB of
// body_memory, and the buffers and goroutine of each connection, a few
// hundred here), and what may stay once the attacks are over (Go returns
// freed heap to the system over minutes).
const (
	rssGrowth  = 128 * raceMemory
	rssSettled = 64 << 10 * raceMemory
)

// TestSoakHostileClients attacks a daemon's gateway with every hostile and
// careless client of the suite at once, at random, for
// -hostile-clients.duration, while well-behaved clients keep asking. The
// bounds hold throughout: citadelctl and /metrics answer within a second,
// no model fails or restarts, descriptors stay under the limit less the
// daemon's reserve, bodies within their budget, RSS within body_memory
// and the connections' share; good requests are answered (200, or 429/503
// with a reason), never hung. After the attacks, everything held is let
// go: no request in flight, no body held, RSS and descriptors back down.
// A failure prints the seed; -hostile-clients.seed=N replays it.
func TestSoakHostileClients(t *testing.T) {
	if _, err := exec.LookPath("prlimit"); err != nil {
		t.Fatal("prlimit (util-linux) is needed to lower the daemon's descriptor limit")
	}
	seed := *clientSoakSeed
	if seed == 0 {
		seed = rand.Uint64()
	}
	t.Logf("seed %d (replay: -hostile-clients.seed=%d)", seed, seed)
	defer func() {
		if t.Failed() {
			t.Logf("FAILED with seed %d: go test -tags e2e -run '^TestSoakHostileClients$' ./cmd/citadel-supervisor -args -hostile-clients.seed=%d", seed, seed)
		}
	}()

	httpPort, gwPort := supervisortest.FreePort(t), supervisortest.FreePort(t)
	top := fmt.Sprintf(`listen: 127.0.0.1:%d
gateway:
  listen: 127.0.0.1:%d
  max_wait: 5s
  max_queue: 16
  body_timeout: 1s
  min_body_rate: 4KiB
  send_timeout: 2s
  body_memory: 8MiB
  body_spool: 64MiB
  max_body: 8MiB
`, httpPort, gwPort)
	od := "activation: on_demand\nsleep_level: 1\nidle_after: 1s\nmin_awake: 0s"
	s := &site{Site: supervisortest.NewSite(t, top,
		testModel{Name: "a", YAML: "max_concurrency: 2", Fake: []string{"--fake-token-delay", "1ms"}},
		testModel{Name: "b", YAML: od},
		testModel{Name: "c"},
	), t: t}
	d := s.startWrapped([]string{"prlimit", fmt.Sprintf("--nofile=%d:%d", clientSoakNofile, clientSoakNofile), "--"})
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	addr := fmt.Sprintf("127.0.0.1:%d", gwPort)
	metricsURL := fmt.Sprintf("http://127.0.0.1:%d/metrics", httpPort)
	supervisortest.WaitGateway(t, d, gw)
	d.waitFor(t, 30*time.Second, "a and c ready", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["c"].State == api.Ready
	})
	if code, body := chat(t, gw, "b"); code != 200 {
		t.Fatalf("b: %d %s", code, body)
	}
	pid := daemonPID(d)
	rss0, fds0 := procStatus(t, pid, "VmRSS"), countFDs(t, pid)

	ctx, stop := context.WithTimeout(context.Background(), *clientSoakDuration)
	defer stop()
	var (
		wg       sync.WaitGroup
		attacks  [len(clientAttacks)]atomic.Int64
		problems = make(chan string, 64)
	)
	report := func(format string, args ...any) {
		select {
		case problems <- fmt.Sprintf(format, args...):
		default:
		}
	}
	for w := range *clientSoakWorkers {
		rng := rand.New(rand.NewPCG(seed, uint64(w)))
		wg.Go(func() {
			for ctx.Err() == nil {
				i := rng.IntN(len(clientAttacks))
				attacks[i].Add(1)
				if err := clientAttacks[i].run(ctx, rng, addr, gw); err != nil {
					report("%s: %v", clientAttacks[i].name, err)
				}
			}
		})
	}

	// The bounds, checked while the attacks run.
	var rssPeak int64
	var fdsPeak int
	for ctx.Err() == nil {
		if took, err := quickly(statusWithin(s.Socket)); err != nil {
			report("citadelctl status: %v (after %s)", err, took)
		}
		if took, err := quickly(getWithin(metricsURL)); err != nil {
			report("/metrics: %v (after %s)", err, took)
		}
		for name, m := range statusOf(t, s.Socket) {
			if m.State == api.Failed || m.Restarts != 0 {
				report("%s: %s (%s), %d restarts", name, m.State, m.Reason, m.Restarts)
			}
		}
		_, m := scrape(t, metricsURL)
		if mem := value(m["citadel_gateway_body_bytes"], "store=memory"); mem > 8<<20 {
			report("bodies in memory: %.0f bytes, over body_memory", mem)
		}
		if sp := value(m["citadel_gateway_body_bytes"], "store=spool"); sp > 64<<20 {
			report("bodies in files: %.0f bytes, over body_spool", sp)
		}
		rssPeak = max(rssPeak, procStatus(t, pid, "VmRSS"))
		fdsPeak = max(fdsPeak, countFDs(t, pid))
		select {
		case p := <-problems:
			t.Fatalf("under attack: %s", p)
		case <-time.After(250 * time.Millisecond):
		}
	}
	wg.Wait()
	close(problems)
	for p := range problems {
		t.Errorf("under attack: %s", p)
	}
	for i, a := range clientAttacks {
		t.Logf("%-22s %d", a.name, attacks[i].Load())
	}
	t.Logf("RSS %d MiB at the start, %d MiB at the peak; descriptors %d, peak %d of %d", rss0>>10, rssPeak>>10, fds0, fdsPeak, clientSoakNofile)
	// body_memory, and each connection's buffers and goroutine.
	if grew := (rssPeak - rss0) >> 10; grew > rssGrowth {
		t.Errorf("RSS grew by %d MiB, over %d MiB", grew, rssGrowth)
	}
	if fdsPeak > clientSoakNofile-128 {
		t.Errorf("%d descriptors of %d at the peak: the daemon's reserve was used", fdsPeak, clientSoakNofile)
	}
	// The good clients' kept-alive connections are this test's own.
	http.DefaultClient.CloseIdleConnections()
	var held string
	defer func() {
		if t.Failed() {
			t.Logf("still held at the end: %s", held)
		}
	}()
	d.waitFor(t, 30*time.Second, "everything let go", func() bool {
		_, m := scrape(t, metricsURL)
		var out []string
		for _, model := range []string{"a", "b", "c"} {
			if n := value(m["citadel_gateway_in_flight"], "model="+model); n != 0 {
				out = append(out, fmt.Sprintf("%s: %v in flight", model, n))
			}
			if n := value(m["citadel_gateway_queue_depth"], "model="+model); n != 0 {
				out = append(out, fmt.Sprintf("%s: %v queued", model, n))
			}
		}
		for _, store := range []string{"memory", "spool"} {
			if n := value(m["citadel_gateway_body_bytes"], "store="+store); n != 0 {
				out = append(out, fmt.Sprintf("%v bytes of bodies in %s", n, store))
			}
		}
		if n := value(m["citadel_gateway_connections"]); n != 0 {
			out = append(out, fmt.Sprintf("%v gateway connections", n))
		}
		if n := countFDs(t, pid); n > fds0+16 {
			out = append(out, fmt.Sprintf("%d descriptors (%d at the start)", n, fds0))
		}
		if rss := procStatus(t, pid, "VmRSS"); rss-rss0 > rssSettled {
			out = append(out, fmt.Sprintf("RSS %d MiB (%d MiB at the start)", rss>>10, rss0>>10))
		}
		held = strings.Join(out, "; ")
		return len(out) == 0
	})
}

// clientAttack is one kind of client; run returns an error only for an
// answer the gateway must never give.
type clientAttack struct {
	name string
	run  func(ctx context.Context, rng *rand.Rand, addr, gw string) error
}

var clientAttacks = [...]clientAttack{
	{"silent body", func(ctx context.Context, rng *rand.Rand, addr, gw string) error {
		c, err := halfSent(addr, pick(rng, "a", "b", "c"))
		if err != nil {
			return nil // the backlog is full: the flood is at its height
		}
		defer c.Close()
		return expectStatus(c, 5*time.Second, http.StatusRequestTimeout)
	}},
	{"trickling body", func(ctx context.Context, rng *rand.Rand, addr, gw string) error {
		c, err := halfSent(addr, pick(rng, "a", "c"))
		if err != nil {
			return nil
		}
		defer c.Close()
		go func() {
			for range 40 {
				if _, err := c.Write([]byte(" ")); err != nil {
					return
				}
				<-time.After(100 * time.Millisecond)
			}
		}()
		return expectStatus(c, 10*time.Second, http.StatusRequestTimeout)
	}},
	{"non-reading stream", func(ctx context.Context, rng *rand.Rand, addr, gw string) error {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return nil
		}
		defer c.Close()
		body := `{"model":"a","prompt":"hi","max_tokens":1000000,"stream":true}`
		fmt.Fprintf(c, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		// Reads nothing for longer than send_timeout.
		select {
		case <-time.After(4 * time.Second):
		case <-ctx.Done():
		}
		return nil
	}},
	{"vanishing stream", func(ctx context.Context, rng *rand.Rand, addr, gw string) error {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost, gw+"/v1/completions",
			strings.NewReader(`{"model":"`+pick(rng, "a", "b", "c")+`","prompt":"hi","max_tokens":500,"stream":true}`))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil
		}
		br := bufio.NewReader(resp.Body)
		for range rng.IntN(5) {
			br.ReadString('\n') //nolint:errcheck // then it hangs up
		}
		resp.Body.Close()
		return nil
	}},
	{"two models", func(ctx context.Context, rng *rand.Rand, addr, gw string) error {
		code, body := post(ctx, gw+"/v1/chat/completions", `{"model":"a","messages":[],"mod\u0065l":"c"}`)
		if code != 400 && code != 0 {
			return fmt.Errorf("%d %.200s", code, body)
		}
		return nil
	}},
	{"huge model name", func(ctx context.Context, rng *rand.Rand, addr, gw string) error {
		code, body := post(ctx, gw+"/v1/completions", `{"model":"`+strings.Repeat("m", 1500*1000)+`"}`)
		if code != 0 && (code/100 != 4 || len(body) > 512) {
			return fmt.Errorf("%d, %d bytes", code, len(body))
		}
		return nil
	}},
	{"big bodies", func(ctx context.Context, rng *rand.Rand, addr, gw string) error {
		code, body := post(ctx, gw+"/v1/completions", `{"model":"`+pick(rng, "a", "b", "c")+`","max_tokens":2,"prompt":"`+strings.Repeat("x", 3<<20)+`"}`)
		switch code {
		case 0, 200, 429, 503:
			return nil
		}
		return fmt.Errorf("%d %.200s", code, body)
	}},
	{"idle connections", func(ctx context.Context, rng *rand.Rand, addr, gw string) error {
		var conns []net.Conn
		for range 100 + rng.IntN(300) {
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err != nil {
				break
			}
			conns = append(conns, c)
		}
		select {
		case <-time.After(time.Duration(rng.IntN(3000)) * time.Millisecond):
		case <-ctx.Done():
		}
		for _, c := range conns {
			c.Close()
		}
		return nil
	}},
	{"good client", func(ctx context.Context, rng *rand.Rand, addr, gw string) error {
		rctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		code, body := post(rctx, gw+"/v1/chat/completions", `{"model":"`+pick(rng, "a", "b", "c")+`","messages":[{"role":"user","content":"hi"}],"max_tokens":4}`)
		switch code {
		case 200:
		case 429, 503:
			if !strings.Contains(body, `"code":`) {
				return fmt.Errorf("%d without a reason: %.200s", code, body)
			}
		case 0:
			return fmt.Errorf("no answer within 20 s: %s", body)
		default:
			return fmt.Errorf("%d %.200s", code, body)
		}
		return nil
	}},
}

func pick(rng *rand.Rand, s ...string) string { return s[rng.IntN(len(s))] }

// post sends body and returns the status (0 when no answer came) and the
// answer, or the error.
func post(ctx context.Context, url, body string) (int, string) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// expectStatus reads the answer on c within d and checks its status.
func expectStatus(c net.Conn, d time.Duration, want int) error {
	c.SetReadDeadline(time.Now().Add(d)) //nolint:errcheck // seen by the read
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		return fmt.Errorf("no answer within %s: %v", d, err)
	}
	resp.Body.Close()
	if resp.StatusCode != want {
		return fmt.Errorf("%s, want %d", resp.Status, want)
	}
	return nil
}
