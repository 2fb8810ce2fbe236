package gateway

import (
	"net/http"
	"strings"
	"testing"
)

// GET /v1/models/{id} is a load balancer's per-model health check: 200 when
// the model is servable here (awake, sleeping, or startable on demand), 503
// otherwise; the body says which.
func TestModelServabilityCheck(t *testing.T) {
	stub := newStub(
		Model{Name: "alpha", ServedName: "alpha", State: "ready", Upstream: "http://127.0.0.1:1", Enabled: true},
		Model{Name: "od", ServedName: "od", State: "stopped", Upstream: "http://127.0.0.1:1", Enabled: true, OnDemand: true},
		Model{Name: "held", ServedName: "held", State: "stopped", Upstream: "http://127.0.0.1:1", Enabled: true, OnDemand: true, Held: true},
	)
	s := startGateway(t, stub, defaultSettings(), nil)
	check := func(id string, code int, fleet string) {
		t.Helper()
		resp, err := http.Get(s.url + "/v1/models/" + id)
		if err != nil {
			t.Fatal(err)
		}
		body := readAll(t, resp)
		if resp.StatusCode != code || !strings.Contains(body, `"fleet":"`+fleet+`"`) {
			t.Errorf("GET /v1/models/%s: %d %s, want %d and fleet %q", id, resp.StatusCode, body, code, fleet)
		}
	}
	check("alpha", 200, "awake")
	check("od", 200, "startable")
	check("held", 503, "unavailable")
	s.setAndWait(t, stub, "alpha", "sleeping", "")
	check("alpha", 200, "sleeping")
	s.setAndWait(t, stub, "alpha", "failed", "crashed")
	check("alpha", 503, "unavailable")
}
