package gateway

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestMetricsFollowRequests(t *testing.T) {
	up := startFake(t, "alpha")
	stub := newStub(ready("alpha", "alpha", up.base))
	s := startGateway(t, stub, defaultSettings(), nil)
	alpha := map[string]string{"model": "alpha"}
	if _, ok := s.metric(t, "citadel_model_last_request_timestamp_seconds", alpha); ok {
		t.Error("last_request_timestamp before any request")
	}
	if v, ok := s.metric(t, "citadel_gateway_in_flight", alpha); !ok || v != 0 {
		t.Errorf("in_flight before requests: %v %v", v, ok)
	}
	before := float64(time.Now().Unix())
	for range 3 {
		readAll(t, post(t, context.Background(), s.url+"/v1/chat/completions", `{"model":"alpha","stream":true,"max_tokens":4}`, ""))
	}
	readAll(t, post(t, context.Background(), s.url+"/v1/chat/completions", `{"model":"nobody"}`, ""))
	readAll(t, post(t, context.Background(), s.url+"/v1/chat/completions", `{"no":"model"}`, ""))

	for _, c := range []struct {
		name   string
		labels map[string]string
		want   float64
	}{
		{"citadel_gateway_requests_total", map[string]string{"model": "alpha", "code": "200"}, 3},
		{"citadel_gateway_requests_total", map[string]string{"model": "", "code": "404"}, 1},
		{"citadel_gateway_requests_total", map[string]string{"model": "", "code": "400"}, 1},
		{"citadel_gateway_request_duration_seconds", alpha, 3},
		{"citadel_gateway_time_to_first_byte_seconds", alpha, 3},
		{"citadel_gateway_rejected_total", map[string]string{"model": "", "reason": "unknown_model"}, 1},
		{"citadel_gateway_rejected_total", map[string]string{"model": "", "reason": "bad_request"}, 1},
		{"citadel_gateway_in_flight", alpha, 0},
		{"citadel_gateway_queue_depth", alpha, 0},
	} {
		if got := s.value(t, c.name, c.labels); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if ts := s.value(t, "citadel_model_last_request_timestamp_seconds", alpha); ts < before {
		t.Errorf("last_request_timestamp %v, before the requests %v", ts, before)
	}
	problems, err := testutil.GatherAndLint(s.reg)
	if err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}

	// A model removed by reload leaves no series behind.
	stub.mu.Lock()
	stub.models = nil
	close(stub.changed)
	stub.changed = make(chan struct{})
	stub.mu.Unlock()
	waitFor(t, 5*time.Second, "alpha's series gone", func() bool {
		fams, _ := s.reg.Gather()
		for _, f := range fams {
			for _, m := range f.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "model" && l.GetValue() == "alpha" {
						return false
					}
				}
			}
		}
		return true
	})
	if r := post(t, context.Background(), s.url+"/v1/chat/completions", `{"model":"alpha"}`, ""); r.StatusCode != 404 {
		t.Errorf("removed model: %d", r.StatusCode)
	} else if b := readAll(t, r); !strings.Contains(b, "model_not_found") {
		t.Errorf("removed model: %s", b)
	}

	// Added back, it counts from nothing again, in series of its own: the
	// children the gateway kept for it went with its removal.
	stub.mu.Lock()
	stub.models = []Model{ready("alpha", "alpha", up.base)}
	close(stub.changed)
	stub.changed = make(chan struct{})
	stub.mu.Unlock()
	waitFor(t, 5*time.Second, "alpha routed again", func() bool {
		_, ok := s.metric(t, "citadel_gateway_in_flight", alpha)
		return ok
	})
	readAll(t, post(t, context.Background(), s.url+"/v1/chat/completions", `{"model":"alpha","max_tokens":4}`, ""))
	if got := s.value(t, "citadel_gateway_requests_total", map[string]string{"model": "alpha", "code": "200"}); got != 1 {
		t.Errorf("requests_total of alpha added back = %v, want 1", got)
	}
	if got := s.value(t, "citadel_gateway_request_duration_seconds", alpha); got != 1 {
		t.Errorf("request_duration_seconds of alpha added back = %v observations, want 1", got)
	}
}
