package supervisor

import (
	"testing"
	"time"
)

func TestServingLine(t *testing.T) {
	cases := []struct {
		line string
		want bool
	}{
		// vLLM's own lines, as its releases print them.
		{"INFO 03-27 23:19:15 api_server.py:958] Starting vLLM API server on http://0.0.0.0:8000", true},
		{"(APIServer pid=460954) INFO 12-18 06:01:05 [api_server.py:1945] Starting vLLM API server 0 on http://0.0.0.0:8080", true},
		{"(APIServer pid=7) INFO 01-02 03:04:05 [api_server.py:611] Starting vLLM server on http://127.0.0.1:11400", true},
		// uvicorn's.
		{"INFO:     Application startup complete.", true},
		{"INFO:     Uvicorn running on http://0.0.0.0:8000 (Press CTRL+C to quit)", true},
		// Not yet.
		{"INFO:     Waiting for application startup.", false},
		{"INFO 03-27 23:19:10 api_server.py:912] vLLM API server version 0.8.2", false},
		{"INFO 03-27 23:19:14 launcher.py:26] Available routes are:", false},
		{"", false},
	}
	for _, c := range cases {
		if got := servingLine(c.line); got != c.want {
			t.Errorf("servingLine(%q) = %v, want %v", c.line, got, c.want)
		}
	}
}

// TestServingLineProbesAtOnce: a starting model is ready as soon as it
// prints vLLM's serving lines, with no startup poll at all: timers of a
// second or more never fire here (the startup poll is one), shorter ones
// (the fast polls after the line) do.
func TestServingLineProbesAtOnce(t *testing.T) {
	h := newHarness(t, modelSpec{
		Name: "m", YAML: "probe: {period: 1h, timeout: 1s, failure_threshold: 3, startup_timeout: 30s}",
		Fake: []string{"--fake-load-time", "200ms"},
	})
	h.start(Options{After: func(d time.Duration) <-chan time.Time {
		if d >= time.Second {
			return nil
		}
		return time.After(d)
	}})
	h.waitState("m", Ready, 20*time.Second)
}
