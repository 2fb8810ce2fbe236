package fakevllm

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// sleepMode is vLLM's sleep mode as the supervisor drives it (docs/on-demand.md),
// served only with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1, as vLLM
// does. It fails loudly (500 and an ERROR line) where a real engine would
// crash or answer garbage, so tests catch a supervisor that sends an
// inference request to a sleeping engine, tells an engine to sleep with
// requests in flight, or skips the reload after a level-2 sleep.
//
// Flags: --fake-wake-time-l1 and --fake-wake-time-l2 (how long a wake
// takes, by the level slept at); --fake-model-bytes (the weights' size: a
// level-1 sleeper allocates it in host memory, as vLLM pins the weights
// there; reported in /fake/stats; 0 by default);
// --fake-usage-dir and --fake-sleep-residue (the sim GPU backend's ledger:
// while asleep the fake holds only its residue there; awake, its share, and
// a wake that does not fit exits as CUDA does, memory.go); --fake-sleep-time
// (how long /sleep takes: /is_sleeping says false until it is done, as
// vLLM's does).
type sleepMode struct {
	o        *options
	inFlight atomic.Int64 // inference requests running (admitted under mu)
	// engine is held through each /sleep and /wake_up: vLLM's engine core
	// runs one such call at a time, so a wake sent during a sleep runs
	// once the sleep is done.
	engine sync.Mutex

	mu        sync.Mutex
	asleep    bool
	going     bool // a /sleep is in progress: the engine is busy moving its memory
	level     int
	needWake  map[string]bool // tags still to wake: weights, kv_cache
	discarded bool            // level 2: weights dropped and not reloaded yet

	hostMem []byte // level 1: the weights "in pinned host memory", really allocated
	// broken: a wake left the engine answering nonsense (--fake-break-on-wake;
	// vllm#25800, #29341, #54235), until a cold start.
	broken bool
	// stale: a level-1 wake on 0.8.0–0.10.1 kept the prefix cache of before
	// the sleep: answers are wrong until /reset_prefix_cache (vllm#16234,
	// #17103; fixed by PR #22726).
	stale bool

	served, refusedAsleep, sleeps, refusedSleeps, garbage atomic.Int64
	wakes                                                 [3]atomic.Int64
}

type sleepOptions struct {
	enabled    bool
	wakeL1     time.Duration
	wakeL2     time.Duration
	modelBytes int64
	usageDir   string
	residue    int64
	failWake   bool // --fake-fail-wake: every /wake_up fails (the memory was taken)
	sleepTime  time.Duration
}

// parseSize reads 2GiB, 512MiB or a byte count.
func parseSize(s string) (int64, error) {
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if n, ok := cutSuffix(s, u.suffix); ok {
			f, err := strconv.ParseFloat(n, 64)
			return int64(f * float64(u.mult)), err
		}
	}
	return strconv.ParseInt(s, 10, 64)
}

func cutSuffix(s, suffix string) (string, bool) {
	if len(s) > len(suffix) && s[len(s)-len(suffix):] == suffix {
		return s[:len(s)-len(suffix)], true
	}
	return "", false
}

// devMode reports whether vLLM would serve the development endpoints.
func (o *options) devMode() bool {
	return o.sleep.enabled && os.Getenv("VLLM_SERVER_DEV_MODE") == "1"
}

func (s *sleepMode) register(mux *http.ServeMux) {
	if !s.o.devMode() {
		return // 404, as vLLM without them
	}
	mux.HandleFunc("POST /sleep", s.sleep)
	mux.HandleFunc("POST /wake_up", s.wakeUp)
	mux.HandleFunc("GET /is_sleeping", func(w http.ResponseWriter, _ *http.Request) {
		s.mu.Lock()
		defer s.mu.Unlock()
		writeJSON(w, map[string]bool{"is_sleeping": s.asleep})
	})
	mux.HandleFunc("POST /collective_rpc", func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			Method string `json:"method"`
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.Method == "" {
			vllmError(w, http.StatusBadRequest, "BadRequestError", "collective_rpc needs a JSON body with a method")
			return
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if req.Method == "reload_weights" {
			if s.needWake["weights"] {
				s.loud(w, "reload_weights while the weights' memory still sleeps (wake_up?tags=weights first)")
				return
			}
			s.discarded = false
		}
		writeJSON(w, map[string]any{"results": []any{nil}})
	})
	mux.HandleFunc("POST /reset_prefix_cache", func(w http.ResponseWriter, _ *http.Request) {
		s.mu.Lock()
		s.stale = false
		s.mu.Unlock()
		s.o.events.log("reset_prefix_cache", nil)
		w.WriteHeader(http.StatusOK)
	})
	mux.HandleFunc("GET /fake/stats", func(w http.ResponseWriter, _ *http.Request) {
		s.mu.Lock()
		host := int64(len(s.hostMem))
		s.mu.Unlock()
		writeJSON(w, map[string]any{
			"served": s.served.Load(), "refused_asleep": s.refusedAsleep.Load(), "garbage": s.garbage.Load(),
			"sleeps": s.sleeps.Load(), "refused_sleeps": s.refusedSleeps.Load(),
			"wakes_l1": s.wakes[1].Load(), "wakes_l2": s.wakes[2].Load(), "host_bytes": host,
		})
	})
}

// loud answers 500 and logs an ERROR line, as a crashing engine would.
// Called with mu held.
func (s *sleepMode) loud(w http.ResponseWriter, what string) {
	fmt.Fprintf(os.Stderr, "ERROR fake-vllm: %s\n", what)
	vllmError(w, http.StatusInternalServerError, "InternalServerError", what)
}

func (s *sleepMode) sleep(w http.ResponseWriter, r *http.Request) {
	// The level is read from the query string only: vLLM ignores a body.
	level := 1
	if v := r.URL.Query().Get("level"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > 2 {
			vllmError(w, http.StatusBadRequest, "BadRequestError", "level must be 1 or 2")
			return
		}
		level = n
	}
	s.engine.Lock()
	defer s.engine.Unlock()
	s.mu.Lock()
	if n := s.inFlight.Load(); n > 0 {
		s.refusedSleeps.Add(1)
		s.o.events.log("misuse", map[string]any{"what": "sleep with requests in flight", "in_flight": n})
		s.loud(w, fmt.Sprintf("told to sleep with %d requests in flight (this crashes TP>1 engines)", n))
		s.mu.Unlock()
		return
	}
	s.going = true
	s.mu.Unlock()
	s.o.events.log("sleep_begin", map[string]any{"level": level})
	if d := s.o.sleep.sleepTime; d > 0 {
		// vLLM's /sleep returns once the memory is moved; /is_sleeping
		// says false meanwhile. The engine goes on when the caller goes
		// away (a daemon killed mid-sleep).
		time.Sleep(d)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.going = false
	s.asleep, s.level = true, level
	s.needWake = map[string]bool{"weights": true, "kv_cache": true}
	s.discarded = level == 2
	if level == 1 && s.o.sleep.modelBytes > 0 && s.hostMem == nil {
		// Level 1 moves the weights to pinned host memory: take it for real
		// (and touch it), so the supervisor measures it as a real one's.
		// vLLM keeps it after the wake (vllm#16663, PR #55206 open): the
		// next sleep reuses it, and it goes only with the process.
		s.hostMem = make([]byte, s.o.sleep.modelBytes)
		for i := 0; i < len(s.hostMem); i += 4096 {
			s.hostMem[i] = 1
		}
	}
	s.sleeps.Add(1)
	s.o.mem.keep(uint64(s.o.sleep.residue))
	s.o.events.log("sleep", map[string]any{"level": level})
	logf("sleeping at level %d", level)
	w.WriteHeader(http.StatusOK)
}

func (s *sleepMode) wakeUp(w http.ResponseWriter, r *http.Request) {
	if s.o.sleep.failWake {
		s.mu.Lock()
		defer s.mu.Unlock()
		s.loud(w, "CUDA out of memory while waking (--fake-fail-wake)")
		return
	}
	tags := r.URL.Query()["tags"]
	if len(tags) == 0 {
		tags = []string{"weights", "kv_cache"}
	}
	s.engine.Lock()
	defer s.engine.Unlock()
	s.mu.Lock()
	level := s.level
	s.mu.Unlock()
	d := s.o.sleep.wakeL1
	if level == 2 {
		d = s.o.sleep.wakeL2
	}
	select {
	case <-time.After(d):
	case <-r.Context().Done():
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, t := range tags {
		delete(s.needWake, t)
	}
	if s.asleep && len(s.needWake) == 0 {
		// The memory comes back: out of memory if another took it.
		s.o.mem.take("wake")
		s.asleep = false
		s.wakes[min(max(level, 1), 2)].Add(1)
		if s.o.breakOnWake {
			s.broken = true
		}
		if level == 1 && staleAfterWake(s.o.release) {
			s.stale = true
		}
		s.o.events.log("wake", map[string]any{"level": level})
		logf("awake (slept at level %d)", level)
	}
	w.WriteHeader(http.StatusOK)
}

// admit says whether an inference request may run: not while asleep, not
// with weights discarded and never reloaded. It answers the refusal.
func (s *sleepMode) admit(w http.ResponseWriter, client string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.asleep, s.going:
		s.refusedAsleep.Add(1)
		s.o.events.log("misuse", map[string]any{"what": "inference request while asleep", "client": client})
		s.loud(w, "inference request while asleep (a real engine has crashed on this)")
		return false
	case s.discarded:
		s.garbage.Add(1)
		s.o.events.log("misuse", map[string]any{"what": "inference request with discarded weights", "client": client})
		s.loud(w, "weights were discarded (sleep level 2) and not reloaded")
		return false
	}
	s.served.Add(1)
	s.inFlight.Add(1) // under mu: a sleep sees it
	return true
}

// answerMode is what the engine's state makes of an answer: "" (right),
// "garbage" (broken by a wake) or "stale" (a stale prefix cache).
func (s *sleepMode) answerMode() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case s.broken:
		return "garbage"
	case s.stale:
		return "stale"
	}
	return ""
}

// staleAfterWake reports whether vLLM release r (--fake-vllm-version)
// keeps a stale prefix cache after a level-1 wake: 0.8.0 to 0.10.1, before
// PR #22726 reset it at the wake.
func staleAfterWake(r release) bool {
	return r.atLeast("0.8.0") && !r.atLeast("0.10.2")
}

// done ends a request admit let in.
func (s *sleepMode) done() { s.inFlight.Add(-1) }
