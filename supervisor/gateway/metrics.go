package gateway

import (
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are docs/metrics.md's citadel_gateway_* families. Counters and histograms
// are vectors whose series of a removed model are deleted; the gauges are
// read at scrape time from the models' queues (collector below), so they
// come and go with the configuration.
type metrics struct {
	requests  *prometheus.CounterVec   // model, code, key
	duration  *prometheus.HistogramVec // model
	ttfb      *prometheus.HistogramVec // model
	queueWait *prometheus.HistogramVec // model
	rejected  *prometheus.CounterVec   // model, reason
	tokens    *prometheus.CounterVec   // model, key, kind
	tpot      *prometheus.HistogramVec // model
	limited   *prometheus.CounterVec   // key, limit
}

func newMetrics() *metrics {
	return &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citadel_gateway_requests_total",
			Help: "Requests answered by the gateway, by model (configured name; empty when none was resolved), HTTP status code (499: the client went away) and API key NAME (empty without api_keys_file).",
		}, []string{"model", "code", "key"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "citadel_gateway_request_duration_seconds",
			Help:    "Time from a request's arrival to its last byte, queueing included.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600},
		}, []string{"model"}),
		ttfb: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "citadel_gateway_time_to_first_byte_seconds",
			Help:    "Time from a request's arrival to the first byte of its answer (for a stream, its first event), queueing included.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60},
		}, []string{"model"}),
		queueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "citadel_gateway_queue_wait_seconds",
			Help:    "Time requests spent in a model's queue, whatever the outcome (admitted, max_wait, refused, client gone); requests admitted at once are not counted.",
			Buckets: []float64{.001, .01, .05, .1, .5, 1, 2.5, 5, 10, 30, 60, 180, 600},
		}, []string{"model"}),
		rejected: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citadel_gateway_rejected_total",
			Help: "Requests the gateway answered itself without reaching a model, by reason (unauthorized, unknown_model, bad_request, queue_full, max_wait, unavailable, rate_limit, scope).",
		}, []string{"model", "reason"}),
		tokens: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citadel_gateway_tokens_total",
			Help: "Tokens the models reported in their answers' usage, by model, API key NAME (empty without api_keys_file) and kind (prompt, completion).",
		}, []string{"model", "key", "kind"}),
		tpot: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "citadel_gateway_time_per_output_token_seconds",
			Help:    "Per streamed answer, the time between its first and last events divided by its completion tokens less one.",
			Buckets: []float64{.001, .0025, .005, .01, .015, .02, .03, .04, .05, .075, .1, .15, .2, .3, .5, 1},
		}, []string{"model"}),
		limited: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citadel_gateway_rate_limited_total",
			Help: "Requests refused 429 rate_limit_exceeded, by API key NAME and the limit it reached (requests: requests_per_minute, tokens: tokens_per_minute).",
		}, []string{"key", "limit"}),
	}
}

func (m *metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.requests, m.duration, m.ttfb, m.queueWait, m.rejected, m.tokens, m.tpot, m.limited}
}

// forget deletes a removed model's series.
func (m *metrics) forget(model string) {
	l := prometheus.Labels{"model": model}
	m.requests.DeletePartialMatch(l)
	m.duration.DeletePartialMatch(l)
	m.ttfb.DeletePartialMatch(l)
	m.queueWait.DeletePartialMatch(l)
	m.rejected.DeletePartialMatch(l)
	m.tokens.DeletePartialMatch(l)
	m.tpot.DeletePartialMatch(l)
}

var (
	inFlightDesc = prometheus.NewDesc("citadel_gateway_in_flight",
		"Requests the gateway is forwarding to the model now.", []string{"model"}, nil)
	queueDepthDesc = prometheus.NewDesc("citadel_gateway_queue_depth",
		"Requests waiting in the model's queue (for a slot under max_concurrency, or for the model to be ready).", []string{"model"}, nil)
	lastRequestDesc = prometheus.NewDesc("citadel_model_last_request_timestamp_seconds",
		"Unix time of the last request the gateway routed to the model; absent before the first.", []string{"model"}, nil)
)

// collector reads the gauges from the current routing table at scrape time.
type collector struct{ g *Gateway }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- inFlightDesc
	ch <- queueDepthDesc
	ch <- lastRequestDesc
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	for _, rt := range c.g.table.Load().list {
		inFlight, queued := rt.up.adm.load()
		ch <- prometheus.MustNewConstMetric(inFlightDesc, prometheus.GaugeValue, float64(inFlight), rt.model.Name)
		ch <- prometheus.MustNewConstMetric(queueDepthDesc, prometheus.GaugeValue, float64(queued), rt.model.Name)
		if ns := rt.up.lastRequest.Load(); ns > 0 {
			ch <- prometheus.MustNewConstMetric(lastRequestDesc, prometheus.GaugeValue, float64(ns)/1e9, rt.model.Name)
		}
	}
}

// series are one model's children of the vectors above, looked up once:
// WithLabelValues hashes and checks its labels on every call, and every
// request would make several. They live with the model's upstream, which
// the removal that deletes the model's series drops too (update), so a
// series deleted is never brought back from here.
type series struct {
	mu sync.Mutex
	m  atomic.Pointer[map[seriesKey]seriesChild] // copied on write
}

// seriesKey is a child's family and its labels besides the model's.
type seriesKey struct {
	fam  family
	code int    // requests
	key  string // requests, tokens
}

type family uint8

const (
	famRequests family = iota
	famDuration
	famTTFB
	famQueueWait
	famPrompt     // tokens, kind prompt
	famCompletion // tokens, kind completion
	famTPOT
)

type seriesChild struct {
	c prometheus.Counter
	o prometheus.Observer
}

// counter is the model's counter of family fam for key and code.
func (s *series) counter(m *metrics, model string, fam family, code int, key string) prometheus.Counter {
	return s.child(m, model, seriesKey{fam: fam, code: code, key: key}).c
}

// observer is the model's histogram of family fam.
func (s *series) observer(m *metrics, model string, fam family) prometheus.Observer {
	return s.child(m, model, seriesKey{fam: fam}).o
}

// child is the child k, made at its first use as WithLabelValues makes
// it. A nil s (a model no longer routed by its name) keeps nothing.
func (s *series) child(m *metrics, model string, k seriesKey) seriesChild {
	if s == nil {
		return m.make(model, k)
	}
	if cur := s.m.Load(); cur != nil {
		if c, ok := (*cur)[k]; ok {
			return c
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := s.m.Load()
	var old map[seriesKey]seriesChild
	if cur != nil {
		old = *cur
		if c, ok := old[k]; ok {
			return c
		}
	}
	c := m.make(model, k)
	next := make(map[seriesKey]seriesChild, len(old)+1)
	for k, v := range old {
		next[k] = v
	}
	next[k] = c
	s.m.Store(&next)
	return c
}

func (m *metrics) make(model string, k seriesKey) seriesChild {
	var c seriesChild
	switch k.fam {
	case famRequests:
		c.c = m.requests.WithLabelValues(model, strconv.Itoa(k.code), k.key)
	case famPrompt:
		c.c = m.tokens.WithLabelValues(model, k.key, "prompt")
	case famCompletion:
		c.c = m.tokens.WithLabelValues(model, k.key, "completion")
	case famDuration:
		c.o = m.duration.WithLabelValues(model)
	case famTTFB:
		c.o = m.ttfb.WithLabelValues(model)
	case famQueueWait:
		c.o = m.queueWait.WithLabelValues(model)
	case famTPOT:
		c.o = m.tpot.WithLabelValues(model)
	}
	return c
}

// seriesOf is the series of the model routed as name now: nil when it is
// no longer, or when name is another model's served name.
func (g *Gateway) seriesOf(name string) (s *series, routed bool) {
	rt := g.table.Load().byName[name]
	if rt == nil {
		return nil, false
	}
	if rt.model.Name != name {
		return nil, true
	}
	return &rt.up.series, true
}
