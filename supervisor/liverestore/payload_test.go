package liverestore

import (
	"bytes"
	"encoding/json"
	"testing"
)

// wire is a handover as the release before this package wrote it, every
// field set: an image of this build must read it whole (make
// upgrade-compat upgrades from such a build).
const wire = `{"version":1,"from":"v1.4.0","upgrades":2,"listeners":{"control":7,"gateway":5,"http":6},` +
	`"supervisor":{"version":1,"models":[{"name":"a","state":"sleeping","reason":"asleep (level 1, idle)",` +
	`"since":"2026-01-02T03:04:05Z","hold":true,"hold_reason":"held stopped by operator","restarts":{"exit":1},` +
	`"starts":["2026-01-02T03:00:00Z"],"failures":1,"last_exit":{"code":1,"desc":"exit code 1"},` +
	`"last_output":["boom"],"output":["line"],"timer_at":"2026-01-02T03:05:00Z","last_request":"2026-01-02T03:04:00Z",` +
	`"wake_times":{"1":[1500000000]},"instance":{"model":"a","pid":4411,"start":123456,"marker":"id/a/token",` +
	`"cgroup":"/sys/fs/cgroup/x/a@token","started":"2026-01-02T03:00:01Z","gpus":["GPU-0"],"digest":"d1","env_digest":"e1",` +
	`"ready_at":"2026-01-02T03:01:00Z","startup":59000000000,"awake_at":"2026-01-02T03:02:00Z","sleep_level":1,` +
	`"sleep_cause":"idle","sleep_began":"2026-01-02T03:03:00Z","sleep_mode":true,"host_held":1024,` +
	`"known":{"kind":"completion","text":" Paris"},"known_note":"n","held":{"GPU-0":2048},"adopted":true,"vllm_version":"0.10.2",` +
	`"vllm_source":"server","stdout_fd":8,"stderr_fd":9}}]}}`

// TestPayloadWire: the payload's JSON is the wire between two builds;
// every key an earlier build writes is read, and written back the same.
func TestPayloadWire(t *testing.T) {
	dec := json.NewDecoder(bytes.NewReader([]byte(wire)))
	dec.DisallowUnknownFields()
	var p Payload
	if err := dec.Decode(&p); err != nil {
		t.Fatalf("a handover of the earlier build: %v", err)
	}
	is := p.Supervisor.Models[0].Instance
	if p.Upgrades != 2 || p.Listeners["gateway"] != 5 || is.PID != 4411 || is.StdoutFD != 8 || !is.Adopted || *is.SleepMode != true {
		t.Errorf("read %+v, instance %+v", p, is)
	}
	out, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	var a, b any
	if err := json.Unmarshal([]byte(wire), &a); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(out, &b); err != nil {
		t.Fatal(err)
	}
	if x, y := mustJSON(t, a), mustJSON(t, b); x != y {
		t.Errorf("written back differently:\n got %s\nwant %s", y, x)
	}
}

func mustJSON(t *testing.T, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
