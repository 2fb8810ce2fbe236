package supervisor

import "strings"

// Readiness without polling delay. A starting model is probed every
// startup poll (at most a second) until it answers; the supervisor's own
// share of a cold start would be half that on average. vLLM says when it
// is about to serve, so the output reader watches for it and the model is
// probed at once (EvServing), then fast until it answers (docs/probes.md;
// the polls are the machine's, supervisor/lifecycle/serving.go).

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
