package lifecycle

import "citadel-supervisor/supervisor/control/api"

// The machine speaks the control wire's vocabulary (package api): its
// states, the status it publishes, the operators' operations.

// State is a model's lifecycle state (docs/architecture.md).
type State = api.State

// The states of docs/architecture.md.
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

// Status is the snapshot of a model the runner publishes.
type Status = api.Status

// Op is an operator's operation on a model.
type Op = api.Op

// The operations.
const (
	OpStart   = api.OpStart
	OpStop    = api.OpStop
	OpRestart = api.OpRestart
	OpReset   = api.OpReset
	OpSleep   = api.OpSleep
	OpWake    = api.OpWake
)

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
	// CauseSpawn: its process is being started (the checks once more, the
	// cgroup leaf, fork and exec): milliseconds, unless something under it
	// does not answer (its command or cgroup file system on a hung mount).
	CauseSpawn = "spawn"
)

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

// Where a model's vLLM version comes from.
const (
	VersionFromPackage = "package" // the interpreter's package metadata, before the spawn
	VersionFromServer  = "server"  // GET /version of the running model
	VersionAssumed     = "assumed" // it could not be learned: the newest known, until /version answers
)
