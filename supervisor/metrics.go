package supervisor

import (
	"hash/fnv"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

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
	probeDuration *prometheus.HistogramVec
	probeFailures *prometheus.CounterVec
	sleeps        *prometheus.CounterVec
	wakeDuration  *prometheus.HistogramVec
	wakeFailures  *prometheus.CounterVec
}

// wakeBuckets span a small model's level-1 wake (0.1 s) to a large one's
// level-2 reload (a minute).
var wakeBuckets = []float64{.1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120}

func newMetrics() *metrics {
	return &metrics{
		probeDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "citadel_probe_duration_seconds",
			Help:    "Duration of health probes of ready models.",
			Buckets: probeBuckets,
		}, []string{"model"}),
		probeFailures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citadel_probe_failures_total",
			Help: "Failed health probes of ready models (not counting probes while a model loads).",
		}, []string{"model"}),
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
	m.probeDuration.WithLabelValues(model).Observe(d.Seconds())
	c := m.probeFailures.WithLabelValues(model)
	if err != nil {
		c.Inc()
	}
}

// forget deletes a removed model's series.
func (m *metrics) forget(model string) {
	m.probeDuration.DeleteLabelValues(model)
	m.probeFailures.DeleteLabelValues(model)
	m.sleeps.DeletePartialMatch(prometheus.Labels{"model": model})
	m.wakeDuration.DeletePartialMatch(prometheus.Labels{"model": model})
	m.wakeFailures.DeletePartialMatch(prometheus.Labels{"model": model})
}

// modelCollector reads the supervisor's snapshot at scrape time.
type modelCollector struct {
	s *Supervisor

	up, state, cause, restarts, lastExit, startTime, startup, rss, cpu, probeOK, reloadOK, reloadTime, hostHeld, ownership, vllmInfo *prometheus.Desc

	// The label pairs every model's sets share (modelLabels), like
	// States, PendingCauses and RestartReasons.
	statePairs, causePairs, reasonPairs []*dto.LabelPair
}

func newModelCollector(s *Supervisor) *modelCollector {
	m := []string{"model"}
	states := make([]string, len(States))
	for i, st := range States {
		states[i] = string(st)
	}
	return &modelCollector{
		s:           s,
		statePairs:  labelPairs("state", states),
		causePairs:  labelPairs("cause", PendingCauses),
		reasonPairs: labelPairs("reason", RestartReasons),
		up:          prometheus.NewDesc("citadel_model_up", "1 when the model is ready (answering its health probe), else 0.", m, nil),
		state:       prometheus.NewDesc("citadel_model_state", "1 for the model's current state, 0 for the others.", []string{"model", "state"}, nil),
		cause:       prometheus.NewDesc("citadel_model_pending_cause", "For a pending model, 1 for what it waits for (gpu is normal when models outnumber memory; storage, port and env_files need an operator; daemon: the daemon itself was short of descriptors or memory to spawn it, and retries), 0 for the other causes.", []string{"model", "cause"}, nil),
		restarts:    prometheus.NewDesc("citadel_model_restarts_total", "Restarts of the model, by reason (exit, probe, startup, manual, reload, wake).", []string{"model", "reason"}, nil),
		lastExit:    prometheus.NewDesc("citadel_model_last_exit_code", "Exit code of the model's last process (128+signal when killed).", m, nil),
		startTime:   prometheus.NewDesc("citadel_model_start_time_seconds", "Unix time the model's current process was spawned.", m, nil),
		startup:     prometheus.NewDesc("citadel_model_startup_duration_seconds", "Spawn to first healthy answer, of the model's last start.", m, nil),
		rss:         prometheus.NewDesc("citadel_model_resident_memory_bytes", "Resident memory of all of the model's processes.", m, nil),
		cpu:         prometheus.NewDesc("citadel_model_cpu_seconds_total", "CPU time of the model's processes (user and system), across its restarts; a process's time since the last scrape before it exited is not counted.", m, nil),
		probeOK:     prometheus.NewDesc("citadel_probe_success", "1 if the model's last health probe succeeded, else 0.", m, nil),
		reloadOK:    prometheus.NewDesc("citadel_config_last_reload_successful", "1 if the last configuration load succeeded, 0 if it was rejected (the previous one stays in force).", nil, nil),
		hostHeld:    prometheus.NewDesc("citadel_model_sleep_host_memory_bytes", "Host memory an on-demand model holds for its level-1 sleeps (its weights in pinned RAM), measured as its resident memory grown across its first; vLLM keeps it until the process ends. Bounded by sleep_host_memory.", m, nil),
		reloadTime:  prometheus.NewDesc("citadel_config_last_reload_success_timestamp_seconds", "Unix time of the last successful configuration load.", nil, nil),
		vllmInfo:    prometheus.NewDesc("citadel_model_vllm_info", "1, labelled with the model's vLLM release (learned from its interpreter's package metadata before it starts, confirmed by its GET /version; docs/vllm.md). Absent while unknown.", []string{"model", "version"}, nil),
		ownership:   prometheus.NewDesc("citadel_ownership_mode", "1 for how the daemon owns the models' processes (cgroup: a cgroup v2 leaf per instance; marker: marker variable, parent links and subreaper), 0 for the other.", []string{"mode"}, nil),
	}
}

func (c *modelCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.up, c.state, c.cause, c.restarts, c.lastExit, c.startTime, c.startup, c.rss, c.cpu, c.probeOK, c.reloadOK, c.reloadTime, c.hostHeld, c.ownership, c.vllmInfo} {
		ch <- d
	}
}

func (c *modelCollector) Collect(ch chan<- prometheus.Metric) {
	page := float64(os.Getpagesize())
	ch <- prometheus.MustNewConstMetric(c.reloadOK, prometheus.GaugeValue, boolf(c.s.reloadOK.Load()))
	ch <- prometheus.MustNewConstMetric(c.reloadTime, prometheus.GaugeValue, float64(c.s.reloadAt.Load()))
	for _, mode := range OwnershipModes {
		ch <- prometheus.MustNewConstMetric(c.ownership, prometheus.GaugeValue, boolf(c.s.Ownership() == mode), mode)
	}
	for _, r := range *c.s.runners.Load() {
		st := r.status.Load()
		if st == nil {
			continue
		}
		name := st.Name
		l := c.labelsOf(r, name)
		ch <- gauge(c.up, l.model, boolf(st.State == Ready))
		if st.VLLMVersion != "" {
			ch <- prometheus.MustNewConstMetric(c.vllmInfo, prometheus.GaugeValue, 1, name, st.VLLMVersion)
		}
		for i, s := range States {
			ch <- gauge(c.state, l.state[i], boolf(st.State == s))
		}
		if st.State == Pending {
			for i, cause := range PendingCauses {
				ch <- gauge(c.cause, l.cause[i], boolf(st.PendingCause == cause))
			}
		}
		for i, reason := range RestartReasons {
			ch <- counter(c.restarts, l.reason[i], float64(st.RestartsByReason[reason]))
		}
		if st.LastExitCode != nil {
			ch <- gauge(c.lastExit, l.model, float64(*st.LastExitCode))
		}
		if st.PID != 0 {
			ch <- gauge(c.startTime, l.model, float64(st.StartedAt.UnixNano())/1e9)
		}
		if st.StartupDuration > 0 {
			ch <- gauge(c.startup, l.model, st.StartupDuration.Seconds())
		}
		if held := st.SleepHostMemory; held > 0 {
			ch <- gauge(c.hostHeld, l.model, float64(held))
		}
		if st.ProbeSuccess != nil {
			ch <- gauge(c.probeOK, l.model, boolf(*st.ProbeSuccess))
		}
		var rss float64
		times := map[procKey]float64{}
		pids := r.pids.Load()
		if pids != nil {
			// The cgroup's own accounting, where there is one: every
			// process of the instance, exited ones' CPU time included, in
			// two reads however many processes it has. Each process's
			// stat or statm otherwise (an open, two reads and a close a
			// process: most of a scrape of many models).
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
				for _, pid := range *pids {
					if pages, err := proc.ReadRSSPages(pid); err == nil {
						rss += float64(pages) * page
					}
				}
			} else if !cgMem || !cgCPU {
				for _, pid := range *pids {
					ps, err := proc.ReadStat(pid)
					if err != nil || ps.State == 'Z' {
						continue
					}
					if !cgMem {
						rss += float64(ps.RSSPages) * page
					}
					if !cgCPU {
						times[procKey{pid, ps.Start}] = float64(ps.UTime+ps.STime) / clockTicks
					}
				}
			}
			ch <- gauge(c.rss, l.model, rss)
		}
		// The counter is exported once the model has run, and never goes
		// backwards, also across its restarts.
		if cpu := r.cpu.total(times); pids != nil || cpu > 0 {
			ch <- counter(c.cpu, l.model, cpu)
		}
	}
}

// modelLabels are the label pairs of one model's series, built once (at
// the model's first scrape) and shared by every scrape after it, as a
// const metric shares its own between writes. prometheus.NewConstMetric
// builds and sorts them anew for every series: at 200 models, more than
// half of a scrape's allocations.
type modelLabels struct {
	name   string
	model  []*dto.LabelPair   // {model}
	state  [][]*dto.LabelPair // {model, state}, like States
	cause  [][]*dto.LabelPair // {cause, model}, like PendingCauses
	reason [][]*dto.LabelPair // {model, reason}, like RestartReasons
}

// labelsOf returns r's label pairs, building them at its first scrape.
// Concurrent scrapes may both build them; either set is the same. A pair
// is shared by every set that has it (the model's by all of the model's,
// state="ready" by every model's), as read-only as the sets: 200 models'
// sets are then some 100 KiB, not a megabyte.
func (c *modelCollector) labelsOf(r *runner, name string) *modelLabels {
	if l := r.labels.Load(); l != nil && l.name == name {
		return l
	}
	model := labelPair("model", name)
	// Each set sorted by label name, as MakeLabelPairs sorts them.
	l := &modelLabels{name: name, model: []*dto.LabelPair{model}}
	for _, p := range c.statePairs {
		l.state = append(l.state, []*dto.LabelPair{model, p})
	}
	for _, p := range c.causePairs {
		l.cause = append(l.cause, []*dto.LabelPair{p, model})
	}
	for _, p := range c.reasonPairs {
		l.reason = append(l.reason, []*dto.LabelPair{model, p})
	}
	r.labels.Store(l)
	return l
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
