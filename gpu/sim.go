package gpu

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
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

// SimProcess is what the sim backend reads of a process in the process
// table: its argv and its environment (KEY=VALUE each).
type SimProcess struct {
	PID  int
	Args []string
	Env  []string
}

// Sim reads GPUs declared in the configuration and, like a driver, finds
// the processes using them itself (see the package doc): a process that
// names sim GPUs in CUDA_VISIBLE_DEVICES and has --gpu-memory-utilization U
// in its argv uses U × each such GPU's total, under its pid. Only the
// daemon's own descendants are looked at. The optional state file adds
// memory used by others and can mark a GPU down, so tests and demos can make
// memory scarce or a GPU fail at will. Both are re-read on every Read.
//
// State file, JSON:
//
//	{"used": {"GPU-…": "20GiB"}, "down": ["GPU-…"]}
type Sim struct {
	devices   []config.SimDevice
	stateFile string
	usageDir  string
	uses      func() []SimUse
	procs     func() ([]SimProcess, error) // the processes that may use the GPUs
	ledgerErr error                        // the ledger's devices could not be written
}

var _ Reader = (*Sim)(nil)

// NewSim returns the sim backend for cfg. With uses nil, it finds the
// processes using its GPUs in the process table, among the daemon's
// descendants. A non-nil uses instead says what runs where (the caller
// keeps that state); it is kept for callers that still do.
//
// With a usage_dir it writes the declared GPUs there (devices.json), for
// the processes that keep the ledger of held memory (SimLedger).
func NewSim(cfg config.GPU, uses func() []SimUse) *Sim {
	s := &Sim{devices: cfg.Sim.Devices, stateFile: cfg.Sim.StateFile, usageDir: cfg.Sim.UsageDir, uses: uses, procs: descendantProcesses()}
	if s.usageDir != "" {
		if err := (SimLedger{Dir: s.usageDir}).writeDevices(s.devices, s.stateFile); err != nil {
			s.ledgerErr = fmt.Errorf("gpu.sim.usage_dir: %w", err)
		}
	}
	return s
}

type simState struct {
	Used map[string]config.ByteSize `json:"used"`
	Down []string                   `json:"down"`
}

// Read returns the declared devices with the models' shares and the state
// file's extra usage.
func (s *Sim) Read(context.Context) ([]Device, error) {
	if s.ledgerErr != nil {
		return nil, s.ledgerErr
	}
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
	} else {
		procs, err := s.procs()
		if err != nil {
			return nil, fmt.Errorf("sim GPUs: read the process table: %w", err)
		}
		seen := map[int]bool{}
		for _, p := range procs {
			util, uuids, ok := simClaim(p)
			if !ok {
				continue
			}
			uuids = s.byIndex(uuids)
			seen[p.PID] = true
			for i := range out {
				if slices.Contains(uuids, out[i].UUID) {
					b := Share(util, out[i].MemoryTotal)
					if override, overridden := s.usage(p.PID, out[i].UUID); overridden {
						b = min(override, out[i].MemoryTotal)
					}
					out[i].MemoryUsed += b
					out[i].Processes = append(out[i].Processes, Process{PID: p.PID, UsedMemory: b})
				}
			}
		}
		if err := s.ledgerHolders(out, seen); err != nil {
			return nil, err
		}
	}
	for i := range out {
		out[i].MemoryUsed = min(out[i].MemoryUsed, out[i].MemoryTotal)
		out[i].MemoryFree = out[i].MemoryTotal - out[i].MemoryUsed
	}
	return out, nil
}

// byIndex turns the entries of a CUDA_VISIBLE_DEVICES that are indices
// into the UUIDs of the declared devices at those positions, as the driver
// (with CUDA_DEVICE_ORDER=PCI_BUS_ID) maps indices to devices in bus order.
func (s *Sim) byIndex(entries []string) []string {
	out := make([]string, 0, len(entries))
	for _, e := range entries {
		if i, err := strconv.Atoi(e); err == nil {
			if i >= 0 && i < len(s.devices) {
				out = append(out, s.devices[i].UUID)
			}
			continue
		}
		out = append(out, e)
	}
	return out
}

// ledgerHolders adds the live processes of the ledger that are not the
// daemon's descendants: models a predecessor started, adopted after its
// death (re-parented, they are nobody's descendants now), hold memory as
// a driver would still show. Their line says on which GPUs.
func (s *Sim) ledgerHolders(out []Device, seen map[int]bool) error {
	if s.usageDir == "" {
		return nil
	}
	all, err := SimLedger{Dir: s.usageDir}.read()
	if err != nil {
		return fmt.Errorf("gpu.sim.usage_dir: %w", err)
	}
	for _, pid := range slices.Sorted(maps.Keys(all)) {
		if seen[pid] {
			continue
		}
		for i := range out {
			if b, ok := all[pid].ByGPU[out[i].UUID]; ok {
				b = min(b, out[i].MemoryTotal)
				out[i].MemoryUsed += b
				out[i].Processes = append(out[i].Processes, Process{PID: pid, UsedMemory: b})
			}
		}
	}
	return nil
}

// usage is what pid's line in the ledger (usage_dir) says it holds on
// the GPU uuid now (a sleeping fake-vllm's residue, a loaded one's share).
func (s *Sim) usage(pid int, uuid string) (uint64, bool) {
	if s.usageDir == "" {
		return 0, false
	}
	h, ok := SimLedger{Dir: s.usageDir}.holding(pid)
	if !ok {
		return 0, false
	}
	return h.on(uuid)
}

func (s *Sim) state() (simState, error) { return readSimState(s.stateFile) }

// simClaim reads what p would hold on GPUs as a vLLM server: the
// --gpu-memory-utilization of its argv, on every GPU that its
// CUDA_VISIBLE_DEVICES names (by UUID, or by index: see byIndex). ok is false for any other process
// (vLLM's own workers and EngineCore have neither in their argv).
func simClaim(p SimProcess) (util float64, uuids []string, ok bool) {
	for i, a := range p.Args {
		v, found := strings.CutPrefix(a, "--gpu-memory-utilization=")
		if !found && a == "--gpu-memory-utilization" && i+1 < len(p.Args) {
			v, found = p.Args[i+1], true
		}
		if found {
			u, err := strconv.ParseFloat(v, 64)
			if err == nil && u > 0 && u <= 1 {
				util, ok = u, true
			}
		}
	}
	if !ok {
		return 0, nil, false
	}
	// The first assignment wins, as with getenv (which the CUDA runtime uses).
	visible, found := "", false
	for _, e := range p.Env {
		if v, ok := strings.CutPrefix(e, "CUDA_VISIBLE_DEVICES="); ok {
			visible, found = v, true
			break
		}
	}
	if !found {
		return 0, nil, false
	}
	for u := range strings.SplitSeq(visible, ",") {
		if u = strings.TrimSpace(u); u != "" {
			uuids = append(uuids, u)
		}
	}
	if len(uuids) == 0 {
		return 0, nil, false // CUDA_VISIBLE_DEVICES="" hides every GPU
	}
	return util, uuids, true
}
