package api

import (
	"encoding/json"
	"testing"
	"time"
)

func TestSummary(t *testing.T) {
	st := []Status{{State: Ready}, {State: Ready}, {State: Pending}, {State: Failed}, {State: Pending}, {State: Ready}, {State: Ready}, {State: Ready}}
	if got, want := Summary(st), "5/8 ready, 2 pending, 1 failed"; got != want {
		t.Errorf("Summary = %q, want %q", got, want)
	}
	if got := Summary(nil); got != "0/0 ready" {
		t.Errorf("Summary(nil) = %q", got)
	}
}

func TestHealthOf(t *testing.T) {
	h := HealthOf([]Status{{Name: "a", State: Ready, Enabled: true}, {Name: "b", State: Pending, Enabled: true}, {Name: "c", State: Stopped}})
	if h.Healthy || h.Ready != 1 || h.Enabled != 2 || len(h.NotReady) != 1 || h.NotReady[0].Name != "b" {
		t.Errorf("got %+v", h)
	}
	if h := HealthOf(nil); !h.Healthy || h.NotReady == nil {
		t.Errorf("no models: got %+v; want healthy and an empty (not null) not_ready", h)
	}
}

// TestStatusJSON pins the keys of `citadelctl status -o json` (docs/cli.md).
func TestStatusJSON(t *testing.T) {
	code := 1
	b, err := json.Marshal(Status{Name: "a", State: Failed, Reason: "r", PID: 0, Port: 11400, GPUs: []string{"GPU-a"},
		Restarts: 2, LastExitCode: &code, Since: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)})
	if err != nil {
		t.Fatal(err)
	}
	want := `{"name":"a","state":"failed","reason":"r","pid":0,"port":11400,"gpus":["GPU-a"],"restarts":2,"last_exit_code":1,"since":"2026-01-01T00:00:00Z","enabled":false}`
	if string(b) != want {
		t.Errorf("got  %s\nwant %s", b, want)
	}
}

func TestOps(t *testing.T) {
	for _, o := range Ops {
		if !o.Valid() {
			t.Errorf("%s not valid", o)
		}
	}
	for _, o := range []Op{"", "update", "START", "all"} {
		if o.Valid() {
			t.Errorf("%q valid", o)
		}
	}
}
