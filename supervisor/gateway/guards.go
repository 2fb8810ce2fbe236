package gateway

import (
	"net"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// guardMetrics say what the gateway's bounds did: clients that stalled,
// connections refused, bodies held (docs/metrics.md).
type guardMetrics struct {
	stalls *prometheus.CounterVec // reason
}

func newGuardMetrics() *guardMetrics {
	m := &guardMetrics{
		stalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "citadel_gateway_client_stalls_total",
			Help: "Requests cut because their client stalled: body_idle (no byte of the body for gateway.body_timeout), body_rate (the body came slower than gateway.min_body_rate), send (the client read nothing of its answer for gateway.send_timeout).",
		}, []string{"reason"}),
	}
	for _, r := range []string{StallBodyIdle, StallBodyRate, StallSend} {
		m.stalls.WithLabelValues(r) // every reason from the start: rate() needs a 0
	}
	return m
}

var (
	connectionsDesc = prometheus.NewDesc("citadel_gateway_connections",
		"Client connections the gateway holds open.", nil, nil)
	connectionsMaxDesc = prometheus.NewDesc("citadel_gateway_connections_max",
		"The gateway's connection cap (gateway.max_connections, or derived from the descriptor limit); more connections wait in the kernel's backlog.", nil, nil)
	refusedDesc = prometheus.NewDesc("citadel_gateway_connections_refused_total",
		"Connections the gateway closed at once: per_address (gateway.max_connections_per_address), descriptors (the daemon was out of file descriptors).", []string{"reason"}, nil)
	bodyBytesDesc = prometheus.NewDesc("citadel_gateway_body_bytes",
		"Bytes of request bodies the gateway holds (being received, queued or being sent to a model), in memory or in temporary files.", []string{"store"}, nil)
	bodyLimitDesc = prometheus.NewDesc("citadel_gateway_body_limit_bytes",
		"The limits of citadel_gateway_body_bytes: gateway.body_memory and gateway.body_spool.", []string{"store"}, nil)
)

// guardCollector reads the connection and body gauges at scrape time.
type guardCollector struct{ g *Gateway }

func (c guardCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{connectionsDesc, connectionsMaxDesc, refusedDesc, bodyBytesDesc, bodyLimitDesc} {
		ch <- d
	}
}

func (c guardCollector) Collect(ch chan<- prometheus.Metric) {
	g := c.g
	ch <- prometheus.MustNewConstMetric(connectionsDesc, prometheus.GaugeValue, float64(g.ln.Open()))
	ch <- prometheus.MustNewConstMetric(connectionsMaxDesc, prometheus.GaugeValue, float64(g.ln.Cap()))
	perAddr, fds := g.ln.Refused()
	ch <- prometheus.MustNewConstMetric(refusedDesc, prometheus.CounterValue, float64(perAddr), "per_address")
	ch <- prometheus.MustNewConstMetric(refusedDesc, prometheus.CounterValue, float64(fds), "descriptors")
	mem, spool := g.bodies.held()
	ch <- prometheus.MustNewConstMetric(bodyBytesDesc, prometheus.GaugeValue, float64(mem), "memory")
	ch <- prometheus.MustNewConstMetric(bodyBytesDesc, prometheus.GaugeValue, float64(spool), "spool")
	ch <- prometheus.MustNewConstMetric(bodyLimitDesc, prometheus.GaugeValue, float64(g.bodies.memLimit.Load()), "memory")
	ch <- prometheus.MustNewConstMetric(bodyLimitDesc, prometheus.GaugeValue, float64(g.bodies.spoolLimit.Load()), "spool")
}

// refuseAddress answers a connection over gateway.max_connections_per_address
// before it is closed: a short 429 in OpenAI's shape, written without
// waiting (it fits any socket buffer; a client that reads nothing loses
// it, not the accept loop).
func refuseAddress(c net.Conn) {
	const body = `{"error":{"message":"too many connections from your address (gateway.max_connections_per_address); retry later","type":"rate_limit_error","param":null,"code":"too_many_connections"}}` + "\n"
	_ = c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	_, _ = c.Write([]byte("HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: " +
		strconv.Itoa(len(body)) + "\r\n\r\n" + body))
}
