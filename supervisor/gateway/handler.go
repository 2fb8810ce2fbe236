package gateway

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path"
	"strings"
	"time"

	"go.uber.org/zap"
)

// devEndpoints are vLLM's development and administration endpoints
// (docs/gateway.md, "Never forwarded"): they put a model to sleep, run code in its workers or drop its
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
	// The request's own state, in one allocation.
	x := &exchange{rec: recorder{ResponseWriter: w, now: g.now}}
	rec, req := &x.rec, &x.req
	set := g.settings.Load()
	req.id = g.ids.requestID(r.Header.Get("X-Request-Id"))
	// On every answer, and to the model (requestid.go). The two headers
	// share the one value: neither is changed in place.
	x.id[0] = req.id
	w.Header()["X-Request-Id"] = x.id[:]
	r.Header["X-Request-Id"] = x.id[:]
	defer g.finish(rec, r, req, start)
	// Every answer must be taken within send_timeout (timeouts.go).
	newSendBound(rec, set.SendTimeout).next()

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
	req.keyState = g.key(req.key)
	// Its x-ratelimit-* headers as of now go on every answer, written
	// with its head (admit writes its own, newer, on an admitted one).
	rec.rate, rec.rateAt = req.keyState, start
	switch {
	case p == "/v1/models":
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			req.reject(rec, errMethod("GET"))
			return
		}
		g.listModels(rec, req.keyState)
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
	for p != "" {
		seg, rest, _ := strings.Cut(p, "/")
		if devEndpoints[seg] {
			return true
		}
		p = rest
	}
	return false
}

// exchange is what the gateway keeps of one request while it serves it.
type exchange struct {
	rec recorder
	req reqInfo
	id  [1]string // X-Request-Id's value, on the answer and to the model
}

func errMethod(allow string) *apiError {
	return errBadRequest(http.StatusMethodNotAllowed, "method_not_allowed", "use "+allow+" for this path")
}

// reqInfo is what the access log and the metrics learn about a request.
type reqInfo struct {
	id       string // X-Request-Id
	model    string // configured name, once routed
	key      string // the API key's NAME
	keyState *keyState
	waited   bool
	wait     time.Duration
	err      *apiError // the gateway's own answer, if any
	// asked: the gateway asked the model for the stream's usage, so the
	// usage chunk is not the client's (usage.go); for a large body, the
	// appender says so once the body is sent (usagestream.go).
	asked    bool
	appender *usageAppender
}

func (q *reqInfo) reject(w http.ResponseWriter, e *apiError) {
	q.err = e
	if e.status != statusClientGone {
		writeError(w, e)
	} else if rec, ok := w.(*recorder); ok {
		rec.status = statusClientGone
	}
}

// writeError answers e: as a JSON error, or as a stream's error event once
// held comments committed the answer to a stream (held.go).
func writeError(w http.ResponseWriter, e *apiError) {
	if rec, ok := w.(*recorder); ok && rec.held {
		rec.event(e.body())
		rec.status = e.status // what the metrics and the log record
		return
	}
	e.write(w)
}

// forward routes a POST by its body's model and proxies it. The body is
// received whole first (bodies.go): only then does the request name a
// model to the queue, hold a slot or count toward a drain.
func (g *Gateway) forward(w *recorder, r *http.Request, req *reqInfo, set *Settings, start time.Time) {
	p := r.URL.Path
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
	if !req.keyState.allows(rt.model) {
		req.reject(w, errScope(req.key, rt.model))
		return
	}
	w.rate = nil
	if e := req.keyState.admit(g.now(), w.Header()); e != nil {
		g.metrics.limited.WithLabelValues(req.key, e.typ).Inc()
		req.reject(w, e)
		return
	}
	up.lastRequest.Store(start.UnixNano())
	// An on-demand model that sleeps or is stopped is woken or started by
	// this; the request waits in the queue whatever it waits for.
	g.models.Demand(rt.model.Name)

	// A streamed chat or completion is counted from its usage chunk: a
	// stream that does not ask for it is asked upstream (usage.go), a
	// small body edited in memory now, a larger one (a mapping, a file)
	// as it is sent (usagestream.go); its client is told why it waits
	// (held.go). An answer that is not a stream carries its usage.
	stream := b.scan.stream && (p == "/v1/chat/completions" || p == "/v1/completions")
	small, inMemory := b.heapBytes(rt.model.ServedName)
	var hold *holder
	if stream {
		if inMemory {
			small, req.asked, _ = askUsage(small)
		}
		hold = g.newHolder(w, rt.model.Name)
	}

	// From here an upgrade past its drain bound may end the request (cut.go).
	ctx, cut := g.cut.cuttable(r.Context())
	defer cut.release()
	r = r.WithContext(ctx)

	waitStart := g.now()
	waited, aerr := up.adm.acquire(r.Context(), req.keyState, set.MaxQueue, set.MaxWait, g.timer, hold)
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
	defer up.adm.release(req.keyState)

	var out outBody
	if inMemory {
		// A small body goes out with its head in one write.
		out.small = small
	} else {
		// vLLM knows only its --served-model-name: a client that used the
		// configured name has it replaced, the one change the gateway
		// makes to a body besides asking for usage. Opened again if the
		// request is sent again (hop.go).
		out.open = func() (io.ReadCloser, int64) {
			rd, n := b.forwardBody(rt.model.ServedName)
			if !stream {
				return rd, n
			}
			req.appender = &usageAppender{r: rd}
			return readCloser{req.appender, rd}, -1
		}
	}
	upstreamAuth(r.Header, up.apiKey())
	up.serve(w, r, g, req, out)
}

// upstreamAuth makes a request's credentials the model's own: the client's
// Authorization (checked against api_keys_file, or none) never reaches the
// model, and a model whose vLLM wants a key (VLLM_API_KEY, --api-key) gets
// it, so a client never needs to know it.
func upstreamAuth(h http.Header, key string) {
	h.Del("Authorization")
	if key != "" {
		h.Set("Authorization", "Bearer "+key)
	}
}

type readCloser struct {
	io.Reader
	io.Closer
}

// finish records a request's metrics and, at debug level only, its access
// log line: a busy gateway must not flood the journal. The API key's NAME
// is logged, never its token, and never a header or a body.
func (g *Gateway) finish(w *recorder, r *http.Request, req *reqInfo, start time.Time) {
	end := g.now()
	status := w.code()
	m := g.metrics
	var s *series
	if req.model != "" {
		var routed bool
		if s, routed = g.seriesOf(req.model); !routed {
			// Removed by a reload while this request ran: its series are
			// gone and must not come back.
			req.model = ""
		}
	}
	s.counter(m, req.model, famRequests, status, req.key).Inc()
	if req.model != "" {
		g.usage.row(req.model, req.key).requests.Add(1)
	}
	if req.err != nil && req.err.reject != "" {
		m.rejected.WithLabelValues(req.model, req.err.reject).Inc()
	}
	if req.waited {
		s.observer(m, req.model, famQueueWait).Observe(req.wait.Seconds())
	}
	if req.model != "" {
		s.observer(m, req.model, famDuration).Observe(end.Sub(start).Seconds())
		if !w.first.IsZero() {
			s.observer(m, req.model, famTTFB).Observe(w.first.Sub(start).Seconds())
		}
	}
	if ce := g.log.Check(zap.DebugLevel, "request"); ce != nil {
		fields := []zap.Field{
			zap.String("method", r.Method), zap.String("path", r.URL.Path), zap.Int("status", status),
			zap.String("model", req.model), zap.Duration("duration", end.Sub(start)),
			zap.Int64("bytes", w.bytes), zap.String("remote", r.RemoteAddr), zap.String("request_id", req.id),
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
	rc     http.ResponseController // of the ResponseWriter: deadlines, flushes
	now    func() time.Time
	status int
	first  time.Time
	bytes  int64
	// held: comments committed the answer to 200 text/event-stream while
	// the request waited (held.go); what follows is written as events.
	held bool
	// rate: the key whose x-ratelimit-* headers (as of rateAt) are still
	// to be written, before the answer's head.
	rate   *keyState
	rateAt time.Time
}

// head writes what goes in every answer's head, once, before it is sent.
func (w *recorder) head() {
	if k := w.rate; k != nil {
		w.rate = nil
		k.headers(w.rateAt, w.ResponseWriter.Header())
	}
}

// comment writes an SSE comment line of a held stream. It is not the
// answer's first byte: time_to_first_byte waits for the first event.
func (w *recorder) comment(line string) {
	w.head()
	n, _ := io.WriteString(w.ResponseWriter, line+"\n\n") //nolint:errcheck // a client gone ends the wait through its context
	w.bytes += int64(n)
	w.Flush()
}

// event ends a held stream with an error event and [DONE], the way vLLM
// ends a stream that fails.
func (w *recorder) event(errBody []byte) {
	w.Write([]byte("data: "))               //nolint:errcheck // the client went away
	w.Write(bytes.TrimSpace(errBody))       //nolint:errcheck // the client went away
	w.Write([]byte("\n\ndata: [DONE]\n\n")) //nolint:errcheck // the client went away
	w.Flush()
}

func (w *recorder) WriteHeader(code int) {
	w.head()
	if w.status == 0 || w.status == statusClientGone {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *recorder) Write(p []byte) (int, error) {
	w.head()
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
	w.head()
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

// FlushError is Flush that says whether the client took the bytes (a
// write past send_timeout fails here as often as in Write).
func (w *recorder) FlushError() error {
	w.head()
	return w.controller().Flush()
}

// controller is the ResponseWriter's controller.
func (w *recorder) controller() *http.ResponseController {
	if w.rc == (http.ResponseController{}) {
		w.rc = *http.NewResponseController(w.ResponseWriter)
	}
	return &w.rc
}

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
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
	// vLLM's own: the --model path, and max_model_len when configured
	// (0 leaves it to vLLM, which the gateway does not ask).
	Root        string      `json:"root,omitempty"`
	MaxModelLen int         `json:"max_model_len,omitempty"`
	Citadel     citadelInfo `json:"citadel"`
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
	// VLLMVersion is the model's vLLM release ("" while unknown).
	VLLMVersion string `json:"vllm_version,omitempty"`
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
		Root: rt.model.Root, MaxModelLen: rt.model.MaxModelLen,
		Citadel: citadelInfo{
			VLLMVersion: rt.model.VLLMVersion,
			Name:        rt.model.Name, State: rt.model.State, Reason: rt.model.Reason,
			MaxConcurrency: rt.model.MaxConcurrency, InFlight: inFlight, Queued: queued,
			Fleet: fleetState(rt.model), Servable: fleetState(rt.model) != "unavailable",
		},
	}
}

// listModels lists every enabled model whatever its state (docs/gateway.md), of
// those the key may use.
func (g *Gateway) listModels(w http.ResponseWriter, k *keyState) {
	out := struct {
		Object string        `json:"object"`
		Data   []modelObject `json:"data"`
	}{Object: "list", Data: []modelObject{}}
	for _, rt := range g.table.Load().list {
		if rt.model.Enabled && k.allows(rt.model) {
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
	if !req.keyState.allows(rt.model) {
		req.reject(w, errScope(req.key, rt.model))
		return
	}
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
