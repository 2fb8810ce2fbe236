// Package web serves the supervisor's read-only HTTP endpoints on `listen`:
// /metrics for Prometheus, /healthz and /readyz for probes of the daemon
// itself, and /sd, Prometheus HTTP service discovery of the ready models.
// Nothing here changes state, and no secret is ever on it.
package web

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/exposition"
	"citadel-supervisor/supervisor/netguard"
)

// Supervisor is what the endpoints read.
type Supervisor interface {
	Status(names ...string) ([]api.Status, error)
	Alive(maxAge time.Duration) bool
	Config() *config.Config
}

// maxScrapes bounds concurrent /metrics requests: a scrape reads /proc for
// every model and the GPUs, and a stuck Prometheus must not multiply that.
const maxScrapes = 4

// scrapeTimeout bounds one /metrics answer.
const scrapeTimeout = 30 * time.Second

// aliveWithin is how recent the supervisor loop's heartbeat must be for
// /healthz to answer 200.
const aliveWithin = 5 * time.Second

// Server serves the endpoints.
type Server struct {
	ln  *netguard.Listener
	srv *http.Server
}

// Check is a part of the daemon that /readyz also judges, such as the
// gateway: Err returns why it is not serving, nil while it is.
type Check struct {
	Name string
	Err  func() error
}

// Listen binds addr. The registry is the daemon's own, never the default.
func Listen(addr string, sup Supervisor, reg prometheus.Gatherer, log *zap.Logger, checks ...Check) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", addr, err)
	}
	return Serve(ln, sup, reg, log, checks...), nil
}

// Serve is Listen on a listener the caller bound (or inherited from the
// previous image at an upgrade).
func Serve(ln net.Listener, sup Supervisor, reg prometheus.Gatherer, log *zap.Logger, checks ...Check) *Server {
	// Anyone on the host can connect here: connections are capped and
	// every phase has a deadline, so idle or slow clients cannot hold the
	// descriptors the daemon probes its models with.
	maxConns, _ := netguard.Limits()
	return &Server{ln: netguard.Limit(ln, maxConns, log), srv: &http.Server{
		Handler:           Handler(sup, reg, log, checks...),
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       30 * time.Second,
		ErrorLog:          zap.NewStdLog(log),
	}}
}

// Addr is the bound address (useful with port 0).
func (s *Server) Addr() string { return s.ln.Addr().String() }

// Guard is the listener: an upgrade pauses it and hands its socket to the
// next image.
func (s *Server) Guard() *netguard.Listener { return s.ln }

// HTTP is the server, whose keep-alives an upgrade turns off.
func (s *Server) HTTP() *http.Server { return s.srv }

// Run serves until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.srv.Serve(s.ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("http: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.srv.Shutdown(sctx); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Handler routes the endpoints; only GET and HEAD are served.
func Handler(sup Supervisor, reg prometheus.Gatherer, log *zap.Logger, checks ...Check) http.Handler {
	mux := http.NewServeMux()
	opts := promhttp.HandlerOpts{
		ErrorLog:            zap.NewStdLog(log),
		MaxRequestsInFlight: maxScrapes,
		DisableCompression:  true, // gzipFast compresses
	}
	metrics := promhttp.HandlerFor(reg, opts)
	if r, ok := reg.(*exposition.Registry); ok {
		// The model series written as text past the registry, the
		// rest through it (docs/performance.md).
		metrics = r.Handler(opts)
	}
	mux.Handle("GET /metrics", http.TimeoutHandler(gzipFast(metrics), scrapeTimeout, fmt.Sprintf("Exceeded configured timeout of %v.\n", scrapeTimeout))) // promhttp's own Timeout answer
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		if !sup.Alive(aliveWithin) {
			http.Error(w, "supervisor loop not responding", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		st, _ := sup.Status()
		h := api.HealthOf(st)
		code := http.StatusOK
		if !h.Healthy {
			code = http.StatusServiceUnavailable
		}
		type notReady struct {
			Name   string    `json:"name"`
			State  api.State `json:"state"`
			Reason string    `json:"reason"`
		}
		type notServing struct {
			Name   string `json:"name"`
			Reason string `json:"reason"`
		}
		out := struct {
			Ready      int          `json:"ready"`
			Enabled    int          `json:"enabled"`
			NotReady   []notReady   `json:"not_ready"`
			NotServing []notServing `json:"not_serving,omitempty"`
		}{Ready: h.Ready, Enabled: h.Enabled, NotReady: []notReady{}}
		for _, m := range h.NotReady {
			out.NotReady = append(out.NotReady, notReady{m.Name, m.State, m.Reason})
		}
		// A model of the configuration with no status yet (the daemon is
		// starting and has not made its runners) is not ready: without
		// this, a daemon that knows no model yet was ready, 0 of 0.
		if cfg := sup.Config(); cfg != nil {
			known := map[string]bool{}
			for _, m := range st {
				known[m.Name] = true
			}
			for _, m := range cfg.Models {
				if m.Enabled && !known[m.Name] {
					out.Enabled++
					out.NotReady = append(out.NotReady, notReady{m.Name, api.Pending, "the supervisor is starting"})
					code = http.StatusServiceUnavailable
				}
			}
		}
		// A daemon whose gateway is not serving is not serving its
		// clients, however ready the models are.
		for _, c := range checks {
			if err := c.Err(); err != nil {
				code = http.StatusServiceUnavailable
				out.NotServing = append(out.NotServing, notServing{c.Name, err.Error()})
			}
		}
		writeJSON(w, code, out)
	})
	mux.HandleFunc("GET /sd", func(w http.ResponseWriter, r *http.Request) {
		st, _ := sup.Status()
		writeJSON(w, http.StatusOK, targets(sup.Config(), st, r.Host))
	})
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprint(w, `<html><head><title>citadel-supervisor</title></head><body><h1>citadel-supervisor</h1>
<p><a href="/metrics">/metrics</a> · <a href="/healthz">/healthz</a> · <a href="/readyz">/readyz</a> · <a href="/sd">/sd</a></p></body></html>`)
	})
	return mux
}

// targetGroup is one entry of Prometheus HTTP service discovery.
type targetGroup struct {
	Targets []string          `json:"targets"`
	Labels  map[string]string `json:"labels"`
}

// targets lists ready models' vLLM endpoints. A model bound to a wildcard
// address is announced under the host name the caller used to reach /sd,
// which is how the fleet Prometheus can reach it too.
func targets(cfg *config.Config, st []api.Status, reqHost string) []targetGroup {
	host, _, err := net.SplitHostPort(reqHost)
	if err != nil {
		host = reqHost
	}
	out := []targetGroup{}
	for _, s := range st {
		if s.State != api.Ready {
			continue
		}
		m, ok := cfg.Model(s.Name)
		if !ok {
			continue
		}
		h := m.Host
		if h == "0.0.0.0" || h == "::" || h == "" {
			h = host
		}
		out = append(out, targetGroup{
			Targets: []string{net.JoinHostPort(h, strconv.Itoa(m.Port))},
			// citadel_host is the daemon's host as /sd's caller named it and
			// fleet_state what a fleet router reads (only awake ones here).
			Labels: map[string]string{"model": s.Name, "served_name": m.ServedName,
				"citadel_host": host, "fleet_state": "awake"},
		})
	}
	return out
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v) //nolint:errcheck // the client went away
}
