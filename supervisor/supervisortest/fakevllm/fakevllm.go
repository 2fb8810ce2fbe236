// Package fakevllm stands in for `python -m vllm.entrypoints.openai.api_server`
// in the demo and in tests. It takes the flags the supervisor passes to vLLM,
// ignores the vLLM flags it does not know, and answers /health, /v1/models,
// /v1/completions, /v1/chat/completions, /v1/embeddings and /metrics once
// "loaded". Completions stream as SSE with "stream": true; --fake-tokens
// and --fake-token-delay set how many tokens and how fast.
//
// It plays one vLLM release (--fake-vllm-version X.Y.Z, or package-style
// metadata: see versions.go), and can be run as its model's python to
// answer the supervisor's version lookup (-c).
//
// Flags starting with --fake- make it misbehave the ways a real vLLM does:
// load slowly, crash, hang (all of it, or only the engine while /health
// still answers), return 503, ignore SIGTERM, exit at start, fork
// workers (also ones that leave the process group, as vLLM's EngineCore does
// with setpgrp), or write a lot of output. And escape like hostile children
// do: a grandchild that clears its environment and double-forks, one that
// makes itself undumpable, a chain of processes that fork and exit (pid
// hopping). --fake-self does nothing: it marks the argv of a test binary
// asked to act as fake-vllm with an empty environment (env -i).
package fakevllm

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

type options struct {
	model, host, servedName string
	port, tp, maxModelLen   int
	gpuUtil                 float64

	loadTime         time.Duration
	listenFile       string // written with the time it began to accept (unix ns)
	silentStart      bool   // --fake-silent-start: print none of vLLM's serving lines (output swallowed)
	bindEarly        bool
	exitAtStart      bool
	exitCode         int
	crashAfter       time.Duration
	hangAfter        time.Duration
	engineHangAfter  time.Duration
	unhealthyAfter   time.Duration
	ignoreSIGTERM    bool
	stopDelay        time.Duration
	workers          int
	detachedWorkers  int
	orphanWorkers    int
	workerIgnore     bool
	pidDir           string
	envFile          string
	logEvery         time.Duration
	logBytesPerSec   int
	tokenDelay       time.Duration // between generated tokens (and stream events)
	tokens           int           // tokens generated when max_tokens is not given
	sleep            sleepOptions  // vLLM's sleep mode (sleep.go)
	eventLogPath     string        // --fake-event-log (memory.go)
	extraGPU         int64         // --fake-extra-gpu-memory: held beyond the share (vllm#40256)
	abortDelay       time.Duration // --fake-abort-delay: an engine notices a client gone this late (vLLM: at its next write to it)
	shutdownTimeout  time.Duration // vLLM's --shutdown-timeout (0.18): drain in-flight requests at SIGTERM
	shutdownFlag     bool          // --shutdown-timeout was given (argparse knows it from 0.18.0)
	breakOnWake      bool          // --fake-break-on-wake: every wake leaves it answering garbage
	nondeterministic bool          // --fake-nondeterministic: no two answers alike
	embeddingOnly    bool          // --fake-embedding-only: a pooling model: no completions

	events *eventLog  // the event log, nil without one
	mem    *gpuMemory // its memory on the sim's ledger, nil without one

	escapeEnv, undumpable, pidHop bool // start the hostile children

	// The vLLM release played (versions.go) and what it was told.
	version         string
	release         release
	apiKeys         []string // --api-key (repeatable), else VLLM_API_KEY
	disableLogStats bool
	pythonCode      string // -c CODE: run as the model's interpreter
	stats           fakeStats

	worker, workerDetached, workerOrphan bool
	escapeMiddle, escapee, hop, hidden   bool // the hostile children's roles
}

// Main runs fake-vllm with args (without the program name) and returns its
// exit code. Test binaries call it to re-execute themselves as a model.
func Main(args []string) int {
	o, err := parse(args)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fake-vllm:", err)
		return 2
	}
	if o.pythonCode != "" {
		return asInterpreter(o.pythonCode)
	}
	// Python ignores SIGPIPE, so vLLM keeps running when the reader of its
	// stdout (a killed supervisor) goes away. Do the same, or the "daemon
	// SIGKILL leaves children behind" cases could never be reproduced.
	signal.Ignore(syscall.SIGPIPE)
	role := "server"
	switch {
	case o.escapee:
		role = "escapee"
	case o.hidden:
		role = "hidden"
	case o.worker:
		role = "worker"
	}
	if err := writePID(o.pidDir, role); err != nil {
		fmt.Fprintln(os.Stderr, "fake-vllm:", err)
		return 1
	}
	if o.worker {
		return runWorker(o)
	}
	return runServer(o)
}

func parse(args []string) (*options, error) {
	o := &options{host: "127.0.0.1", tp: 1, gpuUtil: 0.9, exitCode: 1,
		sleep: sleepOptions{wakeL1: 200 * time.Millisecond, wakeL2: time.Second, modelBytes: 0, residue: 2 << 30}, tokens: 16}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") {
			return nil, fmt.Errorf("unexpected argument %q", a)
		}
		if a == "-m" && i+1 < len(args) {
			i++ // -m vllm.entrypoints.openai.api_server: run as the module
			continue
		}
		if a == "-c" && i+1 < len(args) {
			o.pythonCode = args[i+1]
			return o, nil
		}
		name, val, hasVal := strings.Cut(a, "=")
		// Value for a flag given as "--flag value".
		next := func() string {
			if hasVal {
				return val
			}
			if i+1 < len(args) {
				i++
				return args[i]
			}
			return ""
		}
		var err error
		switch name {
		case "--model":
			o.model = next()
		case "--host":
			o.host = next()
		case "--port":
			o.port, err = strconv.Atoi(next())
		case "--served-model-name":
			o.servedName = next()
		case "--tensor-parallel-size":
			o.tp, err = strconv.Atoi(next())
		case "--gpu-memory-utilization":
			o.gpuUtil, err = strconv.ParseFloat(next(), 64)
		case "--max-model-len":
			o.maxModelLen, err = strconv.Atoi(next())
		case "--fake-load-time":
			o.loadTime, err = time.ParseDuration(next())
		case "--fake-listen-file":
			o.listenFile = next()
		case "--fake-silent-start":
			o.silentStart = true
		case "--fake-bind-early":
			o.bindEarly = true
		case "--fake-exit-at-start":
			o.exitAtStart = true
		case "--fake-exit-code":
			o.exitCode, err = strconv.Atoi(next())
		case "--fake-crash-after":
			o.crashAfter, err = time.ParseDuration(next())
		case "--fake-hang-after":
			o.hangAfter, err = time.ParseDuration(next())
		case "--fake-engine-hang-after":
			o.engineHangAfter, err = time.ParseDuration(next())
		case "--fake-unhealthy-after":
			o.unhealthyAfter, err = time.ParseDuration(next())
		case "--fake-ignore-sigterm":
			o.ignoreSIGTERM = true
		case "--fake-stop-delay":
			o.stopDelay, err = time.ParseDuration(next())
		case "--fake-workers":
			o.workers, err = strconv.Atoi(next())
		case "--fake-detached-workers":
			o.detachedWorkers, err = strconv.Atoi(next())
		case "--fake-orphan-workers":
			o.orphanWorkers, err = strconv.Atoi(next())
		case "--fake-worker-orphan":
			o.workerOrphan = true
		case "--fake-worker-ignore-sigterm":
			o.workerIgnore = true
		case "--fake-pid-dir":
			o.pidDir = next()
		case "--fake-env-file":
			o.envFile = next()
		case "--fake-log-every":
			o.logEvery, err = time.ParseDuration(next())
		case "--fake-log-bytes-per-sec":
			o.logBytesPerSec, err = strconv.Atoi(next())
		case "--enable-sleep-mode":
			o.sleep.enabled = true
		case "--fake-wake-time-l1":
			o.sleep.wakeL1, err = time.ParseDuration(next())
		case "--fake-wake-time-l2":
			o.sleep.wakeL2, err = time.ParseDuration(next())
		case "--fake-model-bytes":
			o.sleep.modelBytes, err = parseSize(next())
		case "--fake-usage-dir":
			o.sleep.usageDir = next()
		case "--fake-fail-wake":
			o.sleep.failWake = true
		case "--fake-sleep-time":
			o.sleep.sleepTime, err = time.ParseDuration(next())
		case "--fake-event-log":
			o.eventLogPath = next()
		case "--fake-extra-gpu-memory":
			o.extraGPU, err = parseSize(next())
		case "--fake-abort-delay":
			o.abortDelay, err = time.ParseDuration(next())
		case "--shutdown-timeout":
			var secs int
			secs, err = strconv.Atoi(next())
			o.shutdownTimeout = time.Duration(secs) * time.Second
			o.shutdownFlag = true
		case "--fake-break-on-wake":
			o.breakOnWake = true
		case "--fake-nondeterministic":
			o.nondeterministic = true
		case "--fake-embedding-only":
			o.embeddingOnly = true
		case "--fake-sleep-residue":
			o.sleep.residue, err = parseSize(next())
		case "--fake-token-delay":
			o.tokenDelay, err = time.ParseDuration(next())
		case "--fake-tokens":
			o.tokens, err = strconv.Atoi(next())
		case "--fake-worker":
			o.worker = true
		case "--fake-worker-detached":
			o.workerDetached = true
		case "--fake-self":
		case "--fake-escape-env":
			o.escapeEnv = true
		case "--fake-undumpable":
			o.undumpable = true
		case "--fake-pid-hop":
			o.pidHop = true
		case "--fake-escapee":
			o.escapee = true
		case "--fake-hidden":
			o.hidden = true
		case "--fake-vllm-version":
			o.version = next()
		case "--api-key":
			o.apiKeys = append(o.apiKeys, next())
		case "--disable-log-stats":
			o.disableLogStats = true
		default:
			if strings.HasPrefix(name, "--fake-") {
				return nil, fmt.Errorf("unknown flag %s", name)
			}
			// A vLLM flag we do not model. Boolean flags stand alone; a
			// following word that is not a flag is its value.
			if !hasVal && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
				i++
			}
		}
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
	}
	if !o.worker && (o.port <= 0 || o.model == "") {
		return nil, fmt.Errorf("--model and --port are required")
	}
	if o.version == "" {
		o.version = defaultVersion
		if v, ok := metadataVersion(os.Args[0]); ok {
			o.version = v
		}
	}
	var err error
	if o.release, err = parseRelease(o.version); err != nil {
		return nil, fmt.Errorf("--fake-vllm-version: %w", err)
	}
	if len(o.apiKeys) == 0 && os.Getenv("VLLM_API_KEY") != "" {
		o.apiKeys = []string{os.Getenv("VLLM_API_KEY")}
	}
	if o.servedName == "" {
		o.servedName = o.model
	}
	return o, nil
}

// serveLines prints what vLLM prints once loaded, just before uvicorn
// listens on the socket vLLM bound at start: its own line (the API server's
// rank from 0.10 on, inferred from logs of those releases: "(APIServer
// pid=N) INFO … Starting vLLM API server 0 on http://…"), then uvicorn's
// lifespan lines on stderr. "Uvicorn running on" is not printed: vLLM hands
// uvicorn a socket, and uvicorn logs that line only for sockets it binds
// itself (uvicorn server.py startup).
func serveLines(o *options) {
	if o.silentStart {
		return
	}
	addr := "http://" + net.JoinHostPort(cmp.Or(o.host, "0.0.0.0"), strconv.Itoa(o.port))
	if o.release.atLeast("0.10.0") {
		fmt.Printf("(APIServer pid=%d) INFO %s [api_server.py:1945] Starting vLLM API server 0 on %s\n", os.Getpid(), time.Now().Format("01-02 15:04:05"), addr)
	} else {
		logf("Starting vLLM API server on %s", addr)
	}
	// serve_http lists the routes, then builds uvicorn's server: some
	// milliseconds on a real host.
	logf("Available routes are:")
	for _, r := range []string{"/health, Methods: GET", "/v1/models, Methods: GET", "/v1/chat/completions, Methods: POST", "/v1/completions, Methods: POST"} {
		logf("Route: %s", r)
	}
	time.Sleep(20 * time.Millisecond)
	fmt.Fprintf(os.Stderr, "INFO:     Started server process [%d]\n", os.Getpid())
	fmt.Fprintln(os.Stderr, "INFO:     Waiting for application startup.")
	fmt.Fprintln(os.Stderr, "INFO:     Application startup complete.")
}

// writeAtomic writes s to path through a temporary file, so a reader never
// sees it half written.
func writeAtomic(path, s string) {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(s), 0o644); err == nil {
		os.Rename(tmp, path) //nolint:errcheck // a benchmark's aid: it notices a missing file
	}
}

func logf(format string, args ...any) {
	fmt.Printf("INFO %s [fake-vllm] %s\n", time.Now().Format("01-02 15:04:05"), fmt.Sprintf(format, args...))
}

func runServer(o *options) int {
	var err error
	if o.events, err = openEventLog(o.eventLogPath, o.servedName); err != nil {
		fmt.Fprintln(os.Stderr, "fake-vllm:", err)
		return 1
	}
	logf("vLLM API server version %s (fake), args: model=%s tp=%d gpu_memory_utilization=%.2f max_model_len=%d",
		o.version, o.model, o.tp, o.gpuUtil, o.maxModelLen)
	if o.sleep.enabled && !o.release.atLeast("0.7.0") {
		// argparse, before anything else (vllm#11743 added the flag).
		fmt.Fprintf(os.Stderr, "usage: api_server.py [-h] ...\napi_server.py: error: unrecognized arguments: --enable-sleep-mode\n")
		return 2
	}
	if o.shutdownFlag && !o.release.atLeast("0.18.0") {
		// argparse again (vllm#34730 added the flag, in 0.18.0).
		fmt.Fprintf(os.Stderr, "usage: api_server.py [-h] ...\napi_server.py: error: unrecognized arguments: --shutdown-timeout\n")
		return 2
	}
	if tb, ok := checkVisibleDevices(o.release); !ok {
		fmt.Fprint(os.Stderr, tb)
		return 1
	}
	if o.mem, err = newGPUMemory(o, o.events); err != nil {
		fmt.Fprintln(os.Stderr, "fake-vllm:", err)
		return 1
	}
	// The sim GPU backend must not count memory for a process gone.
	defer o.mem.release()
	o.events.log("start", map[string]any{"gpus": os.Getenv("CUDA_VISIBLE_DEVICES")})
	defer o.events.log("exit", nil)
	if o.envFile != "" {
		if err := dumpEnv(o.envFile); err != nil {
			fmt.Fprintln(os.Stderr, "fake-vllm:", err)
			return 1
		}
	}
	if o.exitAtStart {
		fmt.Fprintf(os.Stderr, "ERROR fake-vllm: torch.OutOfMemoryError: CUDA out of memory (asked to exit at start)\n")
		return o.exitCode
	}

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	if o.ignoreSIGTERM {
		logf("ignoring SIGTERM")
	}

	for range o.workers {
		if err := spawnWorker(o, false); err != nil {
			fmt.Fprintln(os.Stderr, "fake-vllm: worker:", err)
			return 1
		}
	}
	for range o.detachedWorkers {
		if err := spawnWorker(o, true); err != nil {
			fmt.Fprintln(os.Stderr, "fake-vllm: detached worker:", err)
			return 1
		}
	}
	for range o.orphanWorkers {
		// Double fork: the middle process starts a detached worker and
		// exits at once, so the worker is re-parented before anyone could
		// see it as the server's descendant.
		if err := spawnProcess(o, "--fake-worker", "--fake-worker-orphan"); err != nil {
			fmt.Fprintln(os.Stderr, "fake-vllm: orphan worker:", err)
			return 1
		}
	}

	if err := spawnHostile(o); err != nil {
		fmt.Fprintln(os.Stderr, "fake-vllm: hostile child:", err)
		return 1
	}

	start := time.Now()
	var ln net.Listener
	var bound *boundSocket
	if o.bindEarly {
		// vLLM binds its socket before loading the weights (so Ray cannot
		// take the port, vllm#8204) but listens only once loaded: the port
		// is taken, and a connection is refused meanwhile.
		if bound, err = bindOnly(o); err != nil {
			fmt.Fprintf(os.Stderr, "ERROR fake-vllm: [Errno 98] error while attempting to bind on address: %v\n", err)
			return 1
		}
	}
	logf("Loading weights from %s (%s)", o.model, o.loadTime)
	// vLLM takes its memory as it loads: out of memory ends the start. It
	// profiles what the others hold meanwhile (vllm#56830).
	o.mem.take("load")
	neighbours := o.mem.neighbours()
	if code, stop := waitOrSignal(o, sigs, o.loadTime); stop {
		return code
	}
	o.mem.profileCheck(neighbours)
	// What vLLM prints as it begins to serve, before uvicorn listens on
	// its socket (serveLines).
	serveLines(o)
	if bound != nil {
		if ln, err = bound.listen(); err != nil {
			fmt.Fprintln(os.Stderr, "fake-vllm:", err)
			return 1
		}
	}
	if ln == nil {
		if ln, err = listen(o); err != nil {
			fmt.Fprintf(os.Stderr, "ERROR fake-vllm: [Errno 98] error while attempting to bind on address: %v\n", err)
			return 1
		}
	}
	handler, api := newHandler(o, start)
	srv := &http.Server{Handler: handler, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln) //nolint:errcheck // ends with the process
	o.events.log("serving", nil)
	if o.listenFile != "" {
		// When it began to accept, for benchmarks of the supervisor's
		// share of a start.
		writeAtomic(o.listenFile, strconv.FormatInt(time.Now().UnixNano(), 10))
	}
	go chatter(o)

	var crash <-chan time.Time
	if o.crashAfter > 0 {
		crash = time.After(max(0, o.crashAfter-time.Since(start)))
	}
	for {
		select {
		case <-crash:
			fmt.Fprintf(os.Stderr, "ERROR fake-vllm: engine died (crash after %s)\n", o.crashAfter)
			return o.exitCode
		case s := <-sigs:
			if s == syscall.SIGTERM && o.ignoreSIGTERM {
				onSignal(o, s)
				continue
			}
			// vLLM aborts the requests in flight at SIGTERM; from 0.18 its
			// --shutdown-timeout lets them finish first.
			if n := api.running.Load(); n > 0 {
				o.events.log("sigterm_in_flight", map[string]any{"in_flight": n, "shutdown_timeout": o.shutdownTimeout.String()})
			}
			if o.shutdownTimeout > 0 {
				ctx, cancel := context.WithTimeout(context.Background(), o.shutdownTimeout)
				srv.Shutdown(ctx) //nolint:errcheck // exiting anyway
				cancel()
			} else {
				srv.Close() //nolint:errcheck // exiting anyway
			}
			if code, stop := onSignal(o, s); stop {
				return code
			}
		}
	}
}

// waitOrSignal sleeps d (the load time) unless a signal ends the process.
func waitOrSignal(o *options, sigs chan os.Signal, d time.Duration) (int, bool) {
	t := time.NewTimer(d)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			return 0, false
		case s := <-sigs:
			if code, stop := onSignal(o, s); stop {
				return code, true
			}
		}
	}
}

func onSignal(o *options, s os.Signal) (int, bool) {
	o.events.log("signal", map[string]any{"signal": s.String()})
	if s == syscall.SIGTERM && o.ignoreSIGTERM {
		logf("received SIGTERM, ignoring it")
		return 0, false
	}
	logf("received %s, shutting down (%s)", s, o.stopDelay)
	time.Sleep(o.stopDelay)
	return 0, true
}

func listen(o *options) (net.Listener, error) {
	// vLLM sets SO_REUSEPORT, so a second server can share the port
	// silently; mimic it so the supervisor's port checks meet the real thing.
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, 0xf /* SO_REUSEPORT */, 1)
		})
		if err != nil {
			return err
		}
		return serr
	}}
	return lc.Listen(context.Background(), "tcp", net.JoinHostPort(o.host, strconv.Itoa(o.port)))
}

func newHandler(o *options, start time.Time) (http.Handler, *inference) {
	var requests atomic.Int64
	hung := func() bool { return o.hangAfter > 0 && time.Since(start) > o.hangAfter }
	mux := http.NewServeMux()
	mux.HandleFunc("GET /version", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, map[string]string{"version": o.version})
	})
	mux.HandleFunc("GET /fake/auth", func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, map[string]int64{"unauthorized": o.stats.unauthorized.Load()})
	})
	mux.HandleFunc("/health", func(w http.ResponseWriter, r *http.Request) {
		if hung() {
			<-r.Context().Done() // a wedged engine: the request never returns
			return
		}
		if o.unhealthyAfter > 0 && time.Since(start) > o.unhealthyAfter {
			http.Error(w, "engine dead", http.StatusServiceUnavailable)
			return
		}
		w.WriteHeader(http.StatusOK)
	})
	mux.HandleFunc("/v1/models", func(w http.ResponseWriter, r *http.Request) {
		if hung() {
			<-r.Context().Done()
			return
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{ //nolint:errcheck // best effort
			"object": "list",
			"data": []map[string]any{{
				"id": o.servedName, "object": "model", "owned_by": "vllm",
				"root": o.model, "max_model_len": o.maxModelLen,
			}},
		})
	})
	sm := &sleepMode{o: o}
	api := &inference{o: o, requests: &requests, sm: sm}
	sm.register(mux)
	for path, kind := range map[string]string{"/v1/completions": "completion", "/v1/chat/completions": "chat", "/v1/embeddings": "embedding"} {
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			// A wedged engine: /health still says 200, completions never come.
			if hung() || (o.engineHangAfter > 0 && time.Since(start) > o.engineHangAfter) {
				<-r.Context().Done()
				return
			}
			client := r.Header.Get("X-Fake-Client")
			if o.embeddingOnly && kind != "embedding" {
				vllmError(w, http.StatusBadRequest, "BadRequestError", "The model does not support Completions API")
				return
			}
			if o.devMode() {
				if !sm.admit(w, client) {
					return
				}
				defer sm.done()
			}
			id := api.seq.Add(1)
			o.events.log("req", map[string]any{"id": id, "client": client})
			defer o.events.log("req_end", map[string]any{"id": id, "client": client})
			api.serve(w, r, kind, id)
		})
	}
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "# TYPE process_open_fds gauge\nprocess_open_fds 20\n")
		if o.disableLogStats {
			return // no stat logger: none of vLLM's own series
		}
		fmt.Fprintf(w, "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{model_name=%q} %d\n", o.servedName, api.running.Load())
		fmt.Fprintf(w, "# TYPE vllm:request_success_total counter\nvllm:request_success_total{model_name=%q} %d\n", o.servedName, requests.Load())
	})
	return gate(o, errorFormat(o, mux)), api
}

// chatter writes periodic output, or a stream of bytes, to exercise the
// supervisor's log capture.
func chatter(o *options) {
	if o.logEvery > 0 {
		go func() {
			for i := 0; ; i++ {
				time.Sleep(o.logEvery)
				logf("Avg prompt throughput: 0.0 tokens/s, tick %d", i)
			}
		}()
	}
	if o.logBytesPerSec > 0 {
		// Numbered 100-byte lines, so a reader can tell how far it got.
		pad := strings.Repeat("x", 90)
		perTick := max(1, o.logBytesPerSec/100/100)
		for n := 0; ; {
			for range perTick {
				fmt.Fprintf(os.Stdout, "%08d %s\n", n, pad)
				n++
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
}

func spawnWorker(o *options, detached bool) error {
	args := []string{"--fake-worker"}
	if detached {
		args = append(args, "--fake-worker-detached")
	}
	return spawnProcess(o, args...)
}

// spawnProcess starts this program again with args, passing on the worker
// options.
func spawnProcess(o *options, args ...string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if o.workerIgnore {
		args = append(args, "--fake-worker-ignore-sigterm")
	}
	if o.pidDir != "" {
		args = append(args, "--fake-pid-dir", o.pidDir)
	}
	cmd := exec.Command(self, append([]string{"--fake-self"}, args...)...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr // workers share the server's output, as vLLM's do
	if err := cmd.Start(); err != nil {
		return err
	}
	go cmd.Wait() //nolint:errcheck // reap when it exits
	return nil
}

// spawnHostile starts the children that try to escape their supervisor.
func spawnHostile(o *options) error {
	if o.escapeEnv {
		// env -i, then a double fork through a shell that exits at once:
		// no marker, and a parent link that lasts a millisecond.
		if err := spawnBare(o, "--fake-worker", "--fake-escapee"); err != nil {
			return err
		}
	}
	if o.undumpable {
		// A double fork to a process that sets PR_SET_DUMPABLE 0: its
		// /proc/PID/environ is unreadable to a supervisor that is not root.
		if err := spawnProcess(o, "--fake-worker", "--fake-worker-orphan", "--fake-hidden"); err != nil {
			return err
		}
	}
	if o.pidHop {
		// A chain of shells, each recording itself, forking the next link
		// and exiting hopInterval later: the chain's PIDs keep changing
		// and no link lives long. (Shells, not this program: a chain of Go
		// binaries would take a core of its own.)
		script := `printf hopper > "$0/$$"; sleep ` + strconv.FormatFloat(hopInterval.Seconds(), 'f', 3, 64) + `; sh -c "$1" "$0" "$1" &`
		dir := o.pidDir
		if dir == "" {
			dir = os.TempDir()
		}
		cmd := exec.Command("/bin/sh", "-c", script, dir, script)
		if err := cmd.Start(); err != nil {
			return err
		}
		go cmd.Wait() //nolint:errcheck // reap when it exits
	}
	return nil
}

// spawnBare starts this program with args and an empty environment,
// double-forked: a shell starts it in the background and exits at once, so
// it is re-parented before anyone following parent links can see it.
func spawnBare(o *options, args ...string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	if o.pidDir != "" {
		args = append(args, "--fake-pid-dir", o.pidDir)
	}
	cmd := exec.Command("/bin/sh", append([]string{"-c", `"$0" "$@" </dev/null >/dev/null 2>&1 &`, self, "--fake-self"}, args...)...)
	cmd.Env = []string{} // not nil: nil would inherit
	if err := cmd.Start(); err != nil {
		return err
	}
	go cmd.Wait() //nolint:errcheck // reap when it exits
	return nil
}

// hostile runs the roles of the escaping children; ok false if o is none.
func hostile(o *options) (int, bool) {
	switch {
	case o.escapee:
		_, _ = unix.Setsid()
		signal.Ignore(syscall.SIGTERM, syscall.SIGHUP, syscall.SIGINT)
		blockForever()
	case o.hidden && o.workerOrphan:
		if err := spawnProcess(o, "--fake-worker", "--fake-hidden"); err != nil {
			fmt.Fprintln(os.Stderr, "fake-vllm hidden middle:", err)
			return 1, true
		}
		return 0, true
	case o.hidden:
		if err := unix.Prctl(unix.PR_SET_DUMPABLE, 0, 0, 0, 0); err != nil {
			fmt.Fprintln(os.Stderr, "fake-vllm hidden: prctl:", err)
			return 1, true
		}
		_, _ = unix.Setsid()
		signal.Ignore(syscall.SIGTERM, syscall.SIGHUP, syscall.SIGINT)
		blockForever()
	}
	return 0, false
}

// hopInterval is how long each link of a pid-hopping chain lives.
const hopInterval = 50 * time.Millisecond

func runWorker(o *options) int {
	if code, ok := hostile(o); ok {
		return code
	}
	if o.workerOrphan {
		if err := spawnWorker(o, true); err != nil {
			fmt.Fprintln(os.Stderr, "fake-vllm orphan parent:", err)
			return 1
		}
		return 0
	}
	if o.workerDetached {
		// vLLM's EngineCore calls setpgrp: a kill of the API server's process
		// group misses it.
		if err := syscall.Setpgid(0, 0); err != nil {
			fmt.Fprintln(os.Stderr, "fake-vllm worker: setpgid:", err)
			return 1
		}
	}
	sigs := make(chan os.Signal, 1)
	if o.workerIgnore {
		signal.Ignore(syscall.SIGTERM)
	} else {
		signal.Notify(sigs, syscall.SIGTERM)
	}
	logf("worker pid %d pgid %d detached=%v", os.Getpid(), syscall.Getpgrp(), o.workerDetached)
	<-sigs
	return 0
}

// writePID records this process in dir as a file named by its PID holding
// its role, so tests know every process a model started without asking the
// supervisor under test.
func writePID(dir, role string) error {
	if dir == "" {
		return nil
	}
	return os.WriteFile(filepath.Join(dir, strconv.Itoa(os.Getpid())), []byte(role), 0o644)
}

func dumpEnv(path string) error {
	env := map[string]string{}
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		env[k] = v
	}
	b, err := json.Marshal(map[string]any{"args": os.Args[1:], "env": env})
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o600)
}

// inference answers the OpenAI endpoints the way vLLM does: one token every
// --fake-token-delay, streamed as SSE events (data: {...}, then
// data: [DONE]) when the request asks for "stream": true. A request whose
// client goes away is logged ("cancelled by the client"), so tests can see
// that cancellation reached the model.
type inference struct {
	o        *options
	sm       *sleepMode    // what the engine's state does to its answers
	requests *atomic.Int64 // finished requests, vllm:request_success_total
	running  atomic.Int64  // in flight, vllm:num_requests_running
	seq      atomic.Int64
}

func (a *inference) serve(w http.ResponseWriter, r *http.Request, kind string, id int64) {
	if r.Method != http.MethodPost {
		http.Error(w, "use POST", http.StatusMethodNotAllowed)
		return
	}
	var req struct {
		Model         string `json:"model"`
		Stream        bool   `json:"stream"`
		MaxTokens     int    `json:"max_tokens"`
		StreamOptions *struct {
			IncludeUsage bool `json:"include_usage"`
		} `json:"stream_options"`
		EncodingFormat string `json:"encoding_format"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		vllmError(w, http.StatusBadRequest, "BadRequestError", "invalid JSON body: "+err.Error())
		return
	}
	if req.Model != a.o.servedName {
		vllmError(w, http.StatusNotFound, "NotFoundError", fmt.Sprintf("The model `%s` does not exist.", req.Model))
		return
	}
	a.running.Add(1)
	defer a.running.Add(-1)
	n := a.o.tokens
	if req.MaxTokens > 0 {
		n = req.MaxTokens
	}
	created := time.Now().Unix()
	mode := a.sm.answerMode()
	if kind == "embedding" {
		vec := []float64{0.1, -0.2, 0.3, 0.05}
		if mode == "garbage" || a.o.nondeterministic {
			for i := range vec {
				vec[i] = rand.Float64()*2 - 1
			}
		}
		var emb any = vec
		switch req.EncodingFormat {
		case "", "float":
		case "base64":
			emb = base64Embedding(vec)
		default:
			vllmError(w, http.StatusBadRequest, "BadRequestError", fmt.Sprintf("encoding_format %q: use float or base64", req.EncodingFormat))
			return
		}
		writeJSON(w, map[string]any{
			"object": "list", "model": a.o.servedName,
			"data":  []map[string]any{{"object": "embedding", "index": 0, "embedding": emb}},
			"usage": map[string]int{"prompt_tokens": 1, "total_tokens": 1},
		})
		a.requests.Add(1)
		return
	}
	word := func(i int) string {
		switch {
		case mode == "garbage":
			return fmt.Sprintf(" %x", rand.Uint32()) // a broken engine's nonsense
		case mode == "stale":
			return fmt.Sprintf(" stale%d", i) // a stale prefix cache's wrong continuation
		case a.o.nondeterministic:
			return fmt.Sprintf(" tok%d-%d", i, rand.IntN(1000))
		}
		return fmt.Sprintf(" tok%d", i)
	}
	chunk := func(i int, finish any) map[string]any {
		text := word(i)
		if kind == "chat" {
			return map[string]any{"id": fmt.Sprintf("chatcmpl-%d", id), "object": "chat.completion.chunk", "created": created, "model": a.o.servedName,
				"choices": []map[string]any{{"index": 0, "delta": map[string]any{"content": text}, "finish_reason": finish}}}
		}
		return map[string]any{"id": fmt.Sprintf("cmpl-%d", id), "object": "text_completion", "created": created, "model": a.o.servedName,
			"choices": []map[string]any{{"index": 0, "text": text, "finish_reason": finish}}}
	}
	// wait is one token's time; false when the client went away.
	wait := func(i int) bool {
		if a.o.tokenDelay <= 0 {
			return r.Context().Err() == nil
		}
		t := time.NewTimer(a.o.tokenDelay)
		defer t.Stop()
		select {
		case <-t.C:
			return true
		case <-r.Context().Done():
			logf("request %d cancelled by the client after %d of %d tokens", id, i, n)
			// The engine lets go only when it notices: it still runs (and
			// counts in num_requests_running) until then.
			if d := a.o.abortDelay; d > 0 {
				time.Sleep(d)
			}
			return false
		}
	}
	if req.Stream {
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		flusher, _ := w.(http.Flusher)
		if kind == "chat" {
			// vLLM's first chat chunk carries the role and no content.
			b, _ := json.Marshal(map[string]any{"id": fmt.Sprintf("chatcmpl-%d", id), "object": "chat.completion.chunk", "created": created, "model": a.o.servedName,
				"choices": []map[string]any{{"index": 0, "delta": map[string]any{"role": "assistant", "content": ""}, "logprobs": nil, "finish_reason": nil}}})
			fmt.Fprintf(w, "data: %s\n\n", b)
			if flusher != nil {
				flusher.Flush()
			}
		}
		for i := range n {
			if !wait(i) {
				return
			}
			var finish any
			if i == n-1 {
				finish = "length"
			}
			b, _ := json.Marshal(chunk(i, finish))
			fmt.Fprintf(w, "data: %s\n\n", b)
			if flusher != nil {
				flusher.Flush()
			}
		}
		if req.StreamOptions != nil && req.StreamOptions.IncludeUsage {
			usageChunk(w, chunk(n, nil), n)
		}
		fmt.Fprint(w, "data: [DONE]\n\n")
		a.requests.Add(1)
		return
	}
	var text strings.Builder
	for i := range n {
		if !wait(i) {
			return
		}
		text.WriteString(word(i))
	}
	out := map[string]any{"id": fmt.Sprintf("cmpl-%d", id), "object": "text_completion", "created": created, "model": a.o.servedName,
		"choices": []map[string]any{{"index": 0, "text": text.String(), "finish_reason": "length"}},
		"usage":   map[string]int{"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}}
	if kind == "chat" {
		out["id"], out["object"] = fmt.Sprintf("chatcmpl-%d", id), "chat.completion"
		out["choices"] = []map[string]any{{"index": 0, "message": map[string]any{"role": "assistant", "content": text.String()}, "finish_reason": "length"}}
	}
	writeJSON(w, out)
	a.requests.Add(1)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	writeJSONBody(w, v)
}

func writeJSONBody(w http.ResponseWriter, v any) {
	json.NewEncoder(w).Encode(v) //nolint:errcheck // best effort
}

// vllmError answers as vLLM's OpenAI server of the release played does:
// nested {"error": {...}} from 0.10.1 (vllm#22099), flat before.
func vllmError(w http.ResponseWriter, code int, typ, msg string) {
	body := map[string]any{"error": map[string]any{"message": msg, "type": typ, "param": nil, "code": code}}
	if f, ok := w.(*formatWriter); ok && !f.nested {
		body = map[string]any{"object": "error", "message": msg, "type": typ, "param": nil, "code": code}
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	writeJSONBody(w, body)
}

// formatWriter tells vllmError which error shape the release played uses.
type formatWriter struct {
	http.ResponseWriter
	nested bool
}

func (f *formatWriter) Flush() {
	if fl, ok := f.ResponseWriter.(http.Flusher); ok {
		fl.Flush()
	}
}

func (f *formatWriter) Unwrap() http.ResponseWriter { return f.ResponseWriter }

func errorFormat(o *options, next http.Handler) http.Handler {
	nested := o.release.atLeast("0.10.1")
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		next.ServeHTTP(&formatWriter{ResponseWriter: w, nested: nested}, r)
	})
}

// fakeStats counts what tests ask the fake about.
type fakeStats struct {
	unauthorized atomic.Int64 // /v1 requests refused for want of the key
}

// blockForever parks the process. Not select{}: with no other goroutine the
// Go runtime takes that for a deadlock and exits, which a standalone
// fake-vllm (not the test binary) would do at once.
func blockForever() {
	for {
		time.Sleep(time.Hour)
	}
}

// usageChunk writes the last chunk vLLM sends before [DONE] when a stream
// asks for stream_options.include_usage (serving_chat.py and
// serving_completion.py since 0.4): the stream's id, object, created and
// model, no choices, and the usage of the whole request. like is any
// chunk of the stream.
func usageChunk(w io.Writer, like map[string]any, completion int) {
	c := map[string]any{"id": like["id"], "object": like["object"], "created": like["created"], "model": like["model"],
		"choices": []any{}, "usage": map[string]int{"prompt_tokens": 1, "completion_tokens": completion, "total_tokens": completion + 1}}
	b, _ := json.Marshal(c)
	fmt.Fprintf(w, "data: %s\n\n", b)
}
