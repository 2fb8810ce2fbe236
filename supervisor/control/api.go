// Package control is the supervisor's control API: HTTP with JSON bodies on
// a Unix socket, the only interface that changes state. The server checks
// each peer's credentials (SO_PEERCRED); the client is what citadelctl uses.
package control

import "citadel-supervisor/supervisor"

// The API's paths.
const (
	PathStatus = "/v1/status" // GET ?model=a&model=b
	PathOp     = "/v1/op/"    // POST /v1/op/{start|stop|restart|reset}, body OpRequest
	PathReload = "/v1/reload" // POST
	PathLogs   = "/v1/logs"   // GET ?model=a&n=100&follow=1, text/plain lines
	PathHealth = "/v1/health" // GET; 200 when every enabled model is ready, else 503
	PathGPUs   = "/v1/gpus"   // GET
)

// Ops are the operations of PathOp.
var Ops = []string{"start", "stop", "restart", "reset"}

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

// HealthResponse summarises readiness.
type HealthResponse = supervisor.Health

// GPUsResponse lists the GPUs; Reason says why there are none.
type GPUsResponse struct {
	GPUs   []supervisor.GPUView `json:"gpus"`
	Reason string               `json:"reason,omitempty"`
}

// ErrorResponse is the body of every 4xx and 5xx answer.
type ErrorResponse struct {
	Error string `json:"error"`
}
