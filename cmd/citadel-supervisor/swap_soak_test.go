//go:build e2e

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/gpu"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
	"citadel-supervisor/supervisor/supervisortest/fakevllm"
)

var (
	swapSeed     = flag.Uint64("swap.seed", 0, "TestSwapSoak's seed (0: from the clock); a failure prints it")
	swapDuration = flag.Duration("swap.duration", 12*time.Second, "how long TestSwapSoak loads the gateway (make soak: 10m)")
	swapFaults   = flag.Bool("swap.faults", true, "TestSwapSoak injects faults (false: the load alone, to measure it)")
	swapClients  = flag.Int("swap.clients", 8, "TestSwapSoak's concurrent clients")
)

// swapModels are the soak's five on-demand models on two 80 GiB GPUs:
// far more than fits at once, so requests swap them all the time. One
// sleeps at level 2, one stops (sleep_level 0), one spans both GPUs.
var swapModels = []struct {
	name, yaml string
	weight     int // its share of the requests
}{
	{"m0", "gpu_memory_utilization: 0.55\nsleep_level: 1", 4},
	{"m1", "gpu_memory_utilization: 0.45\nsleep_level: 2", 3},
	{"m2", "gpu_memory_utilization: 0.35\nsleep_level: 1", 2},
	{"m3", "gpu_memory_utilization: 0.5\ntensor_parallel: 2\nsleep_level: 1\npriority: 1", 2},
	{"m4", "gpu_memory_utilization: 0.6\nsleep_level: 0", 1},
}

// swapMinAwake is every soak model's min_awake; idle_after is longer, so
// a sleep within min_awake of a wake can only be an eviction (or manual).
const swapMinAwake = time.Second

// TestSwapSoak is the on-demand swap core under load and faults: eight
// clients send requests through the gateway to five on-demand models on
// two sim GPUs while the soak restarts, stops, sleeps and wakes models,
// reloads changed configurations, SIGKILLs and SIGSTOPs models, upgrades
// the daemon in place and SIGKILLs it. At every step it checks what must
// always hold, from the sim's ledger of held GPU memory and the fake
// engines' event log (docs/on-demand.md, "What always holds"):
//
//	(a) a GPU's held memory never exceeds what it has (no engine ran out
//	    of memory);
//	(b) no model was put to sleep within min_awake of waking, but by hand;
//	(c) every request was answered 200, or honestly 503 while its model was
//	    held stopped, or cut by a fault that hit its model or the daemon
//	    while it was in flight;
//	(d) no request reached a sleeping engine and no sleep was ordered with
//	    one in flight;
//	(e) at the end every model answers, the gateway's in-flight and queue
//	    gauges are back to zero, and each model runs at most one server;
//	(f) no engine's start failed its memory profiling (vLLM aborts a start
//	    whose GPU's memory others change while it loads, vllm#56830), but
//	    where the soak SIGKILLed a neighbour on that GPU during the load.
//
// The seed fixes the sequence of faults and requests (not their timing);
// a failure prints it, and -swap.seed replays it.
func TestSwapSoak(t *testing.T) {
	seed := *swapSeed
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("replay: go test -tags e2e -count=1 -run '^TestSwapSoak$' ./cmd/citadel-supervisor -args -swap.seed=%d -swap.duration=%s -swap.faults=%v",
				seed, *swapDuration, *swapFaults)
		}
	})
	k := newSwapSoak(t, seed)
	k.start()
	ctx, stop := context.WithTimeout(context.Background(), *swapDuration)
	defer stop()
	var wg sync.WaitGroup
	began := time.Now()
	for i := range *swapClients {
		wg.Go(func() { k.client(ctx, i) })
	}
	checked := make(chan struct{})
	go func() { defer close(checked); k.checkLoop(ctx) }()
	if *swapFaults {
		k.faultLoop(ctx)
	}
	<-ctx.Done()
	loadFor := time.Since(began)
	wg.Wait()
	<-checked
	k.settle()
	k.check()
	k.checkRequests()
	k.report(began, loadFor)
}

type swapSoak struct {
	t      *testing.T
	seed   uint64
	rng    *rand.Rand // the fault loop's
	s      *site
	gw     string
	listen string
	sd     *fakeSystemd
	in     *installedDaemon
	ledger gpu.SimLedger
	total  uint64 // each GPU's memory

	mu        sync.Mutex
	d         *daemon
	version   int
	down      []window            // the daemon dead (SIGKILL) until its successor's gateway answered
	held      map[string][]window // held stopped by the soak
	hit       map[string][]window // a fault hit the model (killed, stopped, restarted)
	manual    map[string][]time.Time
	killed    []killing // the models' servers SIGKILLed, for (f)
	results   []swapResult
	faults    map[string]int
	yaml      string
	reloadSeq int

	log     []string   // each fault, with when it ended, for a failure's report
	eventMu sync.Mutex // the checks run from the check loop and the fault loop
	events  eventState
}

type window struct{ from, to time.Time }

// killing is a server the soak SIGKILLed: its memory went at once.
type killing struct {
	pid int
	at  time.Time
}

func (w window) overlaps(from, to time.Time) bool { return !to.Before(w.from) && !from.After(w.to) }

type swapResult struct {
	model, client string
	from, to      time.Time
	code          int
	body          string
	err           error
}

func newSwapSoak(t *testing.T, seed uint64) *swapSoak {
	gwPort, listenPort := supervisortest.FreePort(t), supervisortest.FreePort(t)
	top := fmt.Sprintf(`listen: 127.0.0.1:%d
log: {level: warn}
gpu:
  backend: sim
  headroom: 1GiB
  release_timeout: 10s
  sim:
    devices:
      - {uuid: GPU-00000000-0000-0000-0000-000000000000, name: Sim H100, memory: 80GiB}
      - {uuid: GPU-11111111-1111-1111-1111-111111111111, name: Sim H100, memory: 80GiB}
gateway: {listen: 127.0.0.1:%d, max_wait: 3m, max_queue: 1024}
`, listenPort, gwPort)
	fake := []string{"--fake-load-time", "300ms", "--fake-wake-time-l1", "100ms", "--fake-wake-time-l2", "300ms",
		"--fake-sleep-time", "50ms", "--fake-tokens", "4", "--fake-token-delay", "10ms"}
	var models []testModel
	for _, m := range swapModels {
		models = append(models, testModel{Name: m.name, Fake: fake, YAML: "activation: on_demand\nidle_after: 5s\nmin_awake: 1s\n" +
			"restart: {delay: 50ms, max_delay: 1s, burst: 1000, interval: 1m}\n" + m.yaml})
	}
	s := &site{Site: supervisortest.NewSite(t, top, models...), t: t}
	k := &swapSoak{
		t: t, seed: seed, rng: rand.New(rand.NewPCG(seed, 1)), s: s,
		gw: fmt.Sprintf("http://127.0.0.1:%d", gwPort), listen: fmt.Sprintf("http://127.0.0.1:%d", listenPort),
		sd: newFakeSystemd(t), in: newInstalled(t), ledger: gpu.SimLedger{Dir: s.Ledger}, total: 80 << 30,
		held: map[string][]window{}, hit: map[string][]window{}, manual: map[string][]time.Time{}, faults: map[string]int{},
		yaml: s.YAML, version: 1,
	}
	k.events = eventState{path: s.Events, pids: map[int]*engine{}, gpus: map[int][]string{}}
	// (f) is checked here, where the soak's own SIGKILLs are known.
	s.Tolerate = append(s.Tolerate, "profile_failed")
	return k
}

func (k *swapSoak) start() {
	k.d = k.sd.start(k.s, k.in.exe)
	supervisortest.WaitGateway(k.t, k.d, k.gw)
}

// client sends requests until ctx ends: a model chosen by weight, one at a
// time, each named (X-Fake-Client) so the engines' event log tells client
// requests from the daemon's own.
func (k *swapSoak) client(ctx context.Context, i int) {
	rng := rand.New(rand.NewPCG(k.seed, uint64(100+i)))
	hc := &http.Client{Timeout: 5 * time.Minute}
	sum := 0
	for _, m := range swapModels {
		sum += m.weight
	}
	for n := 0; ctx.Err() == nil; n++ {
		pick := rng.IntN(sum)
		var model string
		for _, m := range swapModels {
			if pick < m.weight {
				model = m.name
				break
			}
			pick -= m.weight
		}
		r := swapResult{model: model, client: fmt.Sprintf("c%d-%d", i, n), from: time.Now()}
		req, _ := http.NewRequest(http.MethodPost, k.gw+"/v1/chat/completions",
			strings.NewReader(`{"model":"`+model+`","messages":[{"role":"user","content":"hi"}],"max_tokens":4}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("X-Fake-Client", r.client)
		// Replayable, as OpenAI's clients retry: a request sent on an idle
		// keep-alive connection the server closes at that instant (an
		// upgrade pauses the gateway and closes its idle connections) is
		// sent again on a new one; it never reached the server.
		req.Header.Set("Idempotency-Key", r.client)
		resp, err := hc.Do(req)
		if err == nil {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			r.code, r.body = resp.StatusCode, string(b)
		}
		r.err, r.to = err, time.Now()
		k.mu.Lock()
		k.results = append(k.results, r)
		k.mu.Unlock()
		think := time.Duration(rng.IntN(50)) * time.Millisecond
		if r.code != 200 {
			think += 200 * time.Millisecond // a daemon down refuses at once: no hammering
		}
		pause := time.NewTimer(think)
		select {
		case <-pause.C:
		case <-ctx.Done():
			pause.Stop()
		}
	}
}

// checkLoop checks the invariants every 200 ms until ctx ends.
func (k *swapSoak) checkLoop(ctx context.Context) {
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			k.check()
		}
	}
}

// check asserts (a), (b) and (d) on what the ledger and the event log say
// now.
func (k *swapSoak) check() {
	t := k.t
	held, err := k.ledger.Held()
	if err != nil {
		t.Errorf("read the sim's ledger: %v", err)
		return
	}
	for u, b := range held {
		if b > k.total {
			t.Errorf("(a) GPU %s holds %d MiB of %d MiB", u, b>>20, k.total>>20)
		}
	}
	k.mu.Lock()
	manual := map[string][]time.Time{}
	for m, ts := range k.manual {
		manual[m] = slices.Clone(ts)
	}
	killed := slices.Clone(k.killed)
	k.mu.Unlock()
	k.eventMu.Lock()
	defer k.eventMu.Unlock()
	for _, v := range k.events.read(t, manual, killed) {
		t.Error(v)
	}
}

// faultLoop throws a random fault every 0.4 to 2 s until ctx ends.
func (k *swapSoak) faultLoop(ctx context.Context) {
	for ctx.Err() == nil {
		pause := time.NewTimer(time.Duration(400+k.rng.IntN(1600)) * time.Millisecond)
		select {
		case <-pause.C:
		case <-ctx.Done():
			pause.Stop()
			return
		}
		model := swapModels[k.rng.IntN(len(swapModels))].name
		began := time.Now()
		switch f := k.rng.IntN(100); {
		case f < 10:
			// A planned stop drains the model first: nothing is cut.
			k.op(api.OpRestart, model, false)
		case f < 18:
			k.op(api.OpSleep, model, false)
		case f < 24:
			k.op(api.OpWake, model, false)
		case f < 32:
			k.stopStart(ctx, model)
		case f < 40:
			k.reloadEnv(model)
		case f < 46:
			k.reloadSleepLevel(model)
		case f < 60:
			k.killModel(model)
		case f < 72:
			k.sigstop(ctx, model)
		case f < 86:
			k.upgrade()
		default:
			k.killDaemon()
		}
		if took := time.Since(began); took > 5*time.Second {
			k.t.Logf("a fault at %s took %s", began.Format("15:04:05.000"), took.Round(time.Millisecond))
		}
		k.check()
	}
}

func (k *swapSoak) count(fault string) {
	k.mu.Lock()
	k.faults[fault]++
	k.log = append(k.log, time.Now().Format("15:04:05.000")+" "+fault)
	k.mu.Unlock()
}

func (k *swapSoak) markHit(model string, from, to time.Time) {
	k.mu.Lock()
	k.hit[model] = append(k.hit[model], window{from, to})
	k.mu.Unlock()
}

func (k *swapSoak) ctl() (*client.Client, context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	return client.New(k.s.Socket), ctx, cancel
}

// op sends an operation; with cut, requests in flight then may be cut
// (a planned stop aborts them in vLLM).
func (k *swapSoak) op(op api.Op, model string, cut bool) {
	c, ctx, cancel := k.ctl()
	defer cancel()
	defer c.Close()
	from := time.Now()
	if op == api.OpSleep {
		k.mu.Lock()
		k.manual[model] = append(k.manual[model], from)
		k.mu.Unlock()
	}
	_, err := c.Op(ctx, op, model)
	if cut {
		k.markHit(model, from, time.Now().Add(2*time.Second))
	}
	k.count(string(op) + errSuffix(err))
}

func errSuffix(err error) string {
	if err != nil {
		return " (refused)"
	}
	return ""
}

// stopStart holds a model stopped for 0.3 to 2 s: its requests get an
// honest 503 meanwhile.
func (k *swapSoak) stopStart(ctx context.Context, model string) {
	c, cctx, cancel := k.ctl()
	defer cancel()
	defer c.Close()
	from := time.Now()
	_, err := c.Op(cctx, api.OpStop, model)
	pause := time.NewTimer(time.Duration(300+k.rng.IntN(1700)) * time.Millisecond)
	select {
	case <-pause.C:
	case <-ctx.Done():
		pause.Stop()
	}
	_, err2 := c.Op(cctx, api.OpStart, model)
	to := time.Now().Add(time.Second) // the start reaches the gateway's queue
	k.mu.Lock()
	k.held[model] = append(k.held[model], window{from, to})
	k.mu.Unlock()
	k.count("stop+start" + errSuffix(errors.Join(err, err2)))
}

// reloadEnv changes a model's environment: a reload restarts it (a
// sleeper is stopped and starts at its next request), drained first.
func (k *swapSoak) reloadEnv(model string) {
	k.mu.Lock()
	k.reloadSeq++
	y, err := supervisortest.EditYAML(k.yaml, supervisortest.Set("models."+model+".env", map[string]string{"SOAK": strconv.Itoa(k.reloadSeq)}))
	if err == nil {
		k.yaml = y
	}
	k.mu.Unlock()
	if err != nil {
		k.t.Errorf("reload (env): %v", err)
		return
	}
	// Its restart drains it first: nothing is cut.
	k.count("reload (env)" + errSuffix(k.reload()))
}

// reloadSleepLevel moves a sleeping model between levels 1 and 2: it keeps
// its process.
func (k *swapSoak) reloadSleepLevel(model string) {
	k.mu.Lock()
	var level int
	switch v, _ := supervisortest.Value(k.yaml, "models."+model+".sleep_level"); v {
	case "1":
		level = 2
	case "2":
		level = 1
	default:
		k.mu.Unlock()
		return // sleep_level 0 stays: it has no sleep mode
	}
	y, err := supervisortest.EditYAML(k.yaml, supervisortest.Set("models."+model+".sleep_level", level))
	if err == nil {
		k.yaml = y
	}
	k.mu.Unlock()
	if err != nil {
		k.t.Errorf("reload (sleep_level): %v", err)
		return
	}
	k.count("reload (sleep_level)" + errSuffix(k.reload()))
}

func (k *swapSoak) reload() error {
	k.mu.Lock()
	y := k.yaml
	k.mu.Unlock()
	if err := os.WriteFile(k.s.Path, []byte(y), 0o644); err != nil {
		k.t.Fatal(err)
	}
	c, ctx, cancel := k.ctl()
	defer cancel()
	defer c.Close()
	_, err := c.Reload(ctx)
	if err != nil {
		k.t.Errorf("reload: %v", err)
	}
	return err
}

func (k *swapSoak) pid(model string) int {
	return statusOf(k.t, k.s.Socket)[model].PID
}

// killModel SIGKILLs a model's server: its requests in flight are cut.
func (k *swapSoak) killModel(model string) {
	pid := k.pid(model)
	if pid == 0 {
		return
	}
	at := time.Now()
	k.mu.Lock()
	k.killed = append(k.killed, killing{pid, at})
	k.mu.Unlock()
	if syscall.Kill(pid, syscall.SIGKILL) == nil {
		// Cut: the requests in flight, and one sent to the dead engine
		// before the daemon saw it die (it reaps it within moments).
		k.markHit(model, at, at.Add(time.Second))
		k.count("kill -9 model")
	}
}

// sigstop freezes a model's server for 0.3 to 2.5 s (a hung engine; a
// wake into it, or a probe, sees it hang).
func (k *swapSoak) sigstop(ctx context.Context, model string) {
	pid := k.pid(model)
	if pid == 0 {
		return
	}
	from := time.Now()
	if syscall.Kill(pid, syscall.SIGSTOP) != nil {
		return
	}
	pause := time.NewTimer(time.Duration(300+k.rng.IntN(2200)) * time.Millisecond)
	select {
	case <-pause.C:
	case <-ctx.Done():
		pause.Stop()
	}
	_ = syscall.Kill(pid, syscall.SIGCONT) // it may have been killed as hung
	// A hung engine is stopped (stop_timeout 2 s) and restarted: its
	// requests in flight until then are cut.
	k.markHit(model, from, time.Now().Add(3*time.Second))
	k.count("SIGSTOP model")
}

// upgrade upgrades the daemon in place with a new binary: nothing is cut.
func (k *swapSoak) upgrade() {
	k.mu.Lock()
	k.version++
	v := k.version
	k.mu.Unlock()
	k.in.install(k.t, fmt.Sprintf("v%d", v))
	c, ctx, cancel := k.ctl()
	defer cancel()
	defer c.Close()
	_, err := c.Upgrade(ctx)
	// Refused when a model does not settle in time: it keeps running.
	k.count("upgrade" + errSuffix(err))
}

// killDaemon SIGKILLs the daemon and starts its successor, which adopts
// the models: every request in flight meanwhile is cut (the gateway is in
// the daemon).
func (k *swapSoak) killDaemon() {
	k.mu.Lock()
	d := k.d
	k.mu.Unlock()
	from := time.Now()
	if d.cmd.Process.Kill() != nil {
		return
	}
	d.wait(k.t)
	next := k.sd.start(k.s, k.in.exe)
	supervisortest.WaitGateway(k.t, next, k.gw)
	k.mu.Lock()
	k.d = next
	k.down = append(k.down, window{from, time.Now().Add(time.Second)})
	k.mu.Unlock()
	k.count("kill -9 daemon")
}

// settle ends the faults' effects: every model started (none held, none
// stopped by a signal), then (e): each answers, the gauges are back to
// zero, each runs at most one server.
func (k *swapSoak) settle() {
	t := k.t
	for _, m := range swapModels {
		if pid := k.pid(m.name); pid != 0 {
			_ = syscall.Kill(pid, syscall.SIGCONT)
		}
	}
	c, ctx, cancel := k.ctl()
	defer cancel()
	defer c.Close()
	if _, err := c.Op(ctx, api.OpStart, "all"); err != nil {
		t.Errorf("start all: %v", err)
	}
	for _, m := range swapModels {
		if code, body := chat(t, k.gw, m.name); code != 200 {
			t.Errorf("(e) %s does not answer at the end: %d %s", m.name, code, body)
		}
	}
	k.mu.Lock()
	d := k.d
	k.mu.Unlock()
	d.waitFor(t, 30*time.Second, "(e) the gateway's in-flight and queue gauges at zero", func() bool {
		_, fams := scrape(t, k.listen+"/metrics")
		sum := 0.0
		for _, name := range []string{"citadel_gateway_in_flight", "citadel_gateway_queue_depth"} {
			if f := fams[name]; f != nil {
				for _, m := range f.Metric {
					sum += m.GetGauge().GetValue()
				}
			}
		}
		return sum == 0
	})
	for _, m := range swapModels {
		if servers := k.servers(m.name); len(servers) > 1 {
			t.Errorf("(e) %s runs %d servers: %v", m.name, len(servers), servers)
		}
	}
	st := statusOf(t, k.s.Socket)
	for _, m := range swapModels {
		if s := st[m.name]; s.State == api.Failed || s.Held {
			t.Errorf("(e) %s at the end: %s held=%v (%s)", m.name, s.State, s.Held, s.Reason)
		}
	}
}

// servers are the model's live servers. Its pid files list every server it
// ever started; over a long soak PIDs are reused (pid_max is often
// 32768), so a live PID counts only while its command line is still that
// model's fake.
func (k *swapSoak) servers(model string) []int {
	var out []int
	for _, pid := range live(k.s.procs(model), "server") {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err == nil && strings.Contains(string(b), "/pids/"+model+"\x00") {
			out = append(out, pid)
		}
	}
	return out
}

// checkRequests asserts (c) over every request.
func (k *swapSoak) checkRequests() {
	k.mu.Lock()
	defer k.mu.Unlock()
	bad := 0
	for _, r := range k.results {
		if r.code == 200 {
			continue
		}
		if k.excused(r) {
			continue
		}
		bad++
		if bad <= 20 {
			k.t.Errorf("(c) %s request %s (%s, %s): %d %v %s", r.model, r.client, r.from.Format("15:04:05.000"), r.to.Sub(r.from).Round(time.Millisecond), r.code, r.err, r.body)
		}
	}
	if bad > 20 {
		k.t.Errorf("(c) … %d requests failed in all", bad)
	}
	if bad > 0 {
		k.t.Logf("the faults, each when it ended:\n%s", strings.Join(k.log, "\n"))
	}
}

// excused reports whether a failed request was honest: a 503 while its
// model was held stopped, or a request in flight when a fault hit its
// model or the daemon.
func (k *swapSoak) excused(r swapResult) bool {
	for _, w := range k.down {
		if w.overlaps(r.from, r.to) {
			return true
		}
	}
	for _, w := range k.hit[r.model] {
		if w.overlaps(r.from, r.to) && r.code != 429 && !strings.Contains(r.body, "max_wait_exceeded") {
			return true
		}
	}
	for _, w := range k.held[r.model] {
		if w.overlaps(r.from, r.to) && r.code == 503 {
			return true
		}
	}
	return false
}

// report logs the figures: requests answered 200 per second of the load
// (those that ended within it), the requests that failed, and the share of
// wakes (and cold starts) that served at least one client request.
func (k *swapSoak) report(began time.Time, loadFor time.Duration) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.eventMu.Lock()
	defer k.eventMu.Unlock()
	ok, within, failed := 0, 0, 0
	end := began.Add(loadFor)
	for _, r := range k.results {
		switch {
		case r.code != 200:
			failed++
		case !r.to.After(end):
			within++
			ok++
		default:
			ok++
		}
	}
	e := &k.events
	share := func(served, all int) string {
		if all == 0 {
			return "–"
		}
		return fmt.Sprintf("%.0f%%", 100*float64(served)/float64(all))
	}
	k.t.Logf("seed %d, load %s (the last answer %s after it began), %d clients, faults %v: %d requests, %d answered 200 "+
		"(%.1f/s within the load), %d not; wakes %d, %s served a client request; cold starts %d, %s served one; faults %v",
		k.seed, loadFor.Round(time.Second), time.Since(began).Round(time.Second), *swapClients, *swapFaults, len(k.results), ok,
		float64(within)/loadFor.Seconds(), failed, e.wakes, share(e.wakesServed, e.wakes), e.starts, share(e.startsServed, e.starts), k.faults)
}

// eventState follows the fake engines' event log as it grows.
type eventState struct {
	path   string
	offset int64
	pids   map[int]*engine
	gpus   map[int][]string // the GPUs each server took memory on, kept after it ends

	wakes, wakesServed, starts, startsServed int
}

// engine is one fake engine's process as its events tell.
type engine struct {
	model   string
	started time.Time // its process began (its load with it)
	awakeAt time.Time // its last wake or its start serving
	// open: an awake period (from a wake, or a cold start) whose first
	// client request has not come yet.
	open  bool
	woke  bool // the open period began with a wake (not a start)
	dirty bool // it served a client request in the current period
}

// read takes the events appended since the last read and returns the
// violations of (a), (b), (d) and (f) among them.
func (e *eventState) read(t *testing.T, manual map[string][]time.Time, killed []killing) []string {
	f, err := os.Open(e.path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Seek(e.offset, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	var out []string
	rd := bufio.NewReaderSize(f, 1<<16)
	for {
		line, err := rd.ReadBytes('\n')
		if err != nil {
			break // a line not complete yet is read next time
		}
		e.offset += int64(len(line))
		var ev fakevllm.Event
		if json.Unmarshal(line, &ev) != nil {
			out = append(out, fmt.Sprintf("event log: unreadable line %q", line))
			continue
		}
		out = append(out, e.apply(ev, manual, killed)...)
	}
	return out
}

func (e *eventState) apply(ev fakevllm.Event, manual map[string][]time.Time, killed []killing) []string {
	at := time.Unix(0, ev.T)
	en := e.pids[ev.PID]
	if en == nil {
		en = &engine{model: ev.Model}
		e.pids[ev.PID] = en
	}
	closePeriod := func() {
		if en.open {
			en.open = false
		}
	}
	switch ev.Ev {
	case "oom":
		return []string{fmt.Sprintf("(a) %s's engine (pid %d) ran out of GPU memory at %s: %v", ev.Model, ev.PID, at.Format("15:04:05.000"), ev.More)}
	case "misuse":
		return []string{fmt.Sprintf("(d) %s's engine (pid %d) was misused at %s: %v", ev.Model, ev.PID, at.Format("15:04:05.000"), ev.More)}
	case "start":
		en.started = at
	case "alloc":
		if b, ok := ev.More["bytes"].(map[string]any); ok {
			for u := range b {
				if !slices.Contains(e.gpus[ev.PID], u) {
					e.gpus[ev.PID] = append(e.gpus[ev.PID], u)
				}
			}
		}
	case "profile_failed":
		u, _ := ev.More["gpu"].(string)
		for _, kl := range killed {
			if kl.pid != ev.PID && !kl.at.Before(en.started) && !kl.at.After(at) && slices.Contains(e.gpus[kl.pid], u) {
				return nil // a neighbour the soak killed mid-load
			}
		}
		return []string{fmt.Sprintf("(f) %s's engine (pid %d) failed its memory profiling at %s, %s into its load: %v", ev.Model, ev.PID, at.Format("15:04:05.000"), at.Sub(en.started).Round(time.Millisecond), ev.More)}
	case "serving":
		en.awakeAt, en.open, en.woke, en.dirty = at, true, false, false
		e.starts++
	case "wake":
		en.awakeAt, en.open, en.woke, en.dirty = at, true, true, false
		e.wakes++
	case "req":
		if c, _ := ev.More["client"].(string); c != "" && en.open && !en.dirty {
			en.dirty = true
			if en.woke {
				e.wakesServed++
			} else {
				e.startsServed++
			}
		}
	case "sleep_begin":
		closePeriod()
		if awake := at.Sub(en.awakeAt); !en.awakeAt.IsZero() && awake < swapMinAwake {
			byHand := false
			for _, m := range manual[ev.Model] {
				if !m.Before(en.awakeAt.Add(-time.Second)) && !m.After(at) {
					byHand = true
				}
			}
			if !byHand {
				return []string{fmt.Sprintf("(b) %s (pid %d) was put to sleep %s after it woke, within min_awake %s", ev.Model, ev.PID, awake.Round(time.Millisecond), swapMinAwake)}
			}
		}
	case "exit":
		closePeriod()
		delete(e.pids, ev.PID)
	}
	return nil
}
