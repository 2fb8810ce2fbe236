// Package api holds the control socket's wire: its paths, the operations,
// and the request and response types that the server (package control) and
// its client (package control/client, used by citadelctl) share.
//
// It imports nothing of this project and nothing outside the standard
// library, so citadelctl links only what it speaks, not the daemon (the
// config loader, the logger, the metrics library). The JSON keys are a
// contract: `citadelctl -o json` prints these types as they are.
package api

import (
	"context"
	"errors"
	"time"
)

// ErrUnknownModel is returned for a model name not in the configuration;
// the server answers it with 404.
var ErrUnknownModel = errors.New("unknown model")

// OutputLines is how many lines of a model's output the daemon keeps, and
// what a logs request without n returns (docs/architecture.md).
const OutputLines = 200

type actorKey struct{}

// WithActor says who asks for the operations run with ctx ("uid 1000
// (pid 4242)"): the control socket knows its peer; each model's status
// names who last changed it (Status.LastOp).
func WithActor(ctx context.Context, who string) context.Context {
	return context.WithValue(ctx, actorKey{}, who)
}

// ActorOf is who WithActor said asks, or "".
func ActorOf(ctx context.Context) string {
	s, _ := ctx.Value(actorKey{}).(string)
	return s
}

// The API's paths.
const (
	PathStatus = "/v1/status" // GET ?model=a&model=b
	PathOp     = "/v1/op/"    // POST /v1/op/{start|stop|restart|reset}, body OpRequest
	PathReload = "/v1/reload" // POST
	PathLogs   = "/v1/logs"   // GET ?model=a&n=100&follow=1, text/plain lines
	PathHealth = "/v1/health" // GET; 200 when every enabled model is ready, else 503
	PathGPUs   = "/v1/gpus"   // GET
	PathDaemon = "/v1/daemon" // GET: Daemon
	// PathUpgrade re-executes the daemon's binary in place (docs/operations.md): POST,
	// answered with UpgradeResponse just before the exec.
	PathUpgrade = "/v1/upgrade"
	// PathUsage is the gateway's requests and tokens since the daemon
	// started: GET, answered with Usage.
	PathUsage = "/v1/usage"
)

// Usage is the gateway's requests and tokens per model and API key NAME
// since the running image started (citadelctl usage).
type Usage struct {
	// Gateway is false when no gateway runs (gateway.listen is "").
	Gateway bool       `json:"gateway"`
	Since   time.Time  `json:"since,omitzero"`
	Rows    []UsageRow `json:"rows"`
}

// UsageRow is one model's and key's totals. Key is "" for requests
// without a key (no api_keys_file). Tokens are as the models' answers
// reported them (usage).
type UsageRow struct {
	Model            string `json:"model,omitempty"`
	Key              string `json:"key,omitempty"`
	Requests         int64  `json:"requests"`
	PromptTokens     int64  `json:"prompt_tokens"`
	CompletionTokens int64  `json:"completion_tokens"`
}

// Op is an operator's operation on models, the last element of PathOp.
type Op string

// The operations (docs/cli.md: citadelctl start|stop|restart|reset).
const (
	OpStart   Op = "start"   // start a model held stopped, failed or in backoff
	OpStop    Op = "stop"    // stop it and hold it stopped
	OpRestart Op = "restart" // graceful stop, then start
	OpReset   Op = "reset"   // clear the start limit and backoff, then start
	OpSleep   Op = "sleep"   // put an on-demand model to sleep now (docs/on-demand.md)
	OpWake    Op = "wake"    // wake (or start) an on-demand model now
)

// Ops lists every operation.
var Ops = []Op{OpStart, OpStop, OpRestart, OpReset, OpSleep, OpWake}

// Valid reports whether o is one of Ops.
func (o Op) Valid() bool {
	switch o {
	case OpStart, OpStop, OpRestart, OpReset, OpSleep, OpWake:
		return true
	}
	return false
}

// opMutates classifies every operation: true when it changes state, so
// that only a peer allowed to change state may ask for it. A new operation
// adds its line here; one missing from this table counts as changing state.
var opMutates = map[Op]bool{
	OpStart:   true,
	OpStop:    true,
	OpRestart: true,
	OpReset:   true,
	OpSleep:   true,
	OpWake:    true,
}

// Mutates reports whether o changes state. An unknown operation does: the
// server refuses it to a read-only peer before saying it does not exist.
func (o Op) Mutates() bool {
	m, known := opMutates[o]
	return m || !known
}

// OpRequest names the models of an operation; ["all"] means every model.
type OpRequest struct {
	Models []string `json:"models"`
}

// OpResult is one model's outcome; Error is empty on success.
type OpResult struct {
	Model string `json:"model"`
	Error string `json:"error,omitempty"`
}

// OpResponse lists the outcome per model, sorted by name.
type OpResponse struct {
	Results []OpResult `json:"results"`
}

// ReloadChange is one model's reload action.
type ReloadChange struct {
	Model  string   `json:"model"`
	Change string   `json:"change"` // added, removed, respawn, update, unchanged
	Fields []string `json:"fields,omitempty"`
}

// ReloadResponse lists what a reload did.
type ReloadResponse struct {
	Changes []ReloadChange `json:"changes"`
}

// GPUsResponse lists the GPUs; Reason says why there are none.
type GPUsResponse struct {
	GPUs   []GPU  `json:"gpus"`
	Reason string `json:"reason,omitempty"`
}

// ErrorResponse is the body of every 4xx and 5xx answer.
type ErrorResponse struct {
	Error string `json:"error"`
}

// Daemon describes the daemon itself (PathDaemon).
type Daemon struct {
	// Ownership is how it owns the models' processes: "cgroup" (a cgroup
	// v2 leaf per instance) or "marker" (marker variable, parent links,
	// subreaper).
	Ownership string `json:"ownership"`
	// Cgroup is the directory holding the models' leaves in cgroup mode.
	Cgroup string `json:"cgroup,omitempty"`
	// Version is the running image's version; PID the daemon's process,
	// which an upgrade keeps.
	Version string `json:"version,omitempty"`
	PID     int    `json:"pid,omitempty"`
	// ImageStarted is when the running image began: an upgrade changes it,
	// not the PID.
	ImageStarted time.Time `json:"image_started,omitzero"`
	// Upgrades counts the upgrades in place since the process started.
	Upgrades int `json:"upgrades"`
	// LastUpgradeError says why the last upgrade failed (the daemon kept
	// running the image it had); empty when it did not.
	LastUpgradeError string `json:"last_upgrade_error,omitempty"`
	// UpgradeFailures counts the upgrades that failed since the image
	// started: a client tells a new failure from an old one by it.
	UpgradeFailures int `json:"upgrade_failures"`
}

// UpgradeResponse is the daemon's answer to PathUpgrade: it is about to
// execute Binary, whose version is To.
type UpgradeResponse struct {
	Binary  string `json:"binary"`
	From    string `json:"from"`
	To      string `json:"to"`
	Models  int    `json:"models"`  // models handed over
	Running int    `json:"running"` // of them, with a process kept
}
