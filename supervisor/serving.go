package supervisor

import (
	"strings"
	"time"

	"citadel-supervisor/gpu"
)

// Readiness without polling delay. A starting model is probed every
// startup poll (at most a second) until it answers; the supervisor's own
// share of a cold start would be half that on average. vLLM says when it
// is about to serve, so the output reader watches for it and the model is
// probed at once, then every fastPoll until it answers (docs/probes.md).

// servingLines are what a starting vLLM prints as it begins to serve, in
// the order it prints them (vllm/entrypoints/openai/api_server.py and
// uvicorn's lifespan):
//
//   - "Starting vLLM API server on http://HOST:PORT": logged just before
//     serve_http hands uvicorn the socket bound at start (the releases
//     before API-server scale-out);
//   - "Starting vLLM API server 0 on http://HOST:PORT": the same with the
//     API server's rank (later releases, "(APIServer pid=N)" in front);
//   - "Starting vLLM server on http://HOST:PORT": the same in vLLM's
//     current main (build_and_serve);
//   - "Application startup complete.": uvicorn, once the app's lifespan
//     started; uvicorn calls listen() on vLLM's socket right after. vLLM
//     hands uvicorn a bound socket, so uvicorn's own "Uvicorn running on"
//     never appears; it is matched anyway for a server started otherwise.
//
// The port listens a moment after each of these (uvicorn's line is
// microseconds before its listen()), so the first probe may be refused:
// the model is then probed every burstPoll for burstFor, then every
// fastPoll.
var servingLines = []string{
	"Starting vLLM API server",
	"Starting vLLM server on ",
	"Application startup complete.",
	"Uvicorn running on ",
}

// servingLine reports whether a line of a model's output says it serves.
// A line that merely contains one of these (a model that echoes them) costs
// one extra probe, nothing more.
func servingLine(line string) bool {
	for _, s := range servingLines {
		if strings.Contains(line, s) {
			return true
		}
	}
	return false
}

const (
	// burstPoll is the probe interval right after the model said it
	// serves (for burstFor): a refused connection costs microseconds.
	burstPoll = 5 * time.Millisecond
	burstFor  = 250 * time.Millisecond
	// fastPoll is the probe interval after that, and in the window around
	// the start time its previous starts took.
	fastPoll = 50 * time.Millisecond
	// fastFor is how long after the model said it serves it is probed
	// every fastPoll before falling back to the startup poll: vLLM listens
	// within milliseconds of the line, so this is ample.
	fastFor = 10 * time.Second
)

// startupPoll is how long until the next probe of a starting model: every
// burstPoll, then fastPoll, once it said it serves (for fastFor), and in the window around
// the spawn-to-ready time its recent starts took (from a fifth before the
// median to half of it after, at least a second either side); else the
// startup poll (the probe period, at most MaxStartupPoll), never sleeping
// past the window's start.
func (m *Machine) startupPoll() time.Duration {
	slow := min(m.cfg.Probe.Period, MaxStartupPoll)
	now := m.now()
	if since := now.Sub(m.servingAt); !m.servingAt.IsZero() && since < fastFor {
		if since < burstFor {
			return burstPoll
		}
		return fastPoll
	}
	typ := gpu.Typical(m.loads)
	if typ <= 0 || m.inst == nil {
		return slow
	}
	elapsed := now.Sub(m.inst.Started)
	from := typ - max(typ/5, time.Second)
	until := typ + max(typ/2, time.Second)
	switch {
	case elapsed >= from && elapsed <= until:
		return min(fastPoll, slow)
	case elapsed < from:
		return max(min(slow, from-elapsed), fastPoll)
	}
	return slow
}

// onServing probes a starting model at once when its output said it serves.
func (m *Machine) onServing(ev EvServing) []Effect {
	if ev.Inst != m.inst || m.inst == nil || m.state != Starting || m.exited {
		return nil
	}
	m.servingAt = m.now()
	if m.probing {
		return nil // the probe in flight answers; a refusal re-arms fast
	}
	m.probing = true
	return []Effect{EfProbe{Live: false}}
}
