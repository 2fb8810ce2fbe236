// Package config loads, validates and compares citadel-supervisor's YAML
// configuration.
//
// A Config is immutable once Load returns it: every load builds a fresh koanf
// instance and a fresh value, and a reload swaps the whole value in. Models
// inherit every key from the built-in defaults and the file's `defaults:`
// section; a model may override any of them.
package config

import (
	"time"
)

// DefaultPath is where the daemon looks for its configuration when neither
// --config nor CITADEL_CONFIG names a file.
const DefaultPath = "/etc/citadel/supervisor.yaml"

// Config is one loaded, validated configuration. Treat it as read-only.
type Config struct {
	Listen        string `koanf:"listen"`
	ControlSocket string `koanf:"control_socket"`
	// ControlGroup may change state through the control socket besides
	// root and the daemon's user; "" means the daemon's own group.
	ControlGroup string `koanf:"control_socket_group"`
	// ControlReadGroup, when set, is the socket file's group: its members
	// may read (status, logs, health, gpus) but not change state.
	ControlReadGroup string  `koanf:"control_socket_read_group"`
	Log              Log     `koanf:"log"`
	GPU              GPU     `koanf:"gpu"`
	Gateway          Gateway `koanf:"gateway"`
	// SleepHostMemory bounds the host memory held by on-demand models
	// asleep at level 1 (their weights, in pinned RAM); past it a model
	// sleeps at level 2 instead. 0: no bound.
	SleepHostMemory ByteSize `koanf:"sleep_host_memory"`
	// CacheDir holds a directory per model for vLLM's caches
	// (VLLM_CACHE_ROOT=<cache_dir>/vllm/<model>): compiled graphs survive
	// restarts, and two models never share one (vllm#24601). "" is the
	// unit's CacheDirectory= ($CACHE_DIRECTORY), else /var/cache/citadel.
	CacheDir string `koanf:"cache_dir"`

	// Models holds every model, sorted by name, with defaults merged in.
	Models []Model `koanf:"-"`

	// file is the parsed file as written (without values it refused), so
	// a problem can be reported where the operator wrote the value: under
	// defaults or under the model.
	file map[string]any
}

// Log configures the daemon's own log.
type Log struct {
	Level  string `koanf:"level"`  // debug | info | warn | error
	Format string `koanf:"format"` // json | console
	// ModelDir, when set, keeps each model's output in <dir>/<model>.log,
	// rotated at ModelMaxSize with ModelKeep old files.
	ModelDir     string   `koanf:"model_dir"`
	ModelMaxSize ByteSize `koanf:"model_max_size"`
	ModelKeep    int      `koanf:"model_keep"`
}

// GPU configures the GPU backend and placement.
type GPU struct {
	Backend        string        `koanf:"backend"` // nvml | sim | none
	Headroom       ByteSize      `koanf:"headroom"`
	ReleaseTimeout time.Duration `koanf:"release_timeout"`
	// VisibleDevices is how a child's CUDA_VISIBLE_DEVICES names its GPUs:
	// index (NVML indices, with CUDA_DEVICE_ORDER=PCI_BUS_ID; every vLLM)
	// or uuid (full UUIDs; vLLM 0.24 and newer, needed for MIG).
	VisibleDevices string `koanf:"visible_devices"`
	Sim            Sim    `koanf:"sim"`
}

// How CUDA_VISIBLE_DEVICES names GPUs (gpu.visible_devices).
const (
	VisibleIndex = "index"
	VisibleUUID  = "uuid"
)

// Sim declares the GPUs of the simulated backend.
type Sim struct {
	Devices   []SimDevice `koanf:"devices"`
	StateFile string      `koanf:"state_file"`
	// UsageDir, when set, holds a file per process (named by its pid,
	// JSON {"bytes": N}) that overrides the memory derived from its argv:
	// fake-vllm writes its residue there while it sleeps.
	UsageDir string `koanf:"usage_dir"`
}

// SimDevice is one declared GPU of the sim backend.
type SimDevice struct {
	UUID   string   `koanf:"uuid"`
	Name   string   `koanf:"name"`
	Memory ByteSize `koanf:"memory"`
}

// Model is the effective configuration of one model: the built-in defaults,
// then the file's `defaults:`, then the model's own keys.
type Model struct {
	Name string `koanf:"-"`

	Command     []string          `koanf:"command"`
	Host        string            `koanf:"host"`
	Env         map[string]string `koanf:"env"`
	EnvFiles    []string          `koanf:"env_files"`
	StopTimeout time.Duration     `koanf:"stop_timeout"`
	Restart     Restart           `koanf:"restart"`
	Probe       Probe             `koanf:"probe"`

	Path       string `koanf:"model"`
	ServedName string `koanf:"served_name"`
	Port       int    `koanf:"port"`
	// VLLMPort is vllm_port as written; 0 means derived (DerivedVLLMPort).
	// Use VLLMPortStart for the port a child gets.
	VLLMPort             int      `koanf:"vllm_port"`
	TensorParallel       int      `koanf:"tensor_parallel"`
	GPUMemoryUtilization float64  `koanf:"gpu_memory_utilization"`
	MaxModelLen          int      `koanf:"max_model_len"`
	Args                 []string `koanf:"args"`
	GPUs                 []GPURef `koanf:"gpus"`
	Priority             int      `koanf:"priority"`
	Enabled              bool     `koanf:"enabled"`
	// MaxConcurrency caps the gateway's requests in flight to this model;
	// 0 = no cap. Requests beyond it wait in the model's queue.
	MaxConcurrency int `koanf:"max_concurrency"`

	// Activation is always (placed by priority, kept running) or on_demand
	// (started or woken by a request, put to sleep when idle or to make
	// room). docs/on-demand.md.
	Activation string `koanf:"activation"`
	// SleepLevel is how an idle on-demand model gives its GPUs back: 1 or 2
	// (vLLM's sleep levels), or 0 to stop the process.
	SleepLevel int `koanf:"sleep_level"`
	// IdleAfter: no request for this long puts an on-demand model to sleep.
	IdleAfter time.Duration `koanf:"idle_after"`
	// MinAwake: an on-demand model is not put to sleep for another model
	// within this long of waking (no thrash).
	MinAwake time.Duration `koanf:"min_awake"`
	// WakeTimeout bounds a wake (wake_up to the canary's answer); 0 derives
	// it from the model's recent wakes (docs/on-demand.md).
	WakeTimeout time.Duration `koanf:"wake_timeout"`

	// Derived at load from other keys and the host, never written by an
	// operator. They are not in SpawnDigest nor compared by Diff: a
	// change of how the daemon derives them (an upgrade) or of the host
	// reaches a model at its next spawn, never restarts it (docs/vllm.md).
	//
	// DerivedVLLMPort is the VLLM_PORT block a model without vllm_port
	// gets: outside the host's ephemeral port range (DefaultVLLMPort).
	DerivedVLLMPort int `koanf:"-"`
	// CacheRoot is the model's default VLLM_CACHE_ROOT, under cache_dir;
	// the model's env or env_files may set another.
	CacheRoot string `koanf:"-"`
}

// VLLMPortStart is the first port of the model's VLLM_PORT block: vllm_port
// when set, else the derived one.
func (m Model) VLLMPortStart() int {
	if m.VLLMPort != 0 {
		return m.VLLMPort
	}
	return m.DerivedVLLMPort
}

// The activations.
const (
	ActivationAlways   = "always"
	ActivationOnDemand = "on_demand"
)

// OnDemand reports whether m runs only while wanted (docs/on-demand.md).
func (m Model) OnDemand() bool { return m.Activation == ActivationOnDemand }

// Sleeps reports whether m gives its GPUs back with vLLM's sleep mode (an
// on-demand model with sleep_level 1 or 2) rather than by stopping.
func (m Model) Sleeps() bool { return m.OnDemand() && m.SleepLevel > 0 }

// Restart is a model's restart policy.
type Restart struct {
	Delay            time.Duration `koanf:"delay"`
	MaxDelay         time.Duration `koanf:"max_delay"`
	ResetAfter       time.Duration `koanf:"reset_after"`
	Burst            int           `koanf:"burst"`
	Interval         time.Duration `koanf:"interval"`
	RetryFailedAfter time.Duration `koanf:"retry_failed_after"`
}

// Probe is a model's health-probe policy.
type Probe struct {
	Path             string        `koanf:"path"`
	Period           time.Duration `koanf:"period"`
	Timeout          time.Duration `koanf:"timeout"`
	FailureThreshold int           `koanf:"failure_threshold"`
	StartupTimeout   time.Duration `koanf:"startup_timeout"`
	// DeepPeriod enables the deep probe: a one-token completion this often,
	// skipped when the model finished requests since the last one. 0 = off.
	DeepPeriod  time.Duration `koanf:"deep_period"`
	DeepTimeout time.Duration `koanf:"deep_timeout"`
}

// GPURef pins a model to a GPU by index ("0") or by UUID ("GPU-…").
type GPURef string

// Model returns the named model.
func (c *Config) Model(name string) (Model, bool) {
	for _, m := range c.Models {
		if m.Name == name {
			return m, true
		}
	}
	return Model{}, false
}

// LongestStopTimeout is the largest stop_timeout of any model; the systemd
// unit's TimeoutStopSec must exceed it.
func (c *Config) LongestStopTimeout() time.Duration {
	var d time.Duration
	for _, m := range c.Models {
		d = max(d, m.StopTimeout)
	}
	return d
}

// builtin holds the defaults every configuration starts from. Keys here are
// the contract of docs/configuration.md; a file only needs to say what differs.
func builtin() map[string]any {
	return map[string]any{
		"listen":                    "127.0.0.1:9400",
		"control_socket":            "/run/citadel/supervisor.sock",
		"control_socket_group":      "",
		"control_socket_read_group": "",
		"log":                       map[string]any{"level": "info", "format": "json"},
		"gpu": map[string]any{
			"backend":         "nvml",
			"headroom":        "1GiB",
			"release_timeout": "60s",
			"visible_devices": VisibleIndex,
			"sim":             map[string]any{"devices": []any{}, "state_file": ""},
		},
		"gateway":           builtinGateway(),
		"sleep_host_memory": "0",
		"cache_dir":         "",
	}
}

// builtinModel holds the defaults every model starts from.
func builtinModel() map[string]any {
	return map[string]any{
		"command":      []any{"/opt/citadel/vllm-env/bin/python", "-m", "vllm.entrypoints.openai.api_server"},
		"host":         "127.0.0.1",
		"env":          map[string]any{},
		"env_files":    []any{},
		"stop_timeout": "30s",
		"restart": map[string]any{
			"delay":              "10s",
			"max_delay":          "5m",
			"reset_after":        "10m",
			"burst":              5,
			"interval":           "30m",
			"retry_failed_after": "1h",
		},
		"probe": map[string]any{
			"path":              "/health",
			"period":            "10s",
			"timeout":           "5s",
			"failure_threshold": 3,
			"startup_timeout":   "20m",
			"deep_period":       "0s",
			"deep_timeout":      "30s",
		},
		"tensor_parallel":        1,
		"gpu_memory_utilization": 0.9,
		"max_model_len":          0,
		"args":                   []any{},
		"gpus":                   []any{},
		"priority":               0,
		"enabled":                true,
		"max_concurrency":        0,
		"activation":             ActivationAlways,
		"sleep_level":            1,
		"idle_after":             "10m",
		"min_awake":              "1m",
		"wake_timeout":           "0s",
	}
}

// modelOnlyKeys may appear on a model but not under `defaults:`: they name
// one model's files, port or GPUs, so sharing them would always be a mistake.
var modelOnlyKeys = map[string]bool{
	"model": true, "served_name": true, "port": true, "vllm_port": true, "gpus": true,
}
