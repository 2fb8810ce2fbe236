//go:build e2e

package main

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor/supervisortest"
)

// TestE2EFleetHAProxy puts two daemons on loopback behind a real HAProxy
// (Debian's package) configured by citadelctl fleet haproxy. Host A serves
// "alpha" and "shared" (awake), host B serves "beta" and "shared" (on
// demand, asleep). It shows that every model answers through the one front
// address; that "shared" is served by A, where it is awake, not by B,
// where it sleeps; and that when A's daemon is stopped (SIGTERM) HAProxy
// takes A out of rotation within the check interval while no request for
// "beta" or "shared", which B serves, fails.
func TestE2EFleetHAProxy(t *testing.T) {
	haproxy, err := exec.LookPath("haproxy")
	if err != nil {
		t.Fatal("haproxy not installed (apt-get install haproxy): the end-to-end fleet needs it")
	}
	ctl, err := filepath.Abs(filepath.Join("..", "..", "bin", "citadelctl"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(ctl); err != nil {
		t.Fatalf("%v (make build first)", err)
	}

	host := func(models ...testModel) (*site, string) {
		gwPort, usage := supervisortest.FreePort(t), t.TempDir()
		top := fmt.Sprintf(`listen: 127.0.0.1:%d
gpu:
  backend: sim
  sim:
    devices: [{uuid: GPU-00000000-0000-0000-0000-000000000000, name: Sim H100, memory: 80GiB}]
    usage_dir: %s
gateway: {listen: 127.0.0.1:%d, max_wait: 1m}
`, supervisortest.FreePort(t), usage, gwPort)
		for i := range models {
			models[i].YAML += "\ngpu_memory_utilization: 0.3"
			models[i].Fake = append(models[i].Fake, "--fake-usage-dir", usage, "--fake-wake-time-l1", "100ms")
		}
		return &site{Site: supervisortest.NewSite(t, top, models...), t: t}, "127.0.0.1:" + strconv.Itoa(gwPort)
	}
	onDemand := "activation: on_demand\nsleep_level: 1\nmin_awake: 0s"
	a, gwA := host(testModel{Name: "alpha"}, testModel{Name: "shared"})
	b, gwB := host(testModel{Name: "beta"}, testModel{Name: "shared", YAML: onDemand})
	dA, dB := a.start(), b.start()
	fleet := supervisortest.AnyOf(dA, dB)
	supervisortest.WaitGateway(t, dA, "http://"+gwA)
	supervisortest.WaitGateway(t, dB, "http://"+gwB)
	dA.waitFor(t, 30*time.Second, "A's models healthy", a.healthy)

	// B's copy of shared: started by a request, then put to sleep.
	if code, body := chat(t, "http://"+gwB, "shared"); code != 200 {
		t.Fatalf("shared on B: %d %s", code, body)
	}
	if out, err := exec.Command(ctl, "--socket", b.Socket, "sleep", "shared").CombinedOutput(); err != nil {
		t.Fatalf("citadelctl sleep shared on B: %v\n%s", err, out)
	}
	fleetOf := func(gw, model string) string {
		resp, err := http.Get("http://" + gw + "/v1/models/" + model)
		if err != nil {
			return err.Error()
		}
		defer resp.Body.Close()
		var m struct {
			Citadel struct{ Fleet string } `json:"citadel"`
		}
		json.NewDecoder(resp.Body).Decode(&m) //nolint:errcheck // an empty state fails the wait
		return m.Citadel.Fleet
	}
	dB.waitFor(t, 30*time.Second, "shared asleep on B", func() bool { return fleetOf(gwB, "shared") == "sleeping" })
	dB.waitFor(t, 30*time.Second, "beta awake on B", func() bool { return fleetOf(gwB, "beta") == "awake" })

	// The configuration, from the hosts' own answers.
	dir := t.TempDir()
	front := "127.0.0.1:" + strconv.Itoa(supervisortest.FreePort(t))
	const inter, fall = 500 * time.Millisecond, 2
	cfgPath := filepath.Join(dir, "haproxy.cfg")
	gen := exec.Command(ctl, "fleet", "haproxy", "--bind", front, "--check-interval", inter.String(),
		"--fall", strconv.Itoa(fall), "--output", cfgPath, gwA, gwB)
	if out, err := gen.CombinedOutput(); err != nil {
		t.Fatalf("citadelctl fleet haproxy: %v\n%s", err, out)
	}
	cfg, _ := os.ReadFile(cfgPath)
	t.Logf("citadelctl fleet haproxy wrote:\n%s", cfg)
	for _, want := range []string{"backend m_alpha\n", "backend m_beta\n", "backend m_shared\n",
		"server " + sanitizeAddr(gwB) + " " + gwB + " backup\n"} {
		if !strings.Contains(string(cfg), want) {
			t.Errorf("the configuration lacks %q", want)
		}
	}
	// The test's own addition: a stats page to read servers' states from.
	stats := "127.0.0.1:" + strconv.Itoa(supervisortest.FreePort(t))
	statsPath := filepath.Join(dir, "stats.cfg")
	if err := os.WriteFile(statsPath, []byte("listen stats\n    bind "+stats+"\n    mode http\n    stats enable\n    stats uri /stats\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(haproxy, "-c", "-f", cfgPath, "-f", statsPath).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c: %v\n%s", err, out)
	}
	hap := exec.Command(haproxy, "-db", "-f", cfgPath, "-f", statsPath)
	hlog := &supervisortest.SyncBuffer{}
	hap.Stdout, hap.Stderr = hlog, hlog
	if err := hap.Start(); err != nil {
		t.Fatal(err)
	}
	hapDone := make(chan struct{})
	go func() { hap.Wait(); close(hapDone) }() //nolint:errcheck // ProcessState says
	t.Cleanup(func() {
		hap.Process.Signal(syscall.SIGTERM) //nolint:errcheck // best effort
		select {
		case <-hapDone:
		case <-time.After(10 * time.Second):
			hap.Process.Kill() //nolint:errcheck // best effort
			<-hapDone
		}
		if t.Failed() {
			t.Logf("haproxy output:\n%s", hlog.String())
		}
	})
	// status of every server: "backend/server" → UP, DOWN, ...
	servers := func() map[string]string {
		resp, err := http.Get("http://" + stats + "/stats;csv")
		if err != nil {
			return nil
		}
		defer resp.Body.Close()
		rows, err := csv.NewReader(resp.Body).ReadAll()
		if err != nil || len(rows) == 0 {
			return nil
		}
		col := -1
		for i, h := range rows[0] {
			if h == "status" {
				col = i
			}
		}
		out := map[string]string{}
		for _, r := range rows[1:] {
			if col >= 0 && col < len(r) && r[1] != "FRONTEND" && r[1] != "BACKEND" {
				out[r[0]+"/"+r[1]] = r[col]
			}
		}
		return out
	}
	sA, sB := sanitizeAddr(gwA), sanitizeAddr(gwB)
	supervisortest.WaitOn(t, fleet, 30*time.Second, "every server UP in HAProxy", func() bool {
		s := servers()
		return s["m_alpha/"+sA] == "UP" && s["m_shared/"+sA] == "UP" && s["m_shared/"+sB] == "UP" && s["m_beta/"+sB] == "UP"
	})

	// 1. Every model through the one front address.
	ask := func(model string) (int, string) {
		resp, err := http.Post("http://"+front+"/v1/chat/completions", "application/json",
			strings.NewReader(`{"model":"`+model+`","messages":[{"role":"user","content":"hi"}],"max_tokens":2}`))
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	for _, m := range []string{"alpha", "beta", "shared"} {
		code, body := ask(m)
		if code != 200 || !strings.Contains(body, `"model":"`+m+`"`) {
			t.Fatalf("%s through the front: %d %s", m, code, body)
		}
		t.Logf("check 1: %s through the front %s: %d", m, front, code)
	}
	if code, body := ask("nobody-serves-this"); code != 404 || !strings.Contains(body, "model_not_found") {
		t.Errorf("an unknown model through the front: %d %s", code, body)
	}

	// 2. shared is served where it is awake (A), not where it sleeps (B).
	served := func(s *site, model string) int64 {
		for _, m := range s.Models {
			if m.Name != model {
				continue
			}
			// fake-vllm counts the requests it answered, as vLLM does.
			resp, err := http.Get("http://127.0.0.1:" + strconv.Itoa(m.Port) + "/metrics")
			if err != nil {
				return -1
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			for _, line := range strings.Split(string(body), "\n") {
				if strings.HasPrefix(line, "vllm:request_success_total{") {
					n, err := strconv.ParseInt(line[strings.LastIndexByte(line, ' ')+1:], 10, 64)
					if err == nil {
						return n
					}
				}
			}
			return -1
		}
		return -1
	}
	beforeA, beforeB := served(a, "shared"), served(b, "shared")
	const n = 20
	for i := range n {
		if code, body := ask("shared"); code != 200 {
			t.Fatalf("shared, request %d: %d %s", i, code, body)
		}
	}
	gotA, gotB := served(a, "shared")-beforeA, served(b, "shared")-beforeB
	if gotA != n || gotB != 0 || fleetOf(gwB, "shared") != "sleeping" {
		t.Fatalf("%d requests for shared: A (awake) served %d, B (asleep) %d and is %s; want all on A, B still asleep",
			n, gotA, gotB, fleetOf(gwB, "shared"))
	}
	t.Logf("check 2: %d requests for shared through the front: host A (awake) served %d, host B (sleeping) served %d", n, gotA, gotB)

	// 3. Requests flow without pause while A's daemon is stopped.
	type tally struct{ ok, failed atomic.Int64 }
	counts := map[string]*tally{"alpha": {}, "beta": {}, "shared": {}}
	var firstFail sync.Map // model → the first failure
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for m, c := range counts {
		for range 2 {
			wg.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					if code, body := ask(m); code == 200 {
						c.ok.Add(1)
					} else {
						c.failed.Add(1)
						firstFail.LoadOrStore(m, fmt.Sprintf("%d %s", code, body))
					}
				}
			})
		}
	}
	supervisortest.WaitOn(t, fleet, 10*time.Second, "traffic flowing to every model", func() bool {
		return counts["alpha"].ok.Load() > 10 && counts["beta"].ok.Load() > 10 && counts["shared"].ok.Load() > 10
	})
	stopped := time.Now()
	if err := dA.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	var outAfter time.Duration
	dB.waitFor(t, 30*time.Second, "host A out of rotation in HAProxy", func() bool {
		s := servers()
		if s["m_alpha/"+sA] == "DOWN" && s["m_shared/"+sA] == "DOWN" {
			outAfter = time.Since(stopped)
			return true
		}
		return false
	})
	if code := dA.wait(t); code != 0 {
		t.Errorf("host A's daemon exit %d", code)
	}
	// shared now lives on B: the requests that follow wake it there.
	sharedOnB := served(b, "shared")
	dB.waitFor(t, 30*time.Second, "shared served by B", func() bool { return served(b, "shared") > sharedOnB+10 })
	okBeta := counts["beta"].ok.Load()
	dB.waitFor(t, 10*time.Second, "more requests for beta", func() bool { return counts["beta"].ok.Load() > okBeta+10 })
	close(stop)
	wg.Wait()

	t.Logf("check 3: host A stopped (SIGTERM); HAProxy marked it DOWN for alpha and shared after %s (check interval %s, fall %d)",
		outAfter.Round(time.Millisecond), inter, fall)
	for _, m := range []string{"shared", "beta", "alpha"} {
		t.Logf("check 3: %s: %d requests answered 200, %d failed", m, counts[m].ok.Load(), counts[m].failed.Load())
	}
	for _, m := range []string{"shared", "beta"} {
		if f := counts[m].failed.Load(); f != 0 {
			first, _ := firstFail.Load(m)
			t.Errorf("%d requests for %s failed while host A stopped; B serves it (first: %v)", f, m, first)
		}
	}
	if limit := time.Duration(fall+1) * inter; outAfter > limit {
		t.Errorf("host A taken out after %s, more than %d checks of %s", outAfter, fall+1, inter)
	}
	if counts["alpha"].failed.Load() == 0 {
		t.Errorf("no request for alpha failed though its only host stopped: the count above proves nothing")
	}
}

// sanitizeAddr is HAProxy's server name for a gateway address, as
// citadelctl writes it.
func sanitizeAddr(hp string) string {
	return string(bytes.Map(func(r rune) rune {
		if r == ':' {
			return '_'
		}
		return r
	}, []byte(hp)))
}
