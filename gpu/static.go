// Package gpu owns all GPU knowledge: which GPUs a host has, and which a
// model may start on.
//
// Only this package may import go-nvml.
package gpu

import (
	"fmt"
	"strconv"

	"citadel-supervisor/config"
)

// Static places models without reading GPU memory: pinned models get their
// pins, others the first tensor_parallel declared devices. It serves
// backend none (pins only) and, until memory-aware placement reads the
// sim state, backend sim.
type Static struct {
	backend string
	uuids   []string // declared devices (sim), by index
}

// NewStatic returns a Static placer for cfg.
func NewStatic(cfg *config.Config) *Static {
	s := &Static{backend: cfg.GPU.Backend}
	if cfg.GPU.Backend == "sim" {
		for _, d := range cfg.GPU.Sim.Devices {
			s.uuids = append(s.uuids, d.UUID)
		}
	}
	return s
}

// Place returns the CUDA_VISIBLE_DEVICES entries for m.
func (s *Static) Place(m config.Model) ([]string, error) {
	if s.backend != "sim" {
		// No GPU readings: a pinned model gets its pins as written,
		// an unpinned one sees every GPU, as it would without us.
		out := make([]string, 0, len(m.GPUs))
		for _, g := range m.GPUs {
			out = append(out, string(g))
		}
		return out, nil
	}
	if len(m.GPUs) == 0 {
		if m.TensorParallel > len(s.uuids) {
			return nil, fmt.Errorf("needs %d GPUs; the host has %d", m.TensorParallel, len(s.uuids))
		}
		return append([]string(nil), s.uuids[:m.TensorParallel]...), nil
	}
	out := make([]string, 0, m.TensorParallel)
	for _, g := range m.GPUs[:m.TensorParallel] {
		if i, err := strconv.Atoi(string(g)); err == nil {
			out = append(out, s.uuids[i])
		} else {
			out = append(out, string(g))
		}
	}
	return out, nil
}

// Release is a no-op: Static keeps no claims.
func (s *Static) Release(string) {}
