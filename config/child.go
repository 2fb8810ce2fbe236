package config

import (
	"maps"
	"slices"
	"strconv"
	"strings"
)

// What the supervisor owns of a child's command line and environment
// (docs/configuration.md, "What the child gets"), listed once: Argv and ChildEnv build them from these tables and
// Validate refuses a model that sets them itself in args or env, so a
// flag added here is both passed and guarded.

// ownedFlag is a vLLM flag the supervisor builds from one of a model's keys.
type ownedFlag struct {
	flag  string
	key   string                     // the model key it is built from
	value func(Model) (string, bool) // false leaves the flag out; "" passes the flag alone
}

var ownedFlags = []ownedFlag{
	{"--model", "model", func(m Model) (string, bool) { return m.Path, true }},
	{"--host", "host", func(m Model) (string, bool) { return m.Host, true }},
	{"--port", "port", func(m Model) (string, bool) { return strconv.Itoa(m.Port), true }},
	{"--served-model-name", "served_name", func(m Model) (string, bool) { return m.ServedName, true }},
	{"--tensor-parallel-size", "tensor_parallel", func(m Model) (string, bool) { return strconv.Itoa(m.TensorParallel), true }},
	{"--gpu-memory-utilization", "gpu_memory_utilization", func(m Model) (string, bool) {
		return strconv.FormatFloat(m.GPUMemoryUtilization, 'f', -1, 64), true
	}},
	// max_model_len 0 leaves the choice to vLLM.
	{"--max-model-len", "max_model_len", func(m Model) (string, bool) { return strconv.Itoa(m.MaxModelLen), m.MaxModelLen > 0 }},
	// vLLM's sleep mode, for on-demand models that sleep rather than stop.
	{"--enable-sleep-mode", "activation", func(m Model) (string, bool) { return "", m.Sleeps() }},
}

// ownedFlagKey returns the model key that flag is built from, if the
// supervisor owns flag.
func ownedFlagKey(flag string) (string, bool) {
	for _, f := range ownedFlags {
		if f.flag == flag {
			return f.key, true
		}
	}
	return "", false
}

// ownedVar is an environment variable the supervisor sets in every child.
// Besides these, every EnvPrefix variable is the supervisor's.
type ownedVar struct {
	name  string
	hint  string                               // what an operator sets instead, for Validate's message
	value func(Model, []string) (string, bool) // from the model and its placed GPUs; false leaves it unset
}

var ownedVars = []ownedVar{
	// The placed GPUs as the child must name them: NVML indices (with
	// PCI_BUS_ID order CUDA's index is NVML's; vLLM before 0.24 calls int()
	// on every entry, vllm#13815), or UUIDs with gpu.visible_devices: uuid.
	// The caller works them out at each spawn. With no GPUs placed
	// (backend none, no pins) the inherited value stands.
	{"CUDA_VISIBLE_DEVICES", "set gpus instead", func(_ Model, gpus []string) (string, bool) {
		return strings.Join(gpus, ","), len(gpus) > 0
	}},
	{"CUDA_DEVICE_ORDER", "the supervisor always sets PCI_BUS_ID", func(Model, []string) (string, bool) { return "PCI_BUS_ID", true }},
	{"VLLM_PORT", "set vllm_port instead", func(m Model, _ []string) (string, bool) { return strconv.Itoa(m.VLLMPortStart()), true }},
	// vLLM serves /sleep, /wake_up and /is_sleeping only in its development
	// mode; the gateway never forwards them.
	{"VLLM_SERVER_DEV_MODE", "set activation: on_demand instead", func(m Model, _ []string) (string, bool) { return "1", m.Sleeps() }},
}

// ownedVarHint returns why a model may not set name, if the supervisor
// owns it.
func ownedVarHint(name string) (string, bool) {
	for _, v := range ownedVars {
		if v.name == name {
			return v.hint, true
		}
	}
	return "", false
}

// Argv is the child's command line (docs/configuration.md): command, then the flags the
// supervisor owns, then the model's args.
func (m Model) Argv() []string {
	out := slices.Clone(m.Command)
	for _, f := range ownedFlags {
		if v, ok := f.value(m); ok && v == "" {
			out = append(out, f.flag)
		} else if ok {
			out = append(out, f.flag, v)
		}
	}
	return append(out, m.Args...)
}

// inheritedDrop reports whether a variable of the daemon's own environment
// must not reach a child: systemd's protocol variables belong to the daemon
// (a child answering NOTIFY_SOCKET would confuse systemd), JOURNAL_STREAM
// would tell the child its stderr is the journal when it is a pipe to the
// daemon, and EnvPrefix variables configure the daemon.
func inheritedDrop(key string) bool {
	switch {
	case key == "NOTIFY_SOCKET", key == "JOURNAL_STREAM", key == "INVOCATION_ID":
		return true
	case strings.HasPrefix(key, "WATCHDOG_"), strings.HasPrefix(key, "LISTEN_"):
		return true
	case strings.HasPrefix(key, EnvPrefix):
		return true
	}
	return false
}

// CacheRootVar is vLLM's cache directory variable.
const CacheRootVar = "VLLM_CACHE_ROOT"

// APIKeyVar is vLLM's API key variable: with it (or --api-key), vLLM wants
// Authorization: Bearer on every /v1 route.
const APIKeyVar = "VLLM_API_KEY"

// APIKey is the key the model's vLLM requires of its clients, "" when
// none: --api-key in args (vLLM lets it win over the variable), else
// VLLM_API_KEY from env, else from the env_files values (secrets). The
// daemon sends it on every call it makes to the model; it never shows it.
func (m Model) APIKey(secrets map[string]string) string {
	for i, a := range m.Args {
		if v, ok := strings.CutPrefix(a, "--api-key="); ok {
			return v
		}
		if a == "--api-key" && i+1 < len(m.Args) {
			return m.Args[i+1]
		}
	}
	if v := m.Env[APIKeyVar]; v != "" {
		return v
	}
	return secrets[APIKeyVar]
}

// ChildEnv is the child's environment (docs/configuration.md), sorted: base (the daemon's
// own) minus systemd's and EnvPrefix variables, then secrets (the env_files
// values: they go here and nowhere else), env, the variables the supervisor
// owns for the GPUs placed, and last own: the supervisor's EnvPrefix
// variables for this instance (its marker).
func (m Model) ChildEnv(base []string, secrets map[string]string, gpus []string, own map[string]string) []string {
	env := map[string]string{}
	for _, kv := range base {
		k, v, _ := strings.Cut(kv, "=")
		if !inheritedDrop(k) {
			env[k] = v
		}
	}
	// Each model its own compile caches (they race between instances,
	// vllm#24601), where they survive restarts; an operator's own
	// VLLM_CACHE_ROOT in env or env_files wins.
	if m.CacheRoot != "" {
		env[CacheRootVar] = m.CacheRoot
	}
	maps.Copy(env, secrets)
	maps.Copy(env, m.Env)
	for _, o := range ownedVars {
		if v, ok := o.value(m, gpus); ok {
			env[o.name] = v
		}
	}
	maps.Copy(env, own)
	out := make([]string, 0, len(env))
	for _, k := range slices.Sorted(maps.Keys(env)) {
		out = append(out, k+"="+env[k])
	}
	return out
}
