package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
	"citadel-supervisor/gpu/nvmlgpu"
	"citadel-supervisor/supervisor"
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

// printPlacement shows what --check would place on the GPUs seen now.
func printPlacement(w io.Writer, cfg *config.Config, log *zap.Logger) {
	var reader gpu.Reader
	switch cfg.GPU.Backend {
	case "sim":
		reader = gpu.NewSim(cfg.GPU, nil)
	default:
		b, why, _ := openGPUs(cfg, log)
		if b == nil {
			fmt.Fprintf(w, "placement: %s; every enabled model starts\n", why)
			return
		}
		defer b.Close()
		reader = b
	}
	devs, err := reader.Read(context.Background())
	if err != nil {
		fmt.Fprintf(w, "placement: cannot read the GPUs: %v\n", err)
		return
	}
	slots := make([]gpu.Slot, len(devs))
	var names []string
	for i, d := range devs {
		slots[i] = gpu.Slot{Device: d}
		state := ""
		if !d.Up {
			state = ", DOWN: " + d.Err
		}
		names = append(names, fmt.Sprintf("GPU%d %s %s free of %s%s", d.Index, d.Name, config.ByteSize(d.MemoryFree), config.ByteSize(d.MemoryTotal), state))
	}
	var reqs []gpu.Request
	for _, m := range cfg.Models {
		if m.Enabled {
			reqs = append(reqs, supervisor.PlacementRequest(m))
		}
	}
	fmt.Fprintf(w, "GPUs now (%s backend):\n  %s\n", cfg.GPU.Backend, strings.Join(names, "\n  "))
	fmt.Fprintln(w, "placement it would make, in priority order:")
	for _, d := range gpu.Resident(reqs, slots, cfg.GPU.Headroom) {
		if d.GPUs == nil {
			fmt.Fprintf(w, "  %-12s pending: %s\n", d.Name, d.Reason)
			continue
		}
		var g []string
		for _, i := range d.GPUs {
			g = append(g, fmt.Sprintf("GPU%d", slots[i].Index))
		}
		fmt.Fprintf(w, "  %-12s %s\n", d.Name, strings.Join(g, ","))
	}
	for _, m := range cfg.Models {
		if !m.Enabled {
			fmt.Fprintf(w, "  %-12s stopped: enabled: false\n", m.Name)
		}
	}
}
