package main

import (
	"errors"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
	"citadel-supervisor/gpu/nvmlgpu"
)

// openGPUs builds the configured GPU backend. With backend nvml and no
// usable NVML, the daemon still runs (every enabled model starts, without
// placement) and says so loudly: the returned reason is shown in status,
// gpus and the log.
//
// status is citadel_gpu_backend_info's: no_driver, error or disabled.
func openGPUs(cfg *config.Config, log *zap.Logger) (b *nvmlgpu.Backend, why, status string) {
	switch cfg.GPU.Backend {
	case "nvml":
		b, err := nvmlgpu.Open(nvml.New(), log.Named("nvml"))
		if err != nil {
			why, status = "NVML unavailable, running WITHOUT GPU placement or memory checks: "+err.Error(), "error"
			if errors.Is(err, gpu.ErrNoDriver) {
				why, status = "no NVIDIA driver (NVML not found): running WITHOUT GPU placement or memory checks", "no_driver"
			}
			log.Error(why, zap.Error(err))
			return nil, why, status
		}
		return b, "", "ok"
	case "none":
		return nil, "gpu.backend is none: no GPU readings, no placement", "disabled"
	}
	return nil, "", "ok" // sim: the supervisor reads the declared devices
}
