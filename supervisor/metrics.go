package supervisor

import (
	"hash/fnv"
	"math"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"citadel-supervisor/supervisor/exposition"
	"citadel-supervisor/supervisor/proc"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/PID/stat:
// 100 on every Linux architecture the supervisor runs on.
const clockTicks = 100

// probeBuckets span a healthy vLLM's /health (milliseconds) to the probe
// timeout (seconds).
var probeBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

// metrics are the supervisor's stateful series. Everything that can be
// derived from a Status snapshot is not here but in modelCollector, so a
// model removed by a reload leaves nothing behind; these few are deleted
// explicitly when a model goes.
type metrics struct {
	probes       *probeSeries
	sleeps       *prometheus.CounterVec
	wakeDuration *prometheus.HistogramVec
	wakeFailures *prometheus.CounterVec
}

// wakeBuckets span a small model's level-1 wake (0.1 s) to a large one's
// level-2 reload (a minute).
var wakeBuckets = []float64{.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120}

func newMetrics() *metrics {
	return &metrics{
		probes: newProbeSeries(),
		sleeps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citadel_model_sleeps_total",
			Help: "Times an on-demand model gave its GPUs back, by sleep level (0: stopped) and cause (idle, evicted, manual).",
		}, []string{"model", "level", "cause"}),
		wakeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citadel_model_wake_failures_total",
			Help: "Failed wakes of an on-demand model (it was started cold), by what failed: canary (a wrong answer), timeout, probe (its engine stopped answering while it woke), error.",
		}, []string{"model", "reason"}),
		wakeDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "citadel_model_wake_duration_seconds",
			Help:    "From a sleeping on-demand model's wake request to ready (memory granted, wake_up, canary), by the level it slept at.",
			Buckets: wakeBuckets,
		}, []string{"model", "level"}),
	}
}

func (m *metrics) slept(model string, level int, cause string) {
	m.sleeps.WithLabelValues(model, strconv.Itoa(level), cause).Inc()
}

func (m *metrics) wakeFailed(model, why string) {
	m.wakeFailures.WithLabelValues(model, why).Inc()
}

func (m *metrics) woke(model string, level int, took time.Duration) {
	m.wakeDuration.WithLabelValues(model, strconv.Itoa(level)).Observe(took.Seconds())
}

// observe records one liveness probe.
func (m *metrics) observe(model string, d time.Duration, err error) {
	m.probes.observe(model, d.Seconds(), err != nil)
}

// forget deletes a removed model's series.
func (m *metrics) forget(model string) {
	m.probes.forget(model)
	m.sleeps.DeletePartialMatch(prometheus.Labels{"model": model})
	m.wakeDuration.DeletePartialMatch(prometheus.Labels{"model": model})
	m.wakeFailures.DeletePartialMatch(prometheus.Labels{"model": model})
}

// probeSeries are citadel_probe_duration_seconds, a histogram, and
// citadel_probe_failures_total, a counter, of every model probed since it
// was added: 3,400 of a scrape's series at 200 models, written as text
// (exposition.Families) as the model series are. Each model's are the
// series a HistogramVec and a CounterVec would hold, created at its first
// probe; TestProbeSeriesAreVecs holds them to it.
type probeSeries struct {
	duration, failures *family
	bucket, sum, count string   // the histogram's sample names
	le                 []string // le="bound" of each of probeBuckets
	inf                string   // le="+Inf"

	mu      sync.Mutex
	byModel map[string]*probeCounts
}

// probeCounts are one model's probes.
type probeCounts struct {
	label   string // model="name"
	created time.Time

	mu       sync.Mutex
	buckets  []uint64 // like probeBuckets, each bucket's own (not cumulative)
	count    uint64
	sum      float64
	failures uint64
}

func newProbeSeries() *probeSeries {
	p := &probeSeries{
		duration: newFamily("citadel_probe_duration_seconds", "histogram", "Duration of health probes of ready models.", "model"),
		failures: newFamily("citadel_probe_failures_total", "counter", "Failed health probes of ready models (not counting probes while a model loads).", "model"),
		byModel:  map[string]*probeCounts{},
	}
	p.bucket, p.sum, p.count = p.duration.name+"_bucket", p.duration.name+"_sum", p.duration.name+"_count"
	for _, b := range probeBuckets {
		p.le = append(p.le, `le="`+string(appendValue(nil, b))+`"`)
	}
	p.inf = `le="+Inf"`
	return p
}

func (p *probeSeries) observe(model string, v float64, failed bool) {
	p.mu.Lock()
	c := p.byModel[model]
	if c == nil {
		c = &probeCounts{label: `model="` + valueEscaper.Replace(model) + `"`, created: time.Now(), buckets: make([]uint64, len(probeBuckets))}
		p.byModel[model] = c
	}
	p.mu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	// The first bucket whose bound is v or more, as a histogram's.
	if i := sort.SearchFloat64s(probeBuckets, v); i < len(probeBuckets) {
		c.buckets[i]++
	}
	c.count++
	c.sum += v
	if failed {
		c.failures++
	}
}

func (p *probeSeries) forget(model string) {
	p.mu.Lock()
	delete(p.byModel, model)
	p.mu.Unlock()
}

// probeRead is one model's probes at a scrape.
type probeRead struct {
	name, label string
	created     time.Time
	cumulative  []uint64 // like probeBuckets
	count       uint64
	sum         float64
	failures    uint64
}

// read copies every model's counts, sorted by name.
func (p *probeSeries) read() []probeRead {
	p.mu.Lock()
	out := make([]probeRead, 0, len(p.byModel))
	counts := make([]*probeCounts, 0, len(p.byModel))
	for name, c := range p.byModel {
		out = append(out, probeRead{name: name, label: c.label, created: c.created})
		counts = append(counts, c)
	}
	p.mu.Unlock()
	cum := make([]uint64, len(out)*len(probeBuckets))
	for i, c := range counts {
		r := &out[i]
		r.cumulative = cum[i*len(probeBuckets) : (i+1)*len(probeBuckets) : (i+1)*len(probeBuckets)]
		c.mu.Lock()
		var n uint64
		for j, b := range c.buckets {
			n += b
			r.cumulative[j] = n
		}
		r.count, r.sum, r.failures = c.count, c.sum, c.failures
		c.mu.Unlock()
	}
	slices.SortFunc(out, func(a, b probeRead) int { return strings.Compare(a.name, b.name) })
	return out
}

func (p *probeSeries) Describe(ch chan<- *prometheus.Desc) {
	ch <- p.duration.desc
	ch <- p.failures.desc
}

func (p *probeSeries) Collect(ch chan<- prometheus.Metric) {
	for _, r := range p.read() {
		buckets := make(map[float64]uint64, len(probeBuckets))
		for i, b := range probeBuckets {
			buckets[b] = r.cumulative[i]
		}
		ch <- prometheus.MustNewConstHistogramWithCreatedTimestamp(p.duration.desc, r.count, r.sum, buckets, r.created, r.name)
		ch <- prometheus.MustNewConstMetricWithCreatedTimestamp(p.failures.desc, prometheus.CounterValue, float64(r.failures), r.created, r.name)
	}
}

// AppendText appends the text exposition of the probe series
// (exposition.Families).
func (p *probeSeries) AppendText(b []byte, fams []exposition.Family) ([]byte, []exposition.Family) {
	reads := p.read()
	if len(reads) == 0 {
		return b, fams
	}
	start := len(b)
	b = append(b, p.duration.head...)
	for _, r := range reads {
		for i, le := range p.le {
			b = sample(b, p.bucket, r.label, le, float64(r.cumulative[i]))
		}
		b = sample(b, p.bucket, r.label, p.inf, float64(r.count))
		b = sample(b, p.sum, r.label, "", r.sum)
		b = sample(b, p.count, r.label, "", float64(r.count))
	}
	fams = append(fams, exposition.Family{Name: p.duration.name, Start: start, End: len(b)})
	start = len(b)
	b = append(b, p.failures.head...)
	for _, r := range reads {
		b = sample(b, p.failures.name, r.label, "", float64(r.failures))
	}
	return b, append(fams, exposition.Family{Name: p.failures.name, Start: start, End: len(b)})
}

// modelCollector reads the supervisor's snapshot at scrape time. It is a
// prometheus.Collector, and writes the text exposition of its series
// itself (exposition.Families), which is what the daemon serves: 4,600 of
// the 8,270 series of a scrape at 200 models, written without a dto.Metric
// each (docs/performance.md, "The /metrics scrape at 200 models").
type modelCollector struct {
	s *Supervisor

	up, state, cause, restarts, lastExit, startTime, startup, rss, cpu, probeOK, reloadOK, reloadTime, hostHeld, ownership, vllmInfo *family

	// text is the families in the order of their names, each with what
	// writes its samples.
	text []textFamily

	// The label pairs every model's sets share (modelLabels), like
	// States, PendingCauses and RestartReasons.
	statePairs, causePairs, reasonPairs []*dto.LabelPair

	// The same labels as text, in the order of their values, which is
	// the order of a family's samples.
	stateText, causeText, reasonText, modeText []labelText

	// kept are each model's processes' /proc files, kept open from one
	// scrape to the next and closed at the first scrape without the
	// model, or without its processes; live is sweep's.
	keptMu sync.Mutex
	kept   map[*runner]*proc.KeptProcs
	live   map[*runner]bool
}

// family is one of modelCollector's metric families.
type family struct {
	name string
	desc *prometheus.Desc
	head string // its HELP and TYPE lines
}

func newFamily(name, typ, help string, labels ...string) *family {
	return &family{
		name: name,
		desc: prometheus.NewDesc(name, help, labels, nil),
		head: "# HELP " + name + " " + helpEscaper.Replace(help) + "\n# TYPE " + name + " " + typ + "\n",
	}
}

// The text format's escapes: of HELP text, and of label values.
var (
	helpEscaper  = strings.NewReplacer(`\`, `\\`, "\n", `\n`)
	valueEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`)
)

// textFamily writes a family's samples from a scrape's rows.
type textFamily struct {
	*family
	write func(b []byte, rows []modelRow) []byte
}

// labelText is a label as text, name="value"; i indexes the list of its
// values (States, PendingCauses, RestartReasons, OwnershipModes).
type labelText struct {
	i    int
	text string
}

// labelTexts returns name's labels for values, sorted by value.
func labelTexts(name string, values []string) []labelText {
	out := make([]labelText, len(values))
	for i, v := range values {
		out[i] = labelText{i, name + `="` + valueEscaper.Replace(v) + `"`}
	}
	slices.SortFunc(out, func(a, b labelText) int { return strings.Compare(values[a.i], values[b.i]) })
	return out
}

func newModelCollector(s *Supervisor) *modelCollector {
	states := make([]string, len(States))
	for i, st := range States {
		states[i] = string(st)
	}
	c := &modelCollector{
		s:           s,
		kept:        map[*runner]*proc.KeptProcs{},
		live:        map[*runner]bool{},
		statePairs:  labelPairs("state", states),
		causePairs:  labelPairs("cause", PendingCauses),
		reasonPairs: labelPairs("reason", RestartReasons),
		stateText:   labelTexts("state", states),
		causeText:   labelTexts("cause", PendingCauses),
		reasonText:  labelTexts("reason", RestartReasons),
		modeText:    labelTexts("mode", OwnershipModes),
		up:          newFamily("citadel_model_up", "gauge", "1 when the model is ready (answering its health probe), else 0.", "model"),
		state:       newFamily("citadel_model_state", "gauge", "1 for the model's current state, 0 for the others.", "model", "state"),
		cause:       newFamily("citadel_model_pending_cause", "gauge", "For a pending model, 1 for what it waits for (gpu is normal when models outnumber memory; storage, port and env_files need an operator; daemon: the daemon itself was short of descriptors or memory to spawn it, and retries; spawn: its process is being started, which takes long only when the spawn hangs), 0 for the other causes.", "model", "cause"),
		restarts:    newFamily("citadel_model_restarts_total", "counter", "Restarts of the model, by reason (exit, probe, startup, manual, reload, wake).", "model", "reason"),
		lastExit:    newFamily("citadel_model_last_exit_code", "gauge", "Exit code of the model's last process (128+signal when killed).", "model"),
		startTime:   newFamily("citadel_model_start_time_seconds", "gauge", "Unix time the model's current process was spawned.", "model"),
		startup:     newFamily("citadel_model_startup_duration_seconds", "gauge", "Spawn to first healthy answer, of the model's last start.", "model"),
		rss:         newFamily("citadel_model_resident_memory_bytes", "gauge", "Resident memory of all of the model's processes.", "model"),
		cpu:         newFamily("citadel_model_cpu_seconds_total", "counter", "CPU time of the model's processes (user and system), across its restarts; a process's time since the last scrape before it exited is not counted.", "model"),
		probeOK:     newFamily("citadel_probe_success", "gauge", "1 if the model's last health probe succeeded, else 0.", "model"),
		reloadOK:    newFamily("citadel_config_last_reload_successful", "gauge", "1 if the last configuration load succeeded, 0 if it was rejected (the previous one stays in force)."),
		hostHeld:    newFamily("citadel_model_sleep_host_memory_bytes", "gauge", "Host memory an on-demand model holds for its level-1 sleeps (its weights in pinned RAM), measured as its resident memory grown across its first; vLLM keeps it until the process ends. Bounded by sleep_host_memory.", "model"),
		reloadTime:  newFamily("citadel_config_last_reload_success_timestamp_seconds", "gauge", "Unix time of the last successful configuration load."),
		vllmInfo:    newFamily("citadel_model_vllm_info", "gauge", "1, labelled with the model's vLLM release (learned from its interpreter's package metadata before it starts, confirmed by its GET /version; docs/vllm.md). Absent while unknown.", "model", "version"),
		ownership:   newFamily("citadel_ownership_mode", "gauge", "1 for how the daemon owns the models' processes (cgroup: a cgroup v2 leaf per instance; marker: marker variable, parent links and subreaper), 0 for the other.", "mode"),
	}
	// Each model's series in a family, one sample a row, as Collect
	// sends them.
	each := func(f *family, v func(modelRow) (float64, bool)) textFamily {
		return textFamily{f, func(b []byte, rows []modelRow) []byte {
			for _, r := range rows {
				if x, ok := v(r); ok {
					b = sample(b, f.name, r.l.text, "", x)
				}
			}
			return b
		}}
	}
	c.text = []textFamily{
		{c.reloadOK, func(b []byte, _ []modelRow) []byte {
			return sample(b, c.reloadOK.name, "", "", boolf(c.s.reloadOK.Load()))
		}},
		{c.reloadTime, func(b []byte, _ []modelRow) []byte {
			return sample(b, c.reloadTime.name, "", "", float64(c.s.reloadAt.Load()))
		}},
		{c.ownership, func(b []byte, _ []modelRow) []byte {
			own := c.s.Ownership()
			for _, m := range c.modeText {
				b = sample(b, c.ownership.name, m.text, "", boolf(own == OwnershipModes[m.i]))
			}
			return b
		}},
		each(c.up, func(r modelRow) (float64, bool) { return boolf(r.st.State == Ready), true }),
		{c.vllmInfo, func(b []byte, rows []modelRow) []byte {
			for _, r := range rows {
				if v := r.st.VLLMVersion; v != "" {
					b = append(b, c.vllmInfo.name...)
					b = append(b, '{')
					b = append(b, r.l.text...)
					b = append(b, `,version="`...)
					b = appendEscaped(b, v)
					b = append(b, "\"} 1\n"...)
				}
			}
			return b
		}},
		{c.state, func(b []byte, rows []modelRow) []byte {
			for _, r := range rows {
				for _, s := range c.stateText {
					b = sample(b, c.state.name, r.l.text, s.text, boolf(r.st.State == States[s.i]))
				}
			}
			return b
		}},
		{c.cause, func(b []byte, rows []modelRow) []byte {
			// Sorted by cause, then model: cause comes first by name.
			for _, cause := range c.causeText {
				for _, r := range rows {
					if r.st.State == Pending {
						b = sample(b, c.cause.name, cause.text, r.l.text, boolf(r.st.PendingCause == PendingCauses[cause.i]))
					}
				}
			}
			return b
		}},
		{c.restarts, func(b []byte, rows []modelRow) []byte {
			for _, r := range rows {
				for _, reason := range c.reasonText {
					b = sample(b, c.restarts.name, r.l.text, reason.text, float64(r.st.RestartsByReason[RestartReasons[reason.i]]))
				}
			}
			return b
		}},
		each(c.lastExit, func(r modelRow) (float64, bool) {
			if r.st.LastExitCode == nil {
				return 0, false
			}
			return float64(*r.st.LastExitCode), true
		}),
		each(c.startTime, func(r modelRow) (float64, bool) { return startTime(r.st), r.st.PID != 0 }),
		each(c.startup, func(r modelRow) (float64, bool) { return r.st.StartupDuration.Seconds(), r.st.StartupDuration > 0 }),
		each(c.hostHeld, func(r modelRow) (float64, bool) { return float64(r.st.SleepHostMemory), r.st.SleepHostMemory > 0 }),
		each(c.probeOK, func(r modelRow) (float64, bool) {
			if r.st.ProbeSuccess == nil {
				return 0, false
			}
			return boolf(*r.st.ProbeSuccess), true
		}),
		each(c.rss, func(r modelRow) (float64, bool) { return r.rss, r.hasRSS }),
		each(c.cpu, func(r modelRow) (float64, bool) { return r.cpu, r.hasCPU }),
	}
	slices.SortFunc(c.text, func(a, b textFamily) int { return strings.Compare(a.name, b.name) })
	return c
}

func startTime(st *Status) float64 { return float64(st.StartedAt.UnixNano()) / 1e9 }

func (c *modelCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, f := range c.text {
		ch <- f.desc
	}
}

// AppendText appends the text exposition of the model series
// (exposition.Families).
func (c *modelCollector) AppendText(b []byte, fams []exposition.Family) ([]byte, []exposition.Family) {
	rows := c.rows()
	for _, f := range c.text {
		start := len(b)
		b = append(b, f.head...)
		head := len(b)
		if b = f.write(b, rows); len(b) == head {
			b = b[:start] // no sample, no family
			continue
		}
		fams = append(fams, exposition.Family{Name: f.name, Start: start, End: len(b)})
	}
	return b, fams
}

// sample appends one sample's line: name{l1,l2} v, each label as
// name="value".
func sample(b []byte, name, l1, l2 string, v float64) []byte {
	b = append(b, name...)
	if l1 != "" {
		b = append(b, '{')
		b = append(b, l1...)
		if l2 != "" {
			b = append(b, ',')
			b = append(b, l2...)
		}
		b = append(b, '}')
	}
	b = append(b, ' ')
	b = appendValue(b, v)
	return append(b, '\n')
}

// appendValue writes v as the text encoder of prometheus/common's expfmt
// does (its writeFloat).
func appendValue(b []byte, v float64) []byte {
	switch {
	case v == 1:
		return append(b, '1')
	case v == 0:
		return append(b, '0')
	case v == -1:
		return append(b, "-1"...)
	case math.IsNaN(v):
		return append(b, "NaN"...)
	case math.IsInf(v, +1):
		return append(b, "+Inf"...)
	case math.IsInf(v, -1):
		return append(b, "-Inf"...)
	}
	return strconv.AppendFloat(b, v, 'g', -1, 64)
}

// appendEscaped appends a label value escaped as the text format escapes
// it (\\, \n and \").
func appendEscaped(b []byte, v string) []byte {
	if !strings.ContainsAny(v, "\\\n\"") {
		return append(b, v...)
	}
	return append(b, valueEscaper.Replace(v)...)
}

func (c *modelCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(c.reloadOK.desc, prometheus.GaugeValue, boolf(c.s.reloadOK.Load()))
	ch <- prometheus.MustNewConstMetric(c.reloadTime.desc, prometheus.GaugeValue, float64(c.s.reloadAt.Load()))
	for _, mode := range OwnershipModes {
		ch <- prometheus.MustNewConstMetric(c.ownership.desc, prometheus.GaugeValue, boolf(c.s.Ownership() == mode), mode)
	}
	for _, row := range c.rows() {
		st, l := row.st, row.l.pairs(c)
		ch <- gauge(c.up.desc, l.model, boolf(st.State == Ready))
		if st.VLLMVersion != "" {
			ch <- prometheus.MustNewConstMetric(c.vllmInfo.desc, prometheus.GaugeValue, 1, st.Name, st.VLLMVersion)
		}
		for i, s := range States {
			ch <- gauge(c.state.desc, l.state[i], boolf(st.State == s))
		}
		if st.State == Pending {
			for i, cause := range PendingCauses {
				ch <- gauge(c.cause.desc, l.cause[i], boolf(st.PendingCause == cause))
			}
		}
		for i, reason := range RestartReasons {
			ch <- counter(c.restarts.desc, l.reason[i], float64(st.RestartsByReason[reason]))
		}
		if st.LastExitCode != nil {
			ch <- gauge(c.lastExit.desc, l.model, float64(*st.LastExitCode))
		}
		if st.PID != 0 {
			ch <- gauge(c.startTime.desc, l.model, startTime(st))
		}
		if st.StartupDuration > 0 {
			ch <- gauge(c.startup.desc, l.model, st.StartupDuration.Seconds())
		}
		if held := st.SleepHostMemory; held > 0 {
			ch <- gauge(c.hostHeld.desc, l.model, float64(held))
		}
		if st.ProbeSuccess != nil {
			ch <- gauge(c.probeOK.desc, l.model, boolf(*st.ProbeSuccess))
		}
		if row.hasRSS {
			ch <- gauge(c.rss.desc, l.model, row.rss)
		}
		if row.hasCPU {
			ch <- counter(c.cpu.desc, l.model, row.cpu)
		}
	}
}

// modelRow is one model's figures at a scrape.
type modelRow struct {
	st     *Status
	l      *modelLabels
	rss    float64 // of its processes, where hasRSS (it has some)
	cpu    float64 // citadel_model_cpu_seconds_total, where hasCPU
	hasRSS bool
	hasCPU bool
}

// rows reads every model's snapshot and processes, once a scrape, sorted
// by name (as the runners are).
func (c *modelCollector) rows() []modelRow {
	runners := *c.s.runners.Load()
	rows := make([]modelRow, 0, len(runners))
	for _, r := range runners {
		st := r.status.Load()
		if st == nil {
			continue
		}
		row := modelRow{st: st, l: c.labelsOf(r, st.Name)}
		row.rss, row.hasRSS, row.cpu, row.hasCPU = c.processes(r)
		rows = append(rows, row)
	}
	c.sweep(runners)
	byName := func(a, b modelRow) int { return strings.Compare(a.st.Name, b.st.Name) }
	if !slices.IsSortedFunc(rows, byName) {
		slices.SortStableFunc(rows, byName)
	}
	return rows
}

// pageSize is the unit of statm and of stat's rss.
var pageSize = float64(os.Getpagesize())

// processes reads r's processes: their resident memory (where it has
// some) and its CPU counter (once it has run).
func (c *modelCollector) processes(r *runner) (rss float64, hasRSS bool, cpu float64, hasCPU bool) {
	times := map[procKey]float64{}
	pids := r.pids.Load()
	if pids != nil {
		// The cgroup's own accounting, where there is one: every
		// process of the instance, exited ones' CPU time included, in
		// two reads however many processes it has. Each process's
		// stat or statm otherwise, kept open from one scrape to the
		// next (proc.KeptProcs; read anew where the model is gone
		// meanwhile).
		var cgMem, cgCPU bool
		if cg := r.cg.Load(); cg != nil {
			var b int64
			if b, cgMem = cg.MemoryBytes(); cgMem {
				rss = float64(b)
			}
			var sec float64
			if sec, cgCPU = cg.CPUSeconds(); cgCPU {
				times[procKey{pid: -1, start: leafKey(cg.Path)}] = sec
			}
		}
		if !cgMem && cgCPU {
			// Only the resident memory is wanted of each process:
			// statm has it, for less of the kernel's time than stat.
			add := func(pages int64) { rss += float64(pages) * pageSize }
			if !c.keptOf(r).RSSPages(pids, add) {
				for _, pid := range *pids {
					if pages, err := proc.ReadRSSPages(pid); err == nil {
						add(pages)
					}
				}
			}
		} else if !cgMem || !cgCPU {
			add := func(ps proc.Stat) {
				if ps.State == 'Z' {
					return
				}
				if !cgMem {
					rss += float64(ps.RSSPages) * pageSize
				}
				if !cgCPU {
					times[procKey{ps.PID, ps.Start}] = float64(ps.UTime+ps.STime) / clockTicks
				}
			}
			if !c.keptOf(r).Stats(pids, add) {
				for _, pid := range *pids {
					if ps, err := proc.ReadStat(pid); err == nil {
						add(ps)
					}
				}
			}
		}
	}
	if pids == nil {
		// No instance (stopped, failed, slept at level 0): its last
		// processes' files are not kept until its next one.
		c.dropKept(r)
	}
	// The counter is exported once the model has run, and never goes
	// backwards, also across its restarts.
	cpu = r.cpu.total(times)
	return rss, pids != nil, cpu, pids != nil || cpu > 0
}

// keptOf returns r's kept /proc files, made at its first scrape.
func (c *modelCollector) keptOf(r *runner) *proc.KeptProcs {
	c.keptMu.Lock()
	defer c.keptMu.Unlock()
	k := c.kept[r]
	if k == nil {
		k = &proc.KeptProcs{}
		c.kept[r] = k
	}
	return k
}

// dropKept closes r's kept files, if any.
func (c *modelCollector) dropKept(r *runner) {
	c.keptMu.Lock()
	defer c.keptMu.Unlock()
	if k := c.kept[r]; k != nil {
		k.Close()
		delete(c.kept, r)
	}
}

// sweep closes the kept files of the models no longer in runners.
func (c *modelCollector) sweep(runners []*runner) {
	c.keptMu.Lock()
	defer c.keptMu.Unlock()
	clear(c.live)
	for _, r := range runners {
		c.live[r] = true
	}
	for r, k := range c.kept {
		if !c.live[r] {
			k.Close()
			delete(c.kept, r)
		}
	}
}

// modelLabels are the labels of one model's series, built once (at the
// model's first scrape) and shared by every scrape after it: as text, and
// as the label pairs of the registry's path, built at its first Collect.
// prometheus.NewConstMetric builds and sorts the pairs anew for every
// series: at 200 models, more than half of a scrape's allocations.
type modelLabels struct {
	name string
	text string // model="name", escaped

	once sync.Once
	p    modelPairs
}

// modelPairs are a model's label pairs, each set sorted by label name, as
// MakeLabelPairs sorts them. A pair is shared by every set that has it
// (the model's by all of the model's, state="ready" by every model's), as
// read-only as the sets: 200 models' sets are then some 100 KiB, not a
// megabyte.
type modelPairs struct {
	model  []*dto.LabelPair   // {model}
	state  [][]*dto.LabelPair // {model, state}, like States
	cause  [][]*dto.LabelPair // {cause, model}, like PendingCauses
	reason [][]*dto.LabelPair // {model, reason}, like RestartReasons
}

// labelsOf returns r's labels, building them at its first scrape.
// Concurrent scrapes may both build them; either is the same.
func (c *modelCollector) labelsOf(r *runner, name string) *modelLabels {
	if l := r.labels.Load(); l != nil && l.name == name {
		return l
	}
	l := &modelLabels{name: name, text: `model="` + valueEscaper.Replace(name) + `"`}
	r.labels.Store(l)
	return l
}

// pairs returns the model's label pairs, building them at the first call.
func (l *modelLabels) pairs(c *modelCollector) *modelPairs {
	l.once.Do(func() {
		model := labelPair("model", l.name)
		l.p.model = []*dto.LabelPair{model}
		for _, p := range c.statePairs {
			l.p.state = append(l.p.state, []*dto.LabelPair{model, p})
		}
		for _, p := range c.causePairs {
			l.p.cause = append(l.p.cause, []*dto.LabelPair{p, model})
		}
		for _, p := range c.reasonPairs {
			l.p.reason = append(l.p.reason, []*dto.LabelPair{model, p})
		}
	})
	return &l.p
}

func labelPair(name, value string) *dto.LabelPair {
	return &dto.LabelPair{Name: &name, Value: &value}
}

func labelPairs(name string, values []string) []*dto.LabelPair {
	out := make([]*dto.LabelPair, len(values))
	for i, v := range values {
		out[i] = labelPair(name, v)
	}
	return out
}

// gaugeSample and counterSample are const metrics over label pairs built
// beforehand: one allocation a series where prometheus.NewConstMetric
// makes several.
type gaugeSample struct {
	desc   *prometheus.Desc
	labels []*dto.LabelPair
	value  float64
	gauge  dto.Gauge
}

type counterSample struct {
	desc    *prometheus.Desc
	labels  []*dto.LabelPair
	value   float64
	counter dto.Counter
}

func gauge(d *prometheus.Desc, labels []*dto.LabelPair, v float64) prometheus.Metric {
	s := &gaugeSample{desc: d, labels: labels, value: v}
	s.gauge.Value = &s.value
	return s
}

func counter(d *prometheus.Desc, labels []*dto.LabelPair, v float64) prometheus.Metric {
	s := &counterSample{desc: d, labels: labels, value: v}
	s.counter.Value = &s.value
	return s
}

func (s *gaugeSample) Desc() *prometheus.Desc { return s.desc }

func (s *gaugeSample) Write(out *dto.Metric) error {
	out.Label, out.Gauge = s.labels, &s.gauge
	return nil
}

func (s *counterSample) Desc() *prometheus.Desc { return s.desc }

func (s *counterSample) Write(out *dto.Metric) error {
	out.Label, out.Counter = s.labels, &s.counter
	return nil
}

var (
	_ exposition.Families = (*modelCollector)(nil)
	_ exposition.Families = (*probeSeries)(nil)
)

// textRegisterer is an exposition.Registry: a Registerer that also takes
// exposition.Families.
type textRegisterer interface {
	RegisterText(exposition.Families) error
}

// leafKey tells instances' cgroup leaves apart in cpuCounter.
func leafKey(path string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(path))
	return h.Sum64()
}

func boolf(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// cpuCounter keeps citadel_model_cpu_seconds_total monotonic. Summing the
// live processes' CPU time would go backwards whenever a worker exits, which
// Prometheus reads as a counter reset; so the last CPU time seen of each
// process is kept, and added to a base once the process is gone. CPU spent
// between a process's last scrape and its exit is not counted.
type cpuCounter struct {
	mu   sync.Mutex
	base float64
	last map[procKey]float64
}

type procKey struct {
	pid   int
	start uint64
}

// total returns the model's CPU seconds, given its live processes' times.
func (c *cpuCounter) total(now map[procKey]float64) float64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, v := range c.last {
		if _, ok := now[k]; !ok {
			c.base += v
		}
	}
	c.last = now
	sum := c.base
	for _, v := range now {
		sum += v
	}
	return sum
}
