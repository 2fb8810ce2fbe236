// Package gpu owns all GPU knowledge: which GPUs a host has, and which a
// model may start on.
//
// Only this package may import go-nvml.
package gpu

import (
	"fmt"
	"slices"
	"strconv"
	"sync"

	"citadel-supervisor/config"
)

// Device is one GPU as operators see it in `citadelctl gpus`.
type Device struct {
	Index       int      `json:"index"`
	UUID        string   `json:"uuid"`
	Name        string   `json:"name"`
	MemoryTotal uint64   `json:"memory_total_bytes"`
	MemoryUsed  uint64   `json:"memory_used_bytes"`
	MemoryFree  uint64   `json:"memory_free_bytes"`
	Models      []string `json:"models"`
}

// Static places models without reading GPU memory: pinned models get their
// pins, others the first tensor_parallel declared devices. It serves
// backend none (pins only) and, until memory-aware placement reads the
// sim state, backend sim, where a placed model's share
// (gpu_memory_utilization × total) counts as used, as a loaded vLLM's would.
type Static struct {
	backend string
	devices []config.SimDevice

	mu     sync.Mutex
	claims map[string]claim // model → its GPUs and share
}

type claim struct {
	uuids []string
	util  float64
}

// NewStatic returns a Static placer for cfg.
func NewStatic(cfg *config.Config) *Static {
	s := &Static{backend: cfg.GPU.Backend, claims: map[string]claim{}}
	if cfg.GPU.Backend == "sim" {
		s.devices = cfg.GPU.Sim.Devices
	}
	return s
}

// Place returns the CUDA_VISIBLE_DEVICES entries for m and records the claim.
func (s *Static) Place(m config.Model) ([]string, error) {
	out, err := s.place(m)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	s.claims[m.Name] = claim{uuids: out, util: m.GPUMemoryUtilization}
	s.mu.Unlock()
	return out, nil
}

func (s *Static) place(m config.Model) ([]string, error) {
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
		if m.TensorParallel > len(s.devices) {
			return nil, fmt.Errorf("needs %d GPUs; the host has %d", m.TensorParallel, len(s.devices))
		}
		out := make([]string, 0, m.TensorParallel)
		for _, d := range s.devices[:m.TensorParallel] {
			out = append(out, d.UUID)
		}
		return out, nil
	}
	out := make([]string, 0, m.TensorParallel)
	for _, g := range m.GPUs[:m.TensorParallel] {
		if i, err := strconv.Atoi(string(g)); err == nil {
			out = append(out, s.devices[i].UUID)
		} else {
			out = append(out, string(g))
		}
	}
	return out, nil
}

// Release forgets name's claim.
func (s *Static) Release(name string) {
	s.mu.Lock()
	delete(s.claims, name)
	s.mu.Unlock()
}

// Devices lists the GPUs with the models placed on them. Backend none has
// no readings and returns none.
func (s *Static) Devices() ([]Device, error) {
	if s.backend != "sim" {
		return nil, fmt.Errorf("gpu.backend is %s: no GPU readings", s.backend)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Device, 0, len(s.devices))
	for i, d := range s.devices {
		dev := Device{Index: i, UUID: d.UUID, Name: d.Name, MemoryTotal: uint64(d.Memory), Models: []string{}}
		for name, c := range s.claims {
			if slices.Contains(c.uuids, d.UUID) {
				dev.Models = append(dev.Models, name)
				dev.MemoryUsed += uint64(c.util * float64(d.Memory))
			}
		}
		slices.Sort(dev.Models)
		dev.MemoryFree = dev.MemoryTotal - min(dev.MemoryUsed, dev.MemoryTotal)
		out = append(out, dev)
	}
	return out, nil
}
