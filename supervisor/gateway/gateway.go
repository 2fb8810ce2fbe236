// Package gateway serves one OpenAI-compatible endpoint for every model the
// supervisor runs (docs/gateway.md): requests are routed by the JSON body's
// "model", held in a per-model queue while the model is busy or not ready,
// and forwarded to the model's own server with streams passed through event
// by event. It knows the supervisor only through the Models interface.
package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"citadel-supervisor/supervisor/netguard"
)

// Models is what the gateway needs of the supervisor.
type Models interface {
	// Models returns a snapshot of every configured model.
	Models() []Model
	// Changed returns a channel closed at the next change of any model's
	// state or of the configuration. Take it before reading Models, so no
	// change falls between the two.
	Changed() <-chan struct{}
	// Demand says a request names the model: it records the request, and
	// starts or wakes an on-demand model that is not awake. It never
	// blocks; the request then waits in the model's queue like any other.
	Demand(name string)
	// Unwanted says no request waits for the model any more: every one
	// that was queued for its start or wake left (their clients hung up,
	// or max_wait passed). A start or wake that has not begun yet is
	// abandoned, so it does not put other models to sleep for nobody. It
	// never blocks; a later Demand starts or wakes the model again.
	Unwanted(name string)
}

// Model is one configured model as the gateway sees it.
type Model struct {
	Name       string // the configuration's key
	ServedName string // vLLM's --served-model-name; clients may use either
	State      string // its lifecycle state (api.State)
	Reason     string // what `citadelctl status` shows
	Upstream   string // the model's base URL, e.g. http://127.0.0.1:11400
	Enabled    bool
	// MaxConcurrency caps requests in flight; 0 = no cap.
	MaxConcurrency int
	// OnDemand: stopped means "until a request comes" unless Held.
	OnDemand bool
	Held     bool
	// Seq orders the model's published states: a state older than a
	// drain's (see Drain) never reopens the model's queue.
	Seq uint64
	// Loading describes its start or wake, for Retry-After and for the
	// comments a held stream receives (eta.go).
	Loading Loading
	// Root and MaxModelLen are what vLLM's own /v1/models says of the
	// model: its --model path, and max_model_len (0: vLLM's choice).
	Root        string
	MaxModelLen int
	// VLLMVersion is the model's vLLM release, "" while unknown.
	VLLMVersion string
	// APIKey is the key the model's vLLM wants (VLLM_API_KEY or
	// --api-key), "" when none: the gateway sets it on every request it
	// forwards. Never logged nor shown.
	APIKey string
}

// Settings are the gateway's limits and keys; Apply replaces them whole on
// reload.
type Settings struct {
	MaxQueue int
	MaxWait  time.Duration
	MaxBody  int64
	// Keys, when not nil, are required: 401 without one of their tokens.
	Keys *Keys
	// Policies are the keys' scopes and limits by NAME (gateway.keys); a
	// key without one may use every model without limit.
	Policies map[string]Policy
	// The bounds of timeouts.go and bodies.go; zero values take the
	// configuration's defaults.
	BodyTimeout time.Duration
	MinBodyRate int64 // bytes per second
	SendTimeout time.Duration
	BodyMemory  int64
	BodySpool   int64
}

// Options are the gateway's collaborators. Models and Logger are required.
type Options struct {
	Models   Models
	Logger   *zap.Logger
	Settings Settings
	// Registerer receives the citadel_gateway_* metrics; nil registers none.
	Registerer prometheus.Registerer
	// Now and Timer are the clock; nil means the real one.
	Now   func() time.Time
	Timer Timer
	// Listener, when set, is served instead of binding the address:
	// inherited from the previous image at an upgrade.
	Listener net.Listener
	// HoldEvery is how often a held stream gets a comment line (held.go);
	// 0 means every 4 s, the first after a second.
	HoldEvery time.Duration
	// MaxConnections caps client connections; 0 derives it from the
	// descriptor limit (netguard.GatewayLimit).
	MaxConnections int
	// MaxConnectionsPerAddress caps one client address's connections; 0 =
	// none.
	MaxConnectionsPerAddress int
	// SpoolDir holds the temporary files of bodies over the memory budget;
	// "" = os.TempDir().
	SpoolDir string
}

// Server timeouts. No write or read timeout: a generation streams for
// minutes and a vision request uploads megabytes; idle and header
// timeouts bound what a silent client can hold.
const (
	readHeaderTimeout = 10 * time.Second
	idleTimeout       = 2 * time.Minute
	shutdownGrace     = 5 * time.Second
)

// Gateway is the endpoint. Build it with Listen, then Run it.
type Gateway struct {
	models   Models
	log      *zap.Logger
	now      func() time.Time
	timer    Timer
	metrics  *metrics
	settings atomic.Pointer[Settings]
	table    atomic.Pointer[table]
	ups      map[string]*upstream // by model name; owned by the watch loop
	// keys are the API keys' states by NAME ("" for requests without a
	// key), rebuilt by Apply around states that last (limits.go).
	keys    atomic.Pointer[map[string]*keyState]
	keysMu  sync.Mutex // serialises Apply
	usage   usageTable
	ids     requestIDs
	started time.Time // for `citadelctl usage`: counted since then
	// holdFirst and holdEvery time a held stream's comments (held.go).
	holdFirst, holdEvery time.Duration
	bodies               *bodyBudget
	guard                *guardMetrics
	cut                  *cutter

	ln      *netguard.Listener
	srv     *http.Server
	serving atomic.Bool
}

// Listen binds addr (so a port in use fails the daemon's start, not a
// later request) and builds the gateway.
func Listen(addr string, o Options) (*Gateway, error) {
	if o.Models == nil || o.Logger == nil {
		return nil, errors.New("gateway: Models and Logger are required")
	}
	g := &Gateway{models: o.Models, log: o.Logger, now: o.Now, timer: o.Timer, metrics: newMetrics(), ups: map[string]*upstream{},
		bodies: &bodyBudget{dir: o.SpoolDir}, guard: newGuardMetrics(), cut: newCutter()}
	if g.now == nil {
		g.now = time.Now
	}
	if g.timer == nil {
		g.timer = realTimer
	}
	g.ids.prefix = newIDPrefix()
	g.started = g.now()
	g.holdFirst, g.holdEvery = holdFirst, holdEvery
	if o.HoldEvery > 0 {
		g.holdFirst, g.holdEvery = min(holdFirst, o.HoldEvery), o.HoldEvery
	}
	g.Apply(o.Settings)
	g.table.Store(&table{byName: map[string]*route{}})
	g.update(o.Models.Models())
	if o.Registerer != nil {
		for _, c := range append(g.metrics.collectors(), collector{g}, g.guard.stalls, guardCollector{g}) {
			if err := o.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("gateway: register metrics: %w", err)
			}
		}
	}
	ln := o.Listener
	if ln == nil {
		var err error
		if ln, err = net.Listen("tcp", addr); err != nil {
			return nil, fmt.Errorf("gateway: listen %s: %w", addr, err)
		}
	}
	// Capped so the daemon keeps the descriptors it needs for probes,
	// spawns, the metrics port and the control socket (more clients wait
	// in the kernel's backlog, holding none of the daemon's descriptors);
	// out of descriptors all the same, it refuses a client rather than
	// spinning; an upgrade pauses it.
	limit := o.MaxConnections
	if limit <= 0 {
		limit = netguard.GatewayLimit(netguard.Descriptors(), len(o.Models.Models()))
	}
	g.ln = netguard.Limit(ln, limit, o.Logger)
	if o.MaxConnectionsPerAddress > 0 {
		g.ln.LimitPerAddress(o.MaxConnectionsPerAddress, refuseAddress)
	}
	g.srv = &http.Server{
		Handler:           g,
		ReadHeaderTimeout: readHeaderTimeout,
		IdleTimeout:       idleTimeout,
		ErrorLog:          zap.NewStdLog(o.Logger),
	}
	return g, nil
}

// Started is when the gateway began counting its usage.
func (g *Gateway) Started() time.Time { return g.started }

// Addr is the bound address (useful with port 0).
func (g *Gateway) Addr() string { return g.ln.Addr().String() }

// Guard is the listener: an upgrade pauses it and hands its socket to the
// next image.
func (g *Gateway) Guard() *netguard.Listener { return g.ln }

// HTTP is the server, whose keep-alives an upgrade turns off.
func (g *Gateway) HTTP() *http.Server { return g.srv }

// Apply replaces the limits, keys and policies (on reload). Requests
// already waiting keep the limits they started with; a key's buckets and
// requests in flight carry over to its new policy; the body budget applies
// to every body from now on.
func (g *Gateway) Apply(s Settings) {
	s.fill()
	g.bodies.setLimits(s.BodyMemory, s.BodySpool)
	g.keysMu.Lock()
	defer g.keysMu.Unlock()
	old := map[string]*keyState{}
	if p := g.keys.Load(); p != nil {
		old = *p
	}
	names := map[string]bool{"": true}
	if s.Keys != nil {
		for _, n := range s.Keys.Names() {
			names[n] = true
		}
	}
	for n := range s.Policies {
		if !names[n] {
			g.log.Warn("gateway.keys names a key that api_keys_file does not have: its policy applies to no request", zap.String("key", n))
		}
	}
	now := g.now()
	keys := make(map[string]*keyState, len(names))
	for n := range names {
		ks := old[n]
		if ks == nil {
			ks = &keyState{name: n, poke: g.redispatch}
		}
		ks.pol.Store(newPolicy(s.Policies[n], ks.pol.Load(), now))
		keys[n] = ks
	}
	g.keys.Store(&keys)
	g.settings.Store(&s)
}

// key is the state of the key NAME ("" for requests without a key).
func (g *Gateway) key(name string) *keyState {
	if ks := (*g.keys.Load())[name]; ks != nil {
		return ks
	}
	// Not in the map only between a keys file read and its Apply: the
	// key is unlimited until then.
	ks := &keyState{name: name, poke: g.redispatch}
	ks.pol.Store(newPolicy(Policy{}, nil, g.now()))
	return ks
}

// redispatch asks every model's queue to look again: a key at its
// max_concurrency has a free slot.
func (g *Gateway) redispatch() {
	for _, rt := range g.table.Load().list {
		rt.up.adm.redispatch()
	}
}

// fill gives the bounds left at zero the configuration's defaults.
func (s *Settings) fill() {
	if s.BodyTimeout <= 0 {
		s.BodyTimeout = 10 * time.Second
	}
	if s.SendTimeout <= 0 {
		s.SendTimeout = time.Minute
	}
	if s.BodyMemory <= 0 {
		s.BodyMemory = 64 << 20
	}
	if s.MinBodyRate < 0 {
		s.MinBodyRate = 0
	}
	if s.BodySpool < 0 {
		s.BodySpool = 0
	}
}

// Serving returns nil while the listener is serving; /readyz asks it.
func (g *Gateway) Serving() error {
	if !g.serving.Load() {
		return errors.New("gateway not serving on " + g.Addr())
	}
	return nil
}

// Run serves and follows the models' states until ctx ends, then stops
// accepting, gives requests in flight a short grace, and returns once its
// goroutines are done.
func (g *Gateway) Run(ctx context.Context) error {
	watchCtx, stopWatch := context.WithCancel(ctx)
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		g.watch(watchCtx)
	}()
	defer func() {
		stopWatch()
		<-watchDone // the watch loop owns g.ups until it returns
		for _, up := range g.ups {
			up.close()
		}
	}()

	errc := make(chan error, 1)
	g.serving.Store(true)
	go func() { errc <- g.srv.Serve(g.ln) }()
	select {
	case err := <-errc:
		g.serving.Store(false)
		return fmt.Errorf("gateway: %w", err)
	case <-ctx.Done():
	}
	g.serving.Store(false)
	sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	if err := g.srv.Shutdown(sctx); err != nil {
		// Streams still running after the grace: cut them.
		g.srv.Close() //nolint:errcheck // closing anyway
	}
	<-errc
	return nil
}

// watch applies every change of the models' states to the routing table
// and the queues.
func (g *Gateway) watch(ctx context.Context) {
	for {
		changed := g.models.Changed()
		g.update(g.models.Models())
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}

// table is an immutable routing snapshot; each update replaces it whole.
type table struct {
	byName map[string]*route // configured and served names
	list   []*route          // sorted by name
}

// route is one model in one snapshot.
type route struct {
	model Model
	up    *upstream // the model's lasting part: queue, transport, clock
}

// update builds the routing table from models. Only the watch loop (and
// Listen, before it runs) calls it.
func (g *Gateway) update(models []Model) {
	t := &table{byName: make(map[string]*route, 2*len(models))}
	seen := map[string]bool{}
	for _, m := range models {
		up := g.ups[m.Name]
		if up == nil || up.base != m.Upstream {
			if up != nil {
				up.close()
			}
			up = g.newUpstream(m, up)
			g.ups[m.Name] = up
		}
		key := m.APIKey
		up.key.Store(&key)
		gt, reason := gateOf(m)
		up.adm.setLoading(m.Loading)
		up.adm.setState(gt, reason, m.MaxConcurrency, m.Seq)
		rt := &route{model: m, up: up}
		t.list = append(t.list, rt)
		t.byName[m.Name] = rt
		if _, taken := t.byName[m.ServedName]; !taken && m.ServedName != "" {
			t.byName[m.ServedName] = rt
		}
		seen[m.Name] = true
	}
	sort.Slice(t.list, func(i, j int) bool { return t.list[i].model.Name < t.list[j].model.Name })
	for name, up := range g.ups {
		if !seen[name] {
			up.adm.setState(gateClosed, fmt.Sprintf("model %s was removed from the configuration", name), 0, removedSeq)
			up.close()
			delete(g.ups, name)
			g.metrics.forget(name)
		}
	}
	g.table.Store(t)
}

// gateOf maps a model's state to what it means for requests. States the
// gateway does not know (those of on-demand models to come) hold requests:
// waiting is the safe answer for a model that may become ready.
func gateOf(m Model) (gate, string) {
	if !m.Enabled {
		return gateClosed, fmt.Sprintf("model %s is disabled (enabled: false)", m.Name)
	}
	why := m.Reason
	if why != "" {
		why = ": " + why
	}
	switch m.State {
	case "ready":
		return gateOpen, ""
	case "stopped":
		if m.OnDemand && !m.Held {
			// Started by the request that finds it so: the request waits.
			return gateHold, fmt.Sprintf("model %s is starting on demand", m.Name)
		}
		return gateClosed, fmt.Sprintf("model %s is %s%s", m.Name, m.State, why)
	case "failed":
		return gateClosed, fmt.Sprintf("model %s is %s%s", m.Name, m.State, why)
	default:
		return gateHold, fmt.Sprintf("model %s is %s%s", m.Name, m.State, why)
	}
}
