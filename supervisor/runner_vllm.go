package supervisor

import (
	"fmt"
	"strconv"
	"strings"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/lifecycle"
	"citadel-supervisor/vllm"
)

// learn looks the model's vLLM version up on a goroutine of its own (it
// starts the model's interpreter) and reports it as EvLearned.
func (l *loop) learn(m config.Model, seq int) {
	d := l.r.d
	v, err := d.versions.learn(l.ctx, m, d.environ, d.reaper.Start)
	select {
	case l.results <- lifecycle.EvLearned{Seq: seq, Version: v, Err: err}:
	case <-l.ctx.Done(): // shutting down: nothing will start
	}
}

// loadKey reads the API key of a process taken over from a predecessor:
// its env_files as they are now (a rotated file restarts the model
// anyway), its env and args.
func (r *runner) loadKey(m config.Model) {
	secrets, err := loadEnvFiles(m.EnvFiles)
	if err != nil {
		r.log.Warn("cannot read the env files of a model taken over: its API key, if one is there, is not sent", zap.Error(err))
	}
	key := m.APIKey(secrets)
	r.apiKey.Store(&key)
}

// visibleDevices is what the child's CUDA_VISIBLE_DEVICES lists for gpus
// (placed UUIDs, or pins with backend none): NVML indices, worked out at
// each spawn from the latest readings (CUDA_DEVICE_ORDER=PCI_BUS_ID makes
// CUDA's index NVML's), or the UUIDs themselves with gpu.visible_devices:
// uuid where the model's vLLM resolves them (0.24, vllm#45026). note says
// what could not be done as configured.
func (d *deps) visibleDevices(gpus []string, v lifecycle.VLLM) (out []string, note string) {
	if len(gpus) == 0 {
		return nil, ""
	}
	if d.visible == config.VisibleUUID {
		if !v.Known() || v.Version.Has(vllm.UUIDDevices) {
			return gpus, ""
		}
		note = fmt.Sprintf("gpu.visible_devices: uuid needs vLLM %s (vllm#45026); %s gets NVML indices", vllm.UUIDDevices.Since, v.Version)
	}
	var unmapped []string
	for _, g := range gpus {
		if _, err := strconv.Atoi(g); err == nil {
			out = append(out, g) // a pin by index, with no readings
			continue
		}
		if i, ok := d.gpuIndex(g); ok {
			out = append(out, strconv.Itoa(i))
			continue
		}
		out = append(out, g)
		unmapped = append(unmapped, g)
	}
	if len(unmapped) > 0 {
		note = strings.TrimPrefix(note+"; ", "; ") + fmt.Sprintf("no GPU readings give the index of %s: passed as UUID (a vLLM before %s dies at start on it; pin by index with gpu.backend none)",
			strings.Join(unmapped, ", "), vllm.UUIDDevices.Since)
	}
	return out, note
}
