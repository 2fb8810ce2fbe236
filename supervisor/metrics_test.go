package supervisor

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/exposition"
	"citadel-supervisor/supervisor/proc"
)

// TestModelCollectorGolden checks the exposition of a snapshot: every state
// one-hot, restarts for every reason (0 included, so rate() works from the
// first restart), and the per-process figures only while a process runs.
func TestModelCollectorGolden(t *testing.T) {
	s := &Supervisor{d: &deps{}}
	s.reloadOK.Store(false)
	s.reloadAt.Store(1795000000)
	exit := 137
	ok := true
	ready := newRunner(config.Model{Name: "mixtral", Enabled: true}, &deps{now: time.Now, log: zap.NewNop()})
	ready.status.Store(&Status{
		Name: "mixtral", State: Ready, PID: 4411, StartedAt: time.Unix(1795000100, 500_000_000),
		StartupDuration: 95 * time.Second, RestartsByReason: map[string]int{"exit": 2, "manual": 1},
		LastExitCode: &exit, ProbeSuccess: &ok,
	})
	pending := newRunner(config.Model{Name: "phi3", Enabled: true}, &deps{now: time.Now, log: zap.NewNop()})
	pending.status.Store(&Status{Name: "phi3", State: Pending, Reason: "storage: /m: no such file or directory", PendingCause: CauseStorage})
	runners := []*runner{ready, pending}
	s.runners.Store(&runners)

	want := `
# HELP citadel_config_last_reload_success_timestamp_seconds Unix time of the last successful configuration load.
# TYPE citadel_config_last_reload_success_timestamp_seconds gauge
citadel_config_last_reload_success_timestamp_seconds 1.795e+09
# HELP citadel_config_last_reload_successful 1 if the last configuration load succeeded, 0 if it was rejected (the previous one stays in force).
# TYPE citadel_config_last_reload_successful gauge
citadel_config_last_reload_successful 0
# HELP citadel_model_last_exit_code Exit code of the model's last process (128+signal when killed).
# TYPE citadel_model_last_exit_code gauge
citadel_model_last_exit_code{model="mixtral"} 137
# HELP citadel_model_pending_cause For a pending model, 1 for what it waits for (gpu is normal when models outnumber memory; storage, port and env_files need an operator; daemon: the daemon itself was short of descriptors or memory to spawn it, and retries; spawn: its process is being started, which takes long only when the spawn hangs), 0 for the other causes.
# TYPE citadel_model_pending_cause gauge
citadel_model_pending_cause{cause="checking",model="phi3"} 0
citadel_model_pending_cause{cause="daemon",model="phi3"} 0
citadel_model_pending_cause{cause="env_files",model="phi3"} 0
citadel_model_pending_cause{cause="gpu",model="phi3"} 0
citadel_model_pending_cause{cause="port",model="phi3"} 0
citadel_model_pending_cause{cause="spawn",model="phi3"} 0
citadel_model_pending_cause{cause="storage",model="phi3"} 1
# HELP citadel_model_restarts_total Restarts of the model, by reason (exit, probe, startup, manual, reload, wake).
# TYPE citadel_model_restarts_total counter
citadel_model_restarts_total{model="mixtral",reason="exit"} 2
citadel_model_restarts_total{model="mixtral",reason="manual"} 1
citadel_model_restarts_total{model="mixtral",reason="probe"} 0
citadel_model_restarts_total{model="mixtral",reason="reload"} 0
citadel_model_restarts_total{model="mixtral",reason="startup"} 0
citadel_model_restarts_total{model="mixtral",reason="wake"} 0
citadel_model_restarts_total{model="phi3",reason="exit"} 0
citadel_model_restarts_total{model="phi3",reason="manual"} 0
citadel_model_restarts_total{model="phi3",reason="probe"} 0
citadel_model_restarts_total{model="phi3",reason="reload"} 0
citadel_model_restarts_total{model="phi3",reason="startup"} 0
citadel_model_restarts_total{model="phi3",reason="wake"} 0
# HELP citadel_model_start_time_seconds Unix time the model's current process was spawned.
# TYPE citadel_model_start_time_seconds gauge
citadel_model_start_time_seconds{model="mixtral"} 1.7950001005e+09
# HELP citadel_model_startup_duration_seconds Spawn to first healthy answer, of the model's last start.
# TYPE citadel_model_startup_duration_seconds gauge
citadel_model_startup_duration_seconds{model="mixtral"} 95
# HELP citadel_model_state 1 for the model's current state, 0 for the others.
# TYPE citadel_model_state gauge
citadel_model_state{model="mixtral",state="backoff"} 0
citadel_model_state{model="mixtral",state="failed"} 0
citadel_model_state{model="mixtral",state="pending"} 0
citadel_model_state{model="mixtral",state="ready"} 1
citadel_model_state{model="mixtral",state="starting"} 0
citadel_model_state{model="mixtral",state="stopped"} 0
citadel_model_state{model="mixtral",state="sleeping"} 0
citadel_model_state{model="mixtral",state="waking"} 0
citadel_model_state{model="mixtral",state="stopping"} 0
citadel_model_state{model="mixtral",state="unhealthy"} 0
citadel_model_state{model="phi3",state="backoff"} 0
citadel_model_state{model="phi3",state="failed"} 0
citadel_model_state{model="phi3",state="pending"} 1
citadel_model_state{model="phi3",state="ready"} 0
citadel_model_state{model="phi3",state="starting"} 0
citadel_model_state{model="phi3",state="stopped"} 0
citadel_model_state{model="phi3",state="sleeping"} 0
citadel_model_state{model="phi3",state="waking"} 0
citadel_model_state{model="phi3",state="stopping"} 0
citadel_model_state{model="phi3",state="unhealthy"} 0
# HELP citadel_model_up 1 when the model is ready (answering its health probe), else 0.
# TYPE citadel_model_up gauge
citadel_model_up{model="mixtral"} 1
citadel_model_up{model="phi3"} 0
# HELP citadel_ownership_mode 1 for how the daemon owns the models' processes (cgroup: a cgroup v2 leaf per instance; marker: marker variable, parent links and subreaper), 0 for the other.
# TYPE citadel_ownership_mode gauge
citadel_ownership_mode{mode="cgroup"} 0
citadel_ownership_mode{mode="marker"} 1
# HELP citadel_probe_success 1 if the model's last health probe succeeded, else 0.
# TYPE citadel_probe_success gauge
citadel_probe_success{model="mixtral"} 1
`
	c := newModelCollector(s)
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}

	// Label pairs are built once per model and kept: a later scrape reads
	// the new snapshot's values under them.
	ready.status.Store(&Status{Name: "mixtral", State: Failed, RestartsByReason: map[string]int{"exit": 3}})
	wantLater := `
# HELP citadel_model_state 1 for the model's current state, 0 for the others.
# TYPE citadel_model_state gauge
citadel_model_state{model="mixtral",state="backoff"} 0
citadel_model_state{model="mixtral",state="failed"} 1
citadel_model_state{model="mixtral",state="pending"} 0
citadel_model_state{model="mixtral",state="ready"} 0
citadel_model_state{model="mixtral",state="starting"} 0
citadel_model_state{model="mixtral",state="stopped"} 0
citadel_model_state{model="mixtral",state="sleeping"} 0
citadel_model_state{model="mixtral",state="waking"} 0
citadel_model_state{model="mixtral",state="stopping"} 0
citadel_model_state{model="mixtral",state="unhealthy"} 0
citadel_model_state{model="phi3",state="backoff"} 0
citadel_model_state{model="phi3",state="failed"} 0
citadel_model_state{model="phi3",state="pending"} 1
citadel_model_state{model="phi3",state="ready"} 0
citadel_model_state{model="phi3",state="starting"} 0
citadel_model_state{model="phi3",state="stopped"} 0
citadel_model_state{model="phi3",state="sleeping"} 0
citadel_model_state{model="phi3",state="waking"} 0
citadel_model_state{model="phi3",state="stopping"} 0
citadel_model_state{model="phi3",state="unhealthy"} 0
# HELP citadel_model_up 1 when the model is ready (answering its health probe), else 0.
# TYPE citadel_model_up gauge
citadel_model_up{model="mixtral"} 0
citadel_model_up{model="phi3"} 0
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(wantLater), "citadel_model_state", "citadel_model_up"); err != nil {
		t.Errorf("a later scrape: %v", err)
	}

	// The per-process figures come from the model's live processes.
	pids := []int{os.Getpid()} // a live process to read
	ready.pids.Store(&pids)
	if n := testutil.CollectAndCount(c, "citadel_model_resident_memory_bytes", "citadel_model_cpu_seconds_total"); n != 2 {
		t.Errorf("%d tree series, want rss and cpu for mixtral", n)
	}
}

// noSuchPID is above any pid_max: a model's process that is gone.
const noSuchPID = 1 << 30

// TestModelCollectorText: the text the model series are served as is the
// registry's exposition of what Collect sends, byte for byte: every
// family, its HELP and TYPE, the samples' order (by label values in the
// order of the label names) and values, label values escaped.
func TestModelCollectorText(t *testing.T) {
	s := &Supervisor{d: &deps{}}
	s.reloadOK.Store(true)
	s.reloadAt.Store(1795000000)
	d := &deps{now: time.Now, log: zap.NewNop()}
	model := func(st *Status, pids ...int) *runner {
		r := newRunner(config.Model{Name: st.Name, Enabled: true}, d)
		r.status.Store(st)
		if pids != nil {
			r.pids.Store(&pids)
		}
		return r
	}
	exit, killed, ok, failed := 137, -1, true, false
	runners := []*runner{ // not in the order of their names
		model(&Status{Name: "phi3", State: Pending, PendingCause: CauseGPU}),
		model(&Status{Name: "mixtral", State: Ready, PID: 4411, StartedAt: time.Unix(1795000100, 500_000_000),
			StartupDuration: 95*time.Second + time.Millisecond, RestartsByReason: map[string]int{"exit": 2, "manual": 1, "wake": 1e6},
			LastExitCode: &exit, ProbeSuccess: &ok, VLLMVersion: "0.10.1"}, noSuchPID),
		model(&Status{Name: "gemma", State: Sleeping, SleepHostMemory: 17 << 30, LastExitCode: &killed, ProbeSuccess: &failed,
			VLLMVersion: "0.11.0rc1 \"dev\" \\ build\n2"}, noSuchPID, noSuchPID+1),
		model(&Status{Name: "llama_3-8b", State: Pending, PendingCause: CauseChecking}),
		model(&Status{Name: "qwen", State: Starting, PID: 77, StartedAt: time.Unix(1795000200, 0)}),
	}
	s.runners.Store(&runners)
	c := newModelCollector(s)

	for scrape := range 2 { // the labels built at the first, kept for the second
		reg := prometheus.NewPedanticRegistry()
		reg.MustRegister(c)
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var want bytes.Buffer
		for _, mf := range mfs {
			if _, err := expfmt.MetricFamilyToText(&want, mf); err != nil {
				t.Fatal(err)
			}
		}
		b, fams := c.AppendText([]byte("before\n"), nil)
		got := string(b[len("before\n"):])
		if got != want.String() {
			t.Fatalf("scrape %d: the text:\n%s\nthe registry's:\n%s", scrape, got, want.String())
		}
		var names []string
		end := len("before\n")
		for _, f := range fams {
			if f.Start != end || !strings.HasPrefix(string(b[f.Start:f.End]), "# HELP "+f.Name+" ") {
				t.Errorf("scrape %d: family %s at %d–%d, after %d", scrape, f.Name, f.Start, f.End, end)
			}
			end = f.End
			names = append(names, f.Name)
		}
		if end != len(b) || len(fams) != len(mfs) || !slices.IsSorted(names) {
			t.Errorf("scrape %d: families %v, %d bytes of %d", scrape, names, end, len(b))
		}
		if !strings.Contains(got, `citadel_model_vllm_info{model="gemma",version="0.11.0rc1 \"dev\" \\ build\n2"} 1`) {
			t.Errorf("scrape %d: a version that needs escaping:\n%s", scrape, got)
		}
	}
}

// TestScrapeText: the daemon's /metrics exposition (the model and probe
// series as text, the rest through the registry, merged) is the
// registry's of every series, byte for byte, and a valid exposition.
func TestScrapeText(t *testing.T) {
	reg := exposition.NewRegistry()
	s := scrapeFixture(t, 20, reg, []int{noSuchPID})
	s.d.metrics.slept("m003", 1, "idle")
	s.d.metrics.woke("m003", 1, 1500*time.Millisecond)
	s.d.metrics.wakeFailed("m004", "canary")
	s.d.metrics.observe("m005", time.Second, errors.New("refused"))
	var got bytes.Buffer
	if err := reg.WriteText(&got, expfmt.NewFormat(expfmt.TypeTextPlain), nil); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var want bytes.Buffer
	for _, mf := range mfs {
		if _, err := expfmt.MetricFamilyToText(&want, mf); err != nil {
			t.Fatal(err)
		}
	}
	// The one value that moves between two scrapes.
	timing := regexp.MustCompile(`(?m)^(citadel_scrape_collector_duration_seconds\{[^}]*\}) .*$`)
	if g, w := timing.ReplaceAllString(got.String(), "$1 T"), timing.ReplaceAllString(want.String(), "$1 T"); g != w {
		t.Fatalf("the daemon's:\n%s\nthe registry's:\n%s", g, w)
	}
	for _, name := range []string{"citadel_model_state", "citadel_model_sleeps_total", "citadel_probe_duration_seconds", "citadel_gpu_memory_total_bytes"} {
		if !strings.Contains(got.String(), "\n# TYPE "+name+" ") {
			t.Errorf("no %s in:\n%s", name, got.String())
		}
	}
	parser := expfmt.NewTextParser(model.LegacyValidation)
	if _, err := parser.TextToMetricFamilies(bytes.NewReader(got.Bytes())); err != nil {
		t.Error(err)
	}
}

// TestProbeSeriesAreVecs: the probe series are what a HistogramVec and a
// CounterVec of the same names would expose after the same probes (each
// bucket's bound counted in it, the +Inf bucket, sum and count, a model's
// failures at 0 from its first probe, a forgotten model's gone), in text
// as through Collect.
func TestProbeSeriesAreVecs(t *testing.T) {
	p := newProbeSeries()
	dur := prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "citadel_probe_duration_seconds", Help: "Duration of health probes of ready models.", Buckets: probeBuckets,
	}, []string{"model"})
	fail := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "citadel_probe_failures_total", Help: "Failed health probes of ready models (not counting probes while a model loads).",
	}, []string{"model"})
	probe := func(model string, v float64, failed bool) {
		p.observe(model, v, failed)
		dur.WithLabelValues(model).Observe(v)
		c := fail.WithLabelValues(model)
		if failed {
			c.Inc()
		}
	}
	for i, v := range append(slices.Clone(probeBuckets), 0, 0.0004, 0.003, 0.7, 9.99, 10.01, 3600, 0.1) {
		probe([]string{"b", "a", `q"\`, "gone"}[i%4], v, i%3 == 0)
	}
	probe("never-failed", 0.002, false)
	p.forget("gone")
	dur.DeleteLabelValues("gone")
	fail.DeleteLabelValues("gone")

	vecs := prometheus.NewPedanticRegistry()
	vecs.MustRegister(dur, fail)
	want := encode(t, vecs)
	b, fams := p.AppendText(nil, nil)
	if string(b) != want {
		t.Errorf("the text:\n%s\nthe vecs':\n%s", b, want)
	}
	if len(fams) != 2 || fams[0].Name != "citadel_probe_duration_seconds" || fams[1].Start != fams[0].End || fams[1].End != len(b) {
		t.Errorf("families %+v of %d bytes", fams, len(b))
	}
	collected := prometheus.NewPedanticRegistry()
	collected.MustRegister(p)
	if got := encode(t, collected); got != want {
		t.Errorf("collected:\n%s\nthe vecs':\n%s", got, want)
	}
	if problems, err := testutil.CollectAndLint(p); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
	if !strings.Contains(want, `citadel_probe_failures_total{model="never-failed"} 0`) || strings.Contains(want, "gone") {
		t.Errorf("the vecs':\n%s", want)
	}
	if b, fams := newProbeSeries().AppendText(nil, nil); len(b) != 0 || len(fams) != 0 {
		t.Errorf("no probes yet: %q, %v", b, fams)
	}
}

// encode is g's text exposition.
func encode(t *testing.T, g prometheus.Gatherer) string {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	for _, mf := range mfs {
		if _, err := expfmt.MetricFamilyToText(&out, mf); err != nil {
			t.Fatal(err)
		}
	}
	return out.String()
}

// TestModelCollectorKeepsProcFiles: a model's processes' files are kept
// open from one scrape to the next, and closed at the first scrape after
// the model is gone.
func TestModelCollectorKeepsProcFiles(t *testing.T) {
	s := &Supervisor{d: &deps{}}
	d := &deps{now: time.Now, log: zap.NewNop()}
	r := newRunner(config.Model{Name: "m", Enabled: true}, d)
	r.status.Store(&Status{Name: "m", State: Ready, PID: os.Getpid()})
	pids := []int{os.Getpid()}
	r.pids.Store(&pids)
	runners := []*runner{r}
	s.runners.Store(&runners)
	c := newModelCollector(s)
	for range 2 {
		if b, _ := c.AppendText(nil, nil); !strings.Contains(string(b), `citadel_model_resident_memory_bytes{model="m"} `) {
			t.Fatalf("no resident memory in:\n%s", b)
		}
	}
	k := c.kept[r]
	if k == nil {
		t.Fatal("no kept files for the model")
	}
	none := []*runner{}
	s.runners.Store(&none)
	c.AppendText(nil, nil)
	if len(c.kept) != 0 || k.Stats(&pids, func(proc.Stat) {}) {
		t.Errorf("the files of a model gone are still kept: %v", c.kept)
	}
}

// procFilesOpen counts the daemon's descriptors open on /proc/pid's files.
func procFilesOpen(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n, dir := 0, "/proc/"+strconv.Itoa(pid)+"/"
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(l, dir) {
			n++
		}
	}
	return n
}

// TestModelCollectorClosesFilesOfStoppedModel: a model whose instance is
// released (stopped, failed, slept at level 0: no processes) keeps none of
// its last processes' files open until it is removed.
func TestModelCollectorClosesFilesOfStoppedModel(t *testing.T) {
	cmd := exec.Command("cat") // blocks on its stdin until closed
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { in.Close(); cmd.Wait() }()
	pid := cmd.Process.Pid
	s := &Supervisor{d: &deps{}}
	d := &deps{now: time.Now, log: zap.NewNop()}
	r := newRunner(config.Model{Name: "m", Enabled: true}, d)
	r.status.Store(&Status{Name: "m", State: Ready, PID: pid})
	pids := []int{pid}
	r.pids.Store(&pids)
	runners := []*runner{r}
	s.runners.Store(&runners)
	c := newModelCollector(s)
	c.AppendText(nil, nil)
	if n := procFilesOpen(t, pid); n != 1 {
		t.Fatalf("%d of the process's files open, want its stat", n)
	}
	// Released: as EfRelease leaves it.
	r.pids.Store(nil)
	r.status.Store(&Status{Name: "m", State: Stopped})
	c.AppendText(nil, nil)
	if n := procFilesOpen(t, pid); n != 0 {
		t.Errorf("%d of the process's files still open after the model stopped", n)
	}
}

// TestModelCollectorFilesOverChurn: models added and removed many times,
// scraped meanwhile (two scrapes at once too), leave no descriptor open.
func TestModelCollectorFilesOverChurn(t *testing.T) {
	s := &Supervisor{d: &deps{}}
	d := &deps{now: time.Now, log: zap.NewNop()}
	c := newModelCollector(s)
	pid := os.Getpid()
	none := []*runner{}
	s.runners.Store(&none)
	c.AppendText(nil, nil)
	countFDs := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	before := countFDs()
	for i := range 200 {
		var runners []*runner
		for j := range 5 {
			name := fmt.Sprintf("m%d-%d", i, j)
			r := newRunner(config.Model{Name: name, Enabled: true}, d)
			r.status.Store(&Status{Name: name, State: Ready, PID: pid})
			pids := []int{pid, pid}
			r.pids.Store(&pids)
			runners = append(runners, r)
		}
		s.runners.Store(&runners)
		var wg sync.WaitGroup
		for range 2 {
			wg.Go(func() { c.AppendText(nil, nil) })
		}
		wg.Wait()
	}
	s.runners.Store(&none)
	c.AppendText(nil, nil)
	if after := countFDs(); after > before {
		t.Errorf("%d descriptors open, %d before", after, before)
	}
}
