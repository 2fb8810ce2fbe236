package gateway

import (
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
