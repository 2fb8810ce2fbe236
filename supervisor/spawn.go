package supervisor

import (
	"maps"
	"slices"
	"strconv"
	"strings"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/proc"
)

// argv builds the child's command line (SPEC §2): command, then the flags
// the supervisor owns, then the model's args.
func argv(m config.Model) []string {
	out := slices.Clone(m.Command)
	out = append(out,
		"--model", m.Path,
		"--host", m.Host,
		"--port", strconv.Itoa(m.Port),
		"--served-model-name", m.ServedName,
		"--tensor-parallel-size", strconv.Itoa(m.TensorParallel),
		"--gpu-memory-utilization", strconv.FormatFloat(m.GPUMemoryUtilization, 'f', -1, 64),
	)
	if m.MaxModelLen > 0 {
		out = append(out, "--max-model-len", strconv.Itoa(m.MaxModelLen))
	}
	return append(out, m.Args...)
}

// inheritedDrop reports whether a variable of the daemon's own environment
// must not reach a child: systemd's protocol variables belong to the daemon
// (a child answering NOTIFY_SOCKET would confuse systemd), JOURNAL_STREAM
// would tell the child its stderr is the journal when it is a pipe to us,
// and CITADEL_* configure the daemon.
func inheritedDrop(key string) bool {
	switch {
	case key == "NOTIFY_SOCKET", key == "JOURNAL_STREAM", key == "INVOCATION_ID":
		return true
	case strings.HasPrefix(key, "WATCHDOG_"), strings.HasPrefix(key, "LISTEN_"):
		return true
	case strings.HasPrefix(key, config.EnvPrefix):
		return true
	}
	return false
}

// childEnv builds the child's environment (SPEC §2): the daemon's, minus
// systemd's, plus env_files, env, then what the supervisor owns. secrets are
// the env_files values: they go here and nowhere else.
func childEnv(base []string, m config.Model, secrets map[string]string, gpus []string, marker string) []string {
	env := map[string]string{}
	for _, kv := range base {
		k, v, _ := strings.Cut(kv, "=")
		if !inheritedDrop(k) {
			env[k] = v
		}
	}
	maps.Copy(env, secrets)
	maps.Copy(env, m.Env)
	if len(gpus) > 0 {
		env["CUDA_VISIBLE_DEVICES"] = strings.Join(gpus, ",")
	}
	env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
	env["VLLM_PORT"] = strconv.Itoa(m.VLLMPort)
	env[proc.MarkerEnv] = marker
	out := make([]string, 0, len(env))
	for _, k := range sortedKeys(env) {
		out = append(out, k+"="+env[k])
	}
	return out
}

func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}
