package supervisor

import "citadel-supervisor/supervisor/control/api"

// A model's status is part of the control wire (package api), so that
// citadelctl links the types without the daemon. These aliases keep the
// supervisor's own names.

// State is a model's lifecycle state (docs/architecture.md).
type State = api.State

// The states of docs/architecture.md. Their names are part of the contract.
const (
	Pending   = api.Pending
	Starting  = api.Starting
	Ready     = api.Ready
	Unhealthy = api.Unhealthy
	Stopping  = api.Stopping
	Backoff   = api.Backoff
	Failed    = api.Failed
	Stopped   = api.Stopped
	Sleeping  = api.Sleeping
	Waking    = api.Waking
)

// States lists every state, in lifecycle order.
var States = api.States

// Status is an immutable snapshot of one model, published by its runner
// after every transition.
type Status = api.Status

// Health summarises readiness: healthy when every enabled model is ready.
type Health = api.Health

// HealthOf summarises st.
func HealthOf(st []Status) Health { return api.HealthOf(st) }

// Summary is the one-line status systemd shows: "5/7 ready, 1 pending,
// 1 failed".
func Summary(st []Status) string { return api.Summary(st) }

// Pending causes, the values of citadel_model_pending_cause's cause label:
// what a pending model waits for. Waiting for GPU memory is normal on a
// host with more models than memory; the others need an operator.
const (
	CauseChecking = "checking" // about to check (just started, restarted, reset)
	CauseStorage  = "storage"  // the model path does not exist
	CauseEnvFiles = "env_files"
	CausePort     = "port" // someone else listens on the model's port
	CauseGPU      = "gpu"  // GPU memory, priority, a start or a release on its GPUs
	// CauseDaemon: the daemon itself was short of descriptors, memory or
	// processes to spawn it; its own problem, retried, never the model's.
	CauseDaemon = "daemon"
)

// PendingCauses lists every cause.
var PendingCauses = []string{CauseChecking, CauseStorage, CauseEnvFiles, CausePort, CauseGPU, CauseDaemon}

// Restart reasons, the values of citadel_model_restarts_total's reason label.
const (
	ReasonExit    = "exit"
	ReasonProbe   = "probe"
	ReasonStartup = "startup"
	ReasonManual  = "manual"
	ReasonReload  = "reload"
	// ReasonWake: a wake failed (hung, its engine dead, its canary failed)
	// and the model was started cold.
	ReasonWake = "wake"
)

// RestartReasons lists every restart reason.
var RestartReasons = []string{ReasonExit, ReasonProbe, ReasonStartup, ReasonManual, ReasonReload, ReasonWake}
