package web

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/control/api"
)

type stub struct {
	alive bool
	st    []api.Status
	cfg   *config.Config
}

func (s stub) Status(...string) ([]api.Status, error) { return s.st, nil }
func (s stub) Alive(time.Duration) bool               { return s.alive }
func (s stub) Config() *config.Config                 { return s.cfg }

func get(t *testing.T, h http.Handler, method, path, host string) (int, string) {
	t.Helper()
	req := httptest.NewRequest(method, path, nil)
	req.Host = host
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	return w.Code, w.Body.String()
}

func TestEndpoints(t *testing.T) {
	cfg := &config.Config{Models: []config.Model{
		{Name: "lab", Host: "0.0.0.0", Port: 11400, ServedName: "lab", Enabled: true},
		{Name: "local", Host: "127.0.0.1", Port: 11401, ServedName: "local-7b", Enabled: true},
		{Name: "loading", Host: "0.0.0.0", Port: 11402, ServedName: "loading", Enabled: true},
	}}
	st := []api.Status{
		{Name: "lab", State: api.Ready, Enabled: true},
		{Name: "local", State: api.Ready, Enabled: true},
		{Name: "loading", State: api.Starting, Reason: "loading", Enabled: true},
	}
	h := Handler(stub{alive: true, st: st, cfg: cfg}, prometheus.NewRegistry(), zap.NewNop())

	cases := []struct {
		name, method, path, host string
		code                     int
		body                     string
	}{
		{"healthz while the loop turns", "GET", "/healthz", "h", 200, "ok\n"},
		{"readyz lists who is not ready", "GET", "/readyz", "h", 503,
			`{"ready":2,"enabled":3,"not_ready":[{"name":"loading","state":"starting","reason":"loading"}]}` + "\n"},
		{"sd: ready models only; wildcard binds under the host Prometheus used", "GET", "/sd", "gpu-host-1:9400", 200,
			`[{"targets":["gpu-host-1:11400"],"labels":{"citadel_host":"gpu-host-1","fleet_state":"awake","model":"lab","served_name":"lab"}},{"targets":["127.0.0.1:11401"],"labels":{"citadel_host":"gpu-host-1","fleet_state":"awake","model":"local","served_name":"local-7b"}}]` + "\n"},
		{"nothing here changes state", "POST", "/metrics", "h", 405, ""},
		{"metrics served", "GET", "/metrics", "h", 200, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, body := get(t, h, tc.method, tc.path, tc.host)
			if code != tc.code || (tc.body != "" && body != tc.body) {
				t.Errorf("%s %s: %d %q, want %d %q", tc.method, tc.path, code, body, tc.code, tc.body)
			}
		})
	}

	stalled := Handler(stub{alive: false, st: st, cfg: cfg}, prometheus.NewRegistry(), zap.NewNop())
	if code, body := get(t, stalled, "GET", "/healthz", "h"); code != 503 || !strings.Contains(body, "not responding") {
		t.Errorf("healthz with a stalled loop: %d %q", code, body)
	}
	all := []api.Status{{Name: "lab", State: api.Ready, Enabled: true}, {Name: "off", State: api.Stopped, Enabled: false}}
	two := &config.Config{Models: []config.Model{{Name: "lab", Enabled: true}, {Name: "off"}}}
	ready := Handler(stub{alive: true, st: all, cfg: two}, prometheus.NewRegistry(), zap.NewNop())
	if code, _ := get(t, ready, "GET", "/readyz", "h"); code != 200 {
		t.Errorf("readyz with every enabled model ready: %d (a disabled model does not count)", code)
	}
}

func TestReadyzJudgesTheGateway(t *testing.T) {
	cfg := &config.Config{Models: []config.Model{{Name: "lab", Port: 11400, ServedName: "lab", Enabled: true}}}
	st := []api.Status{{Name: "lab", State: api.Ready, Enabled: true}}
	var serving error = errors.New("gateway not serving on 0.0.0.0:8000")
	h := Handler(stub{alive: true, st: st, cfg: cfg}, prometheus.NewRegistry(), zap.NewNop(), Check{Name: "gateway", Err: func() error { return serving }})
	code, body := get(t, h, "GET", "/readyz", "h")
	if want := `{"ready":1,"enabled":1,"not_ready":[],"not_serving":[{"name":"gateway","reason":"gateway not serving on 0.0.0.0:8000"}]}` + "\n"; code != 503 || body != want {
		t.Errorf("readyz with the gateway down: %d %s", code, body)
	}
	serving = nil
	if code, body := get(t, h, "GET", "/readyz", "h"); code != 200 || strings.Contains(body, "not_serving") {
		t.Errorf("readyz with the gateway serving: %d %s", code, body)
	}
}

// TestReadyzBeforeTheModelsAreKnown: a daemon whose supervisor has not yet
// made its models (it is starting) is not ready; it was, 0 of 0.
func TestReadyzBeforeTheModelsAreKnown(t *testing.T) {
	cfg := &config.Config{Models: []config.Model{{Name: "lab", Enabled: true}, {Name: "off"}}}
	h := Handler(stub{alive: true, cfg: cfg}, prometheus.NewRegistry(), zap.NewNop())
	code, body := get(t, h, "GET", "/readyz", "h")
	if want := `{"ready":0,"enabled":1,"not_ready":[{"name":"lab","state":"pending","reason":"the supervisor is starting"}]}` + "\n"; code != 503 || body != want {
		t.Errorf("readyz before any status: %d %s", code, body)
	}
}
