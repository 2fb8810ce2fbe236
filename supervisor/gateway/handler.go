package gateway

import (
	"encoding/json"
	"fmt"
	"net/http"
	"path"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"
)

// devEndpoints are vLLM's development and administration endpoints (SPEC
// §8): they put a model to sleep, run code in its workers or drop its
// caches. Only /v1/ is forwarded, which excludes them already; naming them
// again guards against a future vLLM moving one under /v1/, and covers the
// LoRA admin endpoints that are under /v1/.
var devEndpoints = map[string]bool{
	"sleep": true, "wake_up": true, "is_sleeping": true, "collective_rpc": true,
	"reset_prefix_cache": true, "reset_mm_cache": true, "start_profile": true, "stop_profile": true,
	"load_lora_adapter": true, "unload_lora_adapter": true, "scale_elastic_ep": true,
	"is_scaling_elastic_ep": true, "update_weights": true, "pause": true, "resume": true,
}

// ServeHTTP is the gateway: /v1/models answered here, POST /v1/... routed
// by the body's model, nothing else.
func (g *Gateway) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := g.now()
	rec := &recorder{ResponseWriter: w, now: g.now}
	set := g.settings.Load()
	req := &reqInfo{}
	defer func() { g.finish(rec, r, req, start) }()
	// Every answer must be taken within send_timeout (timeouts.go).
	newSendBound(w, set.SendTimeout).next()

	p := r.URL.Path
	// The decoded path must be canonical: "/v1/../sleep", "/v1/%2e%2e/x"
	// and "//x" never reach a model, whatever it would make of them.
	if !strings.HasPrefix(p, "/v1/") || path.Clean(p) != p || strings.Contains(r.URL.RawPath, "%2") || devPath(p) {
		req.reject(rec, errBadRequest(http.StatusNotFound, "not_found", "only the OpenAI API under /v1/ is served here"))
		return
	}
	if set.Keys != nil {
		name, ok := set.Keys.lookup(r.Header.Get("Authorization"))
		if !ok {
			rec.Header().Set("WWW-Authenticate", `Bearer realm="citadel"`)
			req.reject(rec, errUnauthorized())
			return
		}
		req.key = name
		// The token is the gateway's; the model never sees it.
		r.Header.Del("Authorization")
	}
	switch {
	case p == "/v1/models":
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			req.reject(rec, errMethod("GET"))
			return
		}
		g.listModels(rec)
		return
	case strings.HasPrefix(p, "/v1/models/"):
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			req.reject(rec, errMethod("GET"))
			return
		}
		g.getModel(rec, req, strings.TrimPrefix(p, "/v1/models/"))
		return
	case r.Method != http.MethodPost:
		req.reject(rec, errMethod("POST"))
		return
	}
	g.forward(rec, r, req, set, start)
}

func devPath(p string) bool {
	for _, seg := range strings.Split(p, "/") {
		if devEndpoints[seg] {
			return true
		}
	}
	return false
}

func errMethod(allow string) *apiError {
	return errBadRequest(http.StatusMethodNotAllowed, "method_not_allowed", "use "+allow+" for this path")
}

// reqInfo is what the access log and the metrics learn about a request.
type reqInfo struct {
	model  string // configured name, once routed
	key    string // the API key's NAME
	waited bool
	wait   time.Duration
	err    *apiError // the gateway's own answer, if any
}

func (q *reqInfo) reject(w http.ResponseWriter, e *apiError) {
	q.err = e
	if e.status != statusClientGone {
		e.write(w)
	} else if rec, ok := w.(*recorder); ok {
		rec.status = statusClientGone
	}
}

// forward routes a POST by its body's model and proxies it. The body is
// received whole first (bodies.go): only then does the request name a
// model to the queue, hold a slot or count toward a drain.
func (g *Gateway) forward(w *recorder, r *http.Request, req *reqInfo, set *Settings, start time.Time) {
	if r.ContentLength > set.MaxBody {
		req.reject(w, errBadRequest(http.StatusRequestEntityTooLarge, "request_too_large",
			fmt.Sprintf("request body of %d bytes is over %d (gateway.max_body)", r.ContentLength, set.MaxBody)))
		return
	}
	b, berr := g.receive(w, r, set)
	defer b.release()
	if berr != nil {
		req.reject(w, berr)
		return
	}
	name := b.scan.name
	rt := g.table.Load().byName[name]
	if rt == nil {
		req.reject(w, errUnknownModel(name))
		return
	}
	up := rt.up
	req.model = rt.model.Name
	up.lastRequest.Store(start.UnixNano())
	// An on-demand model that sleeps or is stopped is woken or started by
	// this; the request waits in the queue whatever it waits for.
	g.models.Demand(rt.model.Name)

	// From here an upgrade past its drain bound may end the request (cut.go).
	ctx, done := g.cut.cuttable(r.Context())
	defer done()
	r = r.WithContext(ctx)

	waitStart := g.now()
	waited, aerr := up.adm.acquire(r.Context(), set.MaxQueue, set.MaxWait, g.timer)
	if waited {
		req.waited, req.wait = true, g.now().Sub(waitStart)
	}
	if aerr == errClientGone && wasCut(ctx) {
		aerr = errUpgrading()
	}
	if aerr != nil {
		req.reject(w, aerr)
		return
	}
	defer up.adm.release()

	// vLLM knows only its --served-model-name: a client that used the
	// configured name has it replaced, the one change the gateway makes
	// to a body.
	r.Body, r.ContentLength = b.forwardBody(rt.model.ServedName)
	up.serve(w, r, g)
}

// finish records a request's metrics and, at debug level only, its access
// log line: a busy gateway must not flood the journal. The API key's NAME
// is logged, never its token, and never a header or a body.
func (g *Gateway) finish(w *recorder, r *http.Request, req *reqInfo, start time.Time) {
	end := g.now()
	status := w.code()
	m := g.metrics
	if req.model != "" && g.table.Load().byName[req.model] == nil {
		// Removed by a reload while this request ran: its series are gone
		// and must not come back.
		req.model = ""
	}
	m.requests.WithLabelValues(req.model, strconv.Itoa(status), req.key).Inc()
	if req.err != nil && req.err.reject != "" {
		m.rejected.WithLabelValues(req.model, req.err.reject).Inc()
	}
	if req.waited {
		m.queueWait.WithLabelValues(req.model).Observe(req.wait.Seconds())
	}
	if req.model != "" {
		m.duration.WithLabelValues(req.model).Observe(end.Sub(start).Seconds())
		if !w.first.IsZero() {
			m.ttfb.WithLabelValues(req.model).Observe(w.first.Sub(start).Seconds())
		}
	}
	if ce := g.log.Check(zap.DebugLevel, "request"); ce != nil {
		fields := []zap.Field{
			zap.String("method", r.Method), zap.String("path", r.URL.Path), zap.Int("status", status),
			zap.String("model", req.model), zap.Duration("duration", end.Sub(start)),
			zap.Int64("bytes", w.bytes), zap.String("remote", r.RemoteAddr),
		}
		if req.key != "" {
			fields = append(fields, zap.String("key", req.key))
		}
		if req.waited {
			fields = append(fields, zap.Duration("queued", req.wait))
		}
		if req.err != nil && req.err.status != statusClientGone {
			fields = append(fields, zap.String("error", req.err.msg))
		}
		ce.Write(fields...)
	}
}

// recorder notes the status, the first byte's time and the size of an
// answer. Flush and Unwrap keep streaming working through it.
type recorder struct {
	http.ResponseWriter
	now    func() time.Time
	status int
	first  time.Time
	bytes  int64
}

func (w *recorder) WriteHeader(code int) {
	if w.status == 0 || w.status == statusClientGone {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *recorder) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	if w.first.IsZero() && len(p) > 0 {
		w.first = w.now()
	}
	n, err := w.ResponseWriter.Write(p)
	w.bytes += int64(n)
	return n, err
}

func (w *recorder) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// FlushError is Flush that says whether the client took the bytes (a
// write past send_timeout fails here as often as in Write).
func (w *recorder) FlushError() error { return http.NewResponseController(w.ResponseWriter).Flush() }

func (w *recorder) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *recorder) code() int {
	if w.status == 0 {
		return http.StatusOK
	}
	return w.status
}

// modelObject is one entry of GET /v1/models: OpenAI's fields, and what an
// operator would ask next in "citadel".
type modelObject struct {
	ID      string      `json:"id"`
	Object  string      `json:"object"`
	Created int64       `json:"created"`
	OwnedBy string      `json:"owned_by"`
	Citadel citadelInfo `json:"citadel"`
}

type citadelInfo struct {
	Name           string `json:"name"`
	State          string `json:"state"`
	Reason         string `json:"reason"`
	MaxConcurrency int    `json:"max_concurrency"`
	InFlight       int    `json:"in_flight"`
	Queued         int    `json:"queued"`
	// Fleet is what a fleet router needs: "awake" (ready), "sleeping",
	// "startable" (an on-demand model a request starts) or "unavailable".
	Fleet    string `json:"fleet"`
	Servable bool   `json:"servable"`
}

// fleetState is a model's state as a fleet router sees it.
func fleetState(m Model) string {
	switch {
	case m.State == "ready":
		return "awake"
	case m.State == "sleeping" || m.State == "waking":
		return "sleeping"
	case m.OnDemand && !m.Held && m.State == "stopped":
		return "startable"
	}
	return "unavailable"
}

func (g *Gateway) object(rt *route) modelObject {
	inFlight, queued := rt.up.adm.load()
	return modelObject{
		ID: rt.model.ServedName, Object: "model", Created: g.now().Unix(), OwnedBy: "citadel",
		Citadel: citadelInfo{
			Name: rt.model.Name, State: rt.model.State, Reason: rt.model.Reason,
			MaxConcurrency: rt.model.MaxConcurrency, InFlight: inFlight, Queued: queued,
			Fleet: fleetState(rt.model), Servable: fleetState(rt.model) != "unavailable",
		},
	}
}

// listModels lists every enabled model whatever its state (SPEC §8).
func (g *Gateway) listModels(w http.ResponseWriter) {
	out := struct {
		Object string        `json:"object"`
		Data   []modelObject `json:"data"`
	}{Object: "list", Data: []modelObject{}}
	for _, rt := range g.table.Load().list {
		if rt.model.Enabled {
			out.Data = append(out.Data, g.object(rt))
		}
	}
	writeJSON(w, out)
}

func (g *Gateway) getModel(w http.ResponseWriter, req *reqInfo, id string) {
	rt := g.table.Load().byName[id]
	if rt == nil || !rt.model.Enabled {
		req.reject(w, errUnknownModel(id))
		return
	}
	req.model = rt.model.Name
	obj := g.object(rt)
	if !obj.Citadel.Servable {
		// A load balancer's health check polls this: 503 takes the host
		// out of the model's rotation (docs/scaling.md).
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusServiceUnavailable)
		json.NewEncoder(w).Encode(obj) //nolint:errcheck // the client went away
		return
	}
	writeJSON(w, obj)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v) //nolint:errcheck // the client went away
}

func jsonString(s string) []byte {
	b, _ := json.Marshal(s) // a string always marshals
	return b
}
