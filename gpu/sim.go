package gpu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"slices"
	"strings"

	"citadel-supervisor/config"
)

// SimUse is a running model's use of the simulated GPUs: its main process
// holds Bytes on each GPU in UUIDs, as a loaded vLLM would.
type SimUse struct {
	PID   int
	UUIDs []string
	Bytes uint64
}

// Sim reads GPUs declared in the configuration. Running models' shares come
// from uses (the supervisor provides it); the optional state file adds
// memory used by others and can mark a GPU down, so tests and demos can make
// memory scarce or a GPU fail at will. It is re-read on every Read.
//
// State file, JSON:
//
//	{"used": {"GPU-…": "20GiB"}, "down": ["GPU-…"]}
type Sim struct {
	devices   []config.SimDevice
	stateFile string
	uses      func() []SimUse
}

var _ Reader = (*Sim)(nil)

// NewSim returns the sim backend for cfg; uses may be nil (no models).
func NewSim(cfg config.GPU, uses func() []SimUse) *Sim {
	return &Sim{devices: cfg.Sim.Devices, stateFile: cfg.Sim.StateFile, uses: uses}
}

type simState struct {
	Used map[string]config.ByteSize `json:"used"`
	Down []string                   `json:"down"`
}

// Read returns the declared devices with the models' shares and the state
// file's extra usage.
func (s *Sim) Read(context.Context) ([]Device, error) {
	st, err := s.state()
	if err != nil {
		return nil, err
	}
	out := make([]Device, len(s.devices))
	for i, d := range s.devices {
		// Sensors a simulated GPU does not have are left unreadable (-1),
		// so no invented temperature or power reaches a dashboard.
		dev := Device{
			Index: i, UUID: d.UUID, Name: d.Name, PCIBusID: fmt.Sprintf("00000000:%02X:00.0", i+1),
			MemoryTotal: uint64(d.Memory), Utilization: -1, Temperature: -1, PowerWatts: -1, Up: true, Processes: []Process{},
		}
		if dev.Name == "" {
			dev.Name = "Sim GPU"
		}
		for _, u := range st.Down {
			if u == d.UUID {
				dev.Up, dev.Err = false, "marked down in "+s.stateFile
			}
		}
		dev.MemoryUsed = uint64(st.Used[d.UUID])
		out[i] = dev
	}
	if s.uses != nil {
		for _, u := range s.uses() {
			for i := range out {
				if slices.Contains(u.UUIDs, out[i].UUID) {
					out[i].MemoryUsed += u.Bytes
					out[i].Processes = append(out[i].Processes, Process{PID: u.PID, UsedMemory: u.Bytes})
				}
			}
		}
	}
	for i := range out {
		out[i].MemoryUsed = min(out[i].MemoryUsed, out[i].MemoryTotal)
		out[i].MemoryFree = out[i].MemoryTotal - out[i].MemoryUsed
	}
	return out, nil
}

func (s *Sim) state() (simState, error) {
	var st simState
	if s.stateFile == "" {
		return st, nil
	}
	b, err := os.ReadFile(s.stateFile)
	if errors.Is(err, fs.ErrNotExist) {
		return st, nil // no extra usage yet
	}
	if err != nil {
		return st, fmt.Errorf("gpu.sim.state_file: %w", err)
	}
	if len(strings.TrimSpace(string(b))) == 0 {
		return st, nil
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("gpu.sim.state_file %s: %w", s.stateFile, err)
	}
	return st, nil
}
