package supervisor

import (
	"bytes"
	"context"
	"path/filepath"
	"slices"
	"strconv"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
	"citadel-supervisor/probe"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/exposition"
	"fmt"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/common/expfmt"
	"go.uber.org/zap"
)

// BenchmarkKillRespawn measures kill -9 of a ready model → its replacement
// spawned (restart.delay 0), and → the replacement ready. Real processes.
func BenchmarkKillRespawn(b *testing.B) {
	h := newHarness(b, modelSpec{Name: "m", YAML: "restart: {delay: 0s, max_delay: 0s, burst: 1000000, interval: 1h}"}).start(Options{})
	waitReady := func(notPID int) Status {
		var st Status
		h.waitFor(b, 20*time.Second, "a ready replacement", func() bool {
			st = h.status("m")
			return st.State == Ready && st.PID != notPID
		})
		return st
	}
	cur := waitReady(0)
	var respawn, ready time.Duration
	b.ResetTimer()
	for range b.N {
		killed := time.Now()
		if err := syscall.Kill(cur.PID, syscall.SIGKILL); err != nil {
			b.Fatal(err)
		}
		next := waitReady(cur.PID)
		respawn += next.StartedAt.Sub(killed)
		ready += next.ReadyAt.Sub(killed)
		cur = next
	}
	b.ReportMetric(float64(respawn.Microseconds())/float64(b.N)/1000, "ms-to-respawn")
	b.ReportMetric(float64(ready.Microseconds())/float64(b.N)/1000, "ms-to-ready")
}

// BenchmarkColdStartShare measures the supervisor's own share of a cold
// start: from the moment the model began to accept connections (fake-vllm
// writes it, --fake-listen-file) to its ready time, as status shows it.
// The probe settings are the shipped ones (period 10s: the startup poll is
// a second); the model loads in 300 ms. Each round is an operator's
// restart. Real processes. serving-lines: the model prints what vLLM
// prints as it begins to serve; silent: it prints none of it (a wrapper
// that swallows the output), so only the window around its previous
// starts' time shortens the wait.
func BenchmarkColdStartShare(b *testing.B) {
	for _, c := range []struct {
		name string
		fake []string
	}{{"serving-lines", nil}, {"silent", []string{"--fake-silent-start"}}} {
		b.Run(c.name, func(b *testing.B) {
			listen := filepath.Join(b.TempDir(), "listen")
			h := newHarness(b, modelSpec{
				Name: "m", YAML: "probe: {period: 10s, timeout: 5s, failure_threshold: 3, startup_timeout: 1m}",
				Fake: append([]string{"--fake-load-time", "300ms", "--fake-listen-file", listen}, c.fake...),
			}).start(Options{})
			cur := h.waitState("m", Ready, 30*time.Second)
			var shares []time.Duration
			b.ResetTimer()
			for range b.N {
				if _, err := h.sup.Do(context.Background(), api.OpRestart, "m"); err != nil {
					b.Fatal(err)
				}
				var st Status
				waitFor(b, 30*time.Second, "a ready replacement", func() bool {
					st = h.status("m")
					return st.State == Ready && st.PID != cur.PID
				})
				raw, err := os.ReadFile(listen)
				if err != nil {
					b.Fatal(err)
				}
				ns, err := strconv.ParseInt(string(raw), 10, 64)
				if err != nil {
					b.Fatal(err)
				}
				shares = append(shares, st.ReadyAt.Sub(time.Unix(0, ns)))
				cur = st
			}
			b.StopTimer()
			slices.Sort(shares)
			var sum time.Duration
			for _, d := range shares {
				sum += d
			}
			b.ReportMetric(float64(sum.Microseconds())/float64(len(shares))/1000, "ms-share-mean")
			b.ReportMetric(float64(shares[len(shares)/2].Microseconds())/1000, "ms-share-median")
			b.ReportMetric(float64(shares[len(shares)-1].Microseconds())/1000, "ms-share-max")
		})
	}
}

// BenchmarkScrape measures one /metrics exposition (gather and encode, as
// the daemon serves it: the model series written as text, the rest through
// the registry) with 7 and 200 models, all ready, each with three live
// processes to read in /proc, on two sim GPUs. The processes are this
// test's own PID: the cost is the /proc reads and the encoding, not what
// the processes are.
func BenchmarkScrape(b *testing.B) {
	for _, n := range []int{7, 200} {
		b.Run(fmt.Sprintf("models=%d", n), func(b *testing.B) {
			reg := exposition.NewRegistry()
			reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
			self := os.Getpid()
			scrapeFixture(b, n, reg, []int{self, self, self})
			format := expfmt.NewFormat(expfmt.TypeTextPlain)
			var buf bytes.Buffer
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				buf.Reset()
				if err := reg.WriteText(&buf, format, nil); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// scrapeFixture returns a supervisor of n models registered with reg, all
// ready with pids as their processes, each probed once, on two sim GPUs.
func scrapeFixture(tb testing.TB, n int, reg prometheus.Registerer, pids []int) *Supervisor {
	tb.Helper()
	var yaml strings.Builder
	yaml.WriteString("listen: \"\"\ncontrol_socket: /tmp/bench.sock\ngpu:\n  backend: sim\n  sim:\n    devices:\n")
	yaml.WriteString("      - {uuid: GPU-a, memory: 80GiB}\n      - {uuid: GPU-b, memory: 80GiB}\nmodels:\n")
	for i := range n {
		fmt.Fprintf(&yaml, "  m%03d: {model: /m, port: %d, vllm_port: %d, gpu_memory_utilization: 0.004}\n", i, 20000+i, 30000+16*i)
	}
	cfg, err := config.Parse([]byte(yaml.String()), nil)
	if err != nil {
		tb.Fatal(err)
	}
	var uses []gpu.SimUse
	sim := gpu.NewSim(cfg.GPU, func() []gpu.SimUse { return uses })
	s, err := New(cfg, Options{Logger: zap.NewNop(), Prober: probe.NewHTTP(), Registerer: reg, GPUs: sim})
	if err != nil {
		tb.Fatal(err)
	}
	var runners []*runner
	for i, m := range cfg.Models {
		r := newRunner(m, s.d)
		ok := true
		r.status.Store(&Status{Name: m.Name, State: Ready, PID: pids[0], StartedAt: time.Now(), StartupDuration: time.Minute,
			RestartsByReason: map[string]int{"exit": 1}, ProbeSuccess: &ok})
		r.pids.Store(&pids)
		runners = append(runners, r)
		s.d.metrics.observe(m.Name, time.Millisecond, nil)
		uses = append(uses, gpu.SimUse{PID: pids[0], UUIDs: []string{[]string{"GPU-a", "GPU-b"}[i%2]}, Bytes: 1 << 28})
	}
	s.runners.Store(&runners)
	return s
}
