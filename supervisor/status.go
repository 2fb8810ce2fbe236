package supervisor

import (
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/lifecycle"
)

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
// what a pending model waits for (package lifecycle's).
const (
	CauseChecking = lifecycle.CauseChecking
	CauseStorage  = lifecycle.CauseStorage
	CauseEnvFiles = lifecycle.CauseEnvFiles
	CausePort     = lifecycle.CausePort
	CauseGPU      = lifecycle.CauseGPU
	CauseDaemon   = lifecycle.CauseDaemon
	CauseSpawn    = lifecycle.CauseSpawn
)

// PendingCauses lists every cause.
var PendingCauses = []string{CauseChecking, CauseStorage, CauseEnvFiles, CausePort, CauseGPU, CauseDaemon, CauseSpawn}

// Restart reasons, the values of citadel_model_restarts_total's reason
// label (package lifecycle's).
const (
	ReasonExit    = lifecycle.ReasonExit
	ReasonProbe   = lifecycle.ReasonProbe
	ReasonStartup = lifecycle.ReasonStartup
	ReasonManual  = lifecycle.ReasonManual
	ReasonReload  = lifecycle.ReasonReload
	ReasonWake    = lifecycle.ReasonWake
)

// RestartReasons lists every restart reason.
var RestartReasons = []string{ReasonExit, ReasonProbe, ReasonStartup, ReasonManual, ReasonReload, ReasonWake}
