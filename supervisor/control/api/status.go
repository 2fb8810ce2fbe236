package api

import (
	"fmt"
	"time"
)

// State is a model's lifecycle state (docs/architecture.md).
type State string

// The states of docs/architecture.md. Their names are part of the contract.
const (
	Pending   State = "pending"   // waiting for storage, port, env files or GPU memory; Reason says which
	Starting  State = "starting"  // spawned, no healthy answer yet
	Ready     State = "ready"     // answering its health probe
	Unhealthy State = "unhealthy" // was ready, probes now failing
	Stopping  State = "stopping"  // being stopped (SIGTERM, grace, SIGKILL of the tree)
	Backoff   State = "backoff"   // waiting to restart after a failure
	Failed    State = "failed"    // start limit hit or a permanent error
	Stopped   State = "stopped"   // held stopped by an operator or enabled: false; an idle on-demand model
	Sleeping  State = "sleeping"  // on demand: process alive, GPU memory given back (vLLM sleep mode)
	Waking    State = "waking"    // on demand: being woken for a request
)

// States lists every state, in lifecycle order.
var States = []State{Pending, Starting, Ready, Unhealthy, Stopping, Backoff, Failed, Stopped, Sleeping, Waking}

// Status is an immutable snapshot of one model, published by its runner
// after every transition. The JSON keys are the contract of
// `citadelctl status -o json`.
type Status struct {
	Name         string    `json:"name"`
	State        State     `json:"state"`
	Reason       string    `json:"reason"`
	PID          int       `json:"pid"`
	Port         int       `json:"port"`
	GPUs         []string  `json:"gpus"`
	Restarts     int       `json:"restarts"`
	LastExitCode *int      `json:"last_exit_code"`
	Since        time.Time `json:"since"` // time of the last transition

	Enabled          bool           `json:"enabled"`
	LastExit         string         `json:"last_exit,omitempty"` // "exit code 1", "killed by SIGKILL"
	StartedAt        time.Time      `json:"started_at,omitzero"` // spawn of the current process
	ReadyAt          time.Time      `json:"ready_at,omitzero"`
	StartupDuration  time.Duration  `json:"-"`
	StartupSeconds   float64        `json:"startup_duration_seconds,omitempty"` // StartupDuration, for JSON readers
	RestartsByReason map[string]int `json:"restarts_by_reason,omitempty"`
	ProbeSuccess     *bool          `json:"probe_success,omitempty"` // the last health probe's result
	PendingCause     string         `json:"pending_cause,omitempty"` // what a pending model waits for
	// LastOutput holds the model's last lines of output when it failed.
	LastOutput []string `json:"last_output,omitempty"`

	// OnDemand: activation on_demand (docs/on-demand.md): started or woken by a
	// request, put to sleep when idle or to make room.
	OnDemand bool `json:"on_demand,omitempty"`
	// Held: stopped by an operator (citadelctl stop) or enabled: false, as
	// opposed to an on-demand model that is stopped until a request comes.
	Held bool `json:"held,omitempty"`
	// LastRequest is the last time the gateway sent it a request.
	LastRequest time.Time `json:"last_request,omitzero"`
	// SleepLevel is the vLLM sleep level it sleeps at, while sleeping.
	SleepLevel int `json:"sleep_level,omitempty"`
	// VLLMVersion is the model's vLLM release, and VLLMVersionSource where
	// that comes from: "package" (its interpreter's package metadata,
	// before it started), "server" (its GET /version), "assumed" (it could
	// not be learned: the newest the daemon knows, until /version answers).
	VLLMVersion       string `json:"vllm_version,omitempty"`
	VLLMVersionSource string `json:"vllm_version_source,omitempty"`
	// VLLMNote says which configured feature its vLLM lacks and what the
	// daemon does instead (sleep_level 2 → 1 → 0).
	VLLMNote string `json:"vllm_note,omitempty"`
	// LastOp is the last operation that changed what the model should do:
	// an operator's (citadelctl start, stop …) or a reload's. A `citadelctl
	// stop` that finds its stop undone names it.
	LastOp *OpRecord `json:"last_op,omitempty"`
	// Canary says how a wake of its current process is proven: "known
	// answer" (recorded after its start: a wake must give it again), or
	// why any answer will do (not deterministic, not recorded).
	Canary string `json:"canary,omitempty"`
	// WakeFailures counts its failed wakes (restarted cold) since the
	// daemon started.
	WakeFailures int `json:"wake_failures,omitempty"`
	// Seq numbers the model's published snapshots, in order (the daemon's
	// own bookkeeping; not on the wire).
	Seq uint64 `json:"-"`
	// SleepHostMemory is the pinned host memory its process holds for its
	// level-1 sleeps (citadel_model_sleep_host_memory_bytes; not on the
	// wire): from its first until the process ends (vllm#16663).
	SleepHostMemory uint64 `json:"-"`
	// EnvDigest fingerprints the env_files contents its last process was
	// started with (not the values; not on the wire): a reload compares it
	// with the files to restart a model whose secret was rotated.
	EnvDigest string `json:"-"`
	// For the gateway's estimate of how long a start or wake will take
	// (not on the wire): the typical duration of the model's recent starts
	// (asked to ready) and of its recent wakes from the level it sleeps at
	// (WakeLevel, while sleeping or waking; while awake, the level it would
	// sleep at, for the eviction policy), and when the start or wake in
	// progress began.
	TypicalStartup time.Duration `json:"-"`
	TypicalWake    time.Duration `json:"-"`
	WakeLevel      int           `json:"-"`
	LoadBegan      time.Time     `json:"-"`
}

// Serving reports whether the model is what operators mean by serving
// (docs/on-demand.md): an always model ready; an on-demand model ready, sleeping or
// startable (stopped until a request, or waking or starting for one).
func (s Status) Serving() bool {
	if s.State == Ready {
		return true
	}
	if !s.OnDemand {
		return false
	}
	switch s.State {
	case Sleeping, Waking, Pending, Starting:
		return true
	case Stopped:
		return !s.Held
	}
	return false
}

// Health summarises readiness (docs/cli.md, citadelctl health): healthy when every enabled model
// is serving (Serving). A model held stopped by an operator is listed but
// does not make it unhealthy. It is the body of PathHealth.
type Health struct {
	Healthy  bool     `json:"healthy"`
	Ready    int      `json:"ready"`   // serving, on demand ones counted whether awake or not
	Enabled  int      `json:"enabled"` // enabled models not held stopped
	NotReady []Status `json:"not_ready"`
	// Held lists the models an operator holds stopped.
	Held []Status `json:"held,omitempty"`
}

// HealthOf summarises st.
func HealthOf(st []Status) Health {
	out := Health{NotReady: []Status{}}
	for _, m := range st {
		switch {
		case !m.Enabled:
		case m.State == Stopped && m.Held:
			out.Held = append(out.Held, m)
		default:
			out.Enabled++
			if m.Serving() {
				out.Ready++
			} else {
				out.NotReady = append(out.NotReady, m)
			}
		}
	}
	out.Healthy = out.Ready == out.Enabled
	return out
}

// Summary is the one-line status systemd shows: "5/7 ready, 1 pending,
// 1 failed" (states other than ready in lifecycle order, only if any).
func Summary(st []Status) string {
	counts := map[State]int{}
	for _, s := range st {
		counts[s.State]++
	}
	out := fmt.Sprintf("%d/%d ready", counts[Ready], len(st))
	for _, s := range States {
		if s != Ready && counts[s] > 0 {
			out += fmt.Sprintf(", %d %s", counts[s], s)
		}
	}
	return out
}

// OpRecord is one operation on a model: what, by whom, when.
type OpRecord struct {
	Op string    `json:"op"`           // start, stop, restart, reset, sleep, wake, reload
	By string    `json:"by,omitempty"` // "uid 1000 (pid 4242)"; empty for a reload or SIGHUP
	At time.Time `json:"at"`
}

// String says it the way citadelctl reports it: "start by uid 1000 (pid
// 4242) at 12:00:03".
func (o OpRecord) String() string {
	s := o.Op
	if o.By != "" {
		s += " by " + o.By
	}
	return s + " at " + o.At.Format("15:04:05")
}
