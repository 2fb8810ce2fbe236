package gpu

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"citadel-supervisor/config"
)

// SimLedger is the sim backend's ledger of GPU memory, kept in its
// usage_dir: one file per process, named by its pid, saying what that
// process holds on each simulated GPU now, and devices.json, the GPUs the
// sim declares (written by NewSim). The sim reads it as a driver reports
// memory. A fake model (fake-vllm) writes its own line when it allocates,
// sleeps, wakes and exits, and refuses an allocation that would not fit
// (it exits as CUDA does on out-of-memory), so a supervisor that overcommits
// a GPU fails loudly in every test that uses the ledger.
//
// A process's file, JSON:
//
//	{"bytes": N, "by_gpu": {"GPU-…": N}, "start": T}
//
// bytes is held on each of its GPUs unless by_gpu says otherwise; start is
// its /proc start time (a file whose process is gone, or whose pid was
// reused, holds nothing). A file with bytes alone (a sleeper's residue, as
// fake-vllm wrote it before the ledger) still counts.
type SimLedger struct{ Dir string }

// SimHolding is one process's line in the ledger.
type SimHolding struct {
	Bytes *uint64           `json:"bytes"`
	ByGPU map[string]uint64 `json:"by_gpu,omitempty"`
	Start uint64            `json:"start,omitempty"`
}

// on is what h holds on the GPU uuid, and whether it says.
func (h SimHolding) on(uuid string) (uint64, bool) {
	if b, ok := h.ByGPU[uuid]; ok {
		return b, true
	}
	if h.Bytes != nil {
		return *h.Bytes, true
	}
	return 0, false
}

// SimLedgerDevice is one declared GPU, as devices.json lists it.
type SimLedgerDevice struct {
	Index  int    `json:"index"`
	UUID   string `json:"uuid"`
	Memory uint64 `json:"memory"`
}

type simDevices struct {
	Devices   []SimLedgerDevice `json:"devices"`
	StateFile string            `json:"state_file,omitempty"`
}

const simDevicesFile = "devices.json"

// OutOfMemoryError is an allocation the ledger refused: it would take a
// GPU past its memory.
type OutOfMemoryError struct {
	UUID               string
	Index              int
	Asked, Held, Total uint64
	Holders            map[int]uint64 // pid → bytes, the other processes on that GPU
	Extra              uint64         // the state file's "used" for that GPU
}

func (e *OutOfMemoryError) Error() string {
	return fmt.Sprintf("CUDA out of memory on GPU%d (%s): tried to allocate %s; %s of %s held by other processes %v (%s by others outside the ledger)",
		e.Index, e.UUID, config.ByteSize(e.Asked), config.ByteSize(e.Held), config.ByteSize(e.Total), e.Holders, config.ByteSize(e.Extra))
}

// writeDevices records the declared GPUs (and the state file) for the
// processes that keep the ledger.
func (l SimLedger) writeDevices(devs []config.SimDevice, stateFile string) error {
	var d simDevices
	for i, dev := range devs {
		d.Devices = append(d.Devices, SimLedgerDevice{Index: i, UUID: dev.UUID, Memory: uint64(dev.Memory)})
	}
	d.StateFile = stateFile
	b, err := json.Marshal(d)
	if err != nil {
		return err
	}
	p := filepath.Join(l.Dir, simDevicesFile)
	tmp := fmt.Sprintf("%s.%d.tmp", p, os.Getpid())
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, p)
}

func (l SimLedger) devices() (simDevices, error) {
	var d simDevices
	b, err := os.ReadFile(filepath.Join(l.Dir, simDevicesFile))
	if err != nil {
		return d, fmt.Errorf("sim ledger: %w (the sim backend writes it when the daemon starts)", err)
	}
	if err := json.Unmarshal(b, &d); err != nil {
		return d, fmt.Errorf("sim ledger %s: %w", simDevicesFile, err)
	}
	return d, nil
}

// Resolve maps a CUDA_VISIBLE_DEVICES value (UUIDs or indexes) to the
// declared GPUs it names.
func (l SimLedger) Resolve(visible string) ([]SimLedgerDevice, error) {
	d, err := l.devices()
	if err != nil {
		return nil, err
	}
	var out []SimLedgerDevice
	for v := range strings.SplitSeq(visible, ",") {
		v = strings.TrimSpace(v)
		if v == "" {
			continue
		}
		i := slices.IndexFunc(d.Devices, func(dev SimLedgerDevice) bool {
			return dev.UUID == v || strconv.Itoa(dev.Index) == v
		})
		if i < 0 {
			return nil, fmt.Errorf("CUDA_VISIBLE_DEVICES names %q, not a declared sim GPU", v)
		}
		out = append(out, d.Devices[i])
	}
	if len(out) == 0 {
		return nil, errors.New("CUDA_VISIBLE_DEVICES names no GPU")
	}
	return out, nil
}

// read returns every live process's holding, by pid.
func (l SimLedger) read() (map[int]SimHolding, error) {
	ents, err := os.ReadDir(l.Dir)
	if err != nil {
		return nil, err
	}
	out := map[int]SimHolding{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		h, ok := l.holding(pid)
		if !ok || !simAlive(pid, h.Start) {
			continue
		}
		out[pid] = h
	}
	return out, nil
}

// holding reads pid's line.
func (l SimLedger) holding(pid int) (SimHolding, bool) {
	var h SimHolding
	b, err := os.ReadFile(filepath.Join(l.Dir, strconv.Itoa(pid)))
	if err != nil || json.Unmarshal(b, &h) != nil || (h.Bytes == nil && h.ByGPU == nil) {
		return h, false
	}
	return h, true
}

// Held sums what the live processes hold, by GPU UUID.
func (l SimLedger) Held() (map[string]uint64, error) {
	all, err := l.read()
	if err != nil {
		return nil, err
	}
	d, err := l.devices()
	if err != nil {
		return nil, err
	}
	out := map[string]uint64{}
	for _, h := range all {
		for _, dev := range d.Devices {
			if b, ok := h.ByGPU[dev.UUID]; ok {
				out[dev.UUID] += b
			}
		}
	}
	return out, nil
}

// Others is what live processes other than pid hold on each GPU of uuids,
// with the state file's extra: what a process sees of its neighbours.
func (l SimLedger) Others(pid int, uuids []string) (map[string]uint64, error) {
	all, err := l.read()
	if err != nil {
		return nil, err
	}
	d, err := l.devices()
	if err != nil {
		return nil, err
	}
	st, err := readSimState(d.StateFile)
	if err != nil {
		return nil, err
	}
	out := map[string]uint64{}
	for _, u := range uuids {
		out[u] = uint64(st.Used[u])
		for p, h := range all {
			if p == pid {
				continue
			}
			if b, ok := h.ByGPU[u]; ok {
				out[u] += b
			}
		}
	}
	return out, nil
}

// Hold records that pid (started at start, its /proc start time) holds
// bytes on each GPU of the map. With check it refuses, changing nothing,
// when that would take a GPU past its memory: what every other live
// process holds there, plus the state file's extra, plus bytes. The check
// and the write happen under an exclusive lock on the ledger, so two
// allocations never both pass on memory only one of them fits in.
func (l SimLedger) Hold(pid int, start uint64, bytes map[string]uint64, check bool) error {
	unlock, err := simLock(l.Dir)
	if err != nil {
		return err
	}
	defer unlock()
	if check {
		d, err := l.devices()
		if err != nil {
			return err
		}
		all, err := l.read()
		if err != nil {
			return err
		}
		st, err := readSimState(d.StateFile)
		if err != nil {
			return err
		}
		for _, dev := range d.Devices {
			want, ok := bytes[dev.UUID]
			if !ok {
				continue
			}
			held, holders := uint64(st.Used[dev.UUID]), map[int]uint64{}
			for p, h := range all {
				if p == pid {
					continue
				}
				if b := h.ByGPU[dev.UUID]; b > 0 {
					held += b
					holders[p] = b
				}
			}
			if held+want > dev.Memory {
				return &OutOfMemoryError{UUID: dev.UUID, Index: dev.Index, Asked: want, Held: held, Total: dev.Memory,
					Holders: holders, Extra: uint64(st.Used[dev.UUID])}
			}
		}
	}
	var first uint64
	for _, b := range bytes {
		first = b
		break
	}
	b, err := json.Marshal(SimHolding{Bytes: &first, ByGPU: bytes, Start: start})
	if err != nil {
		return err
	}
	p := filepath.Join(l.Dir, strconv.Itoa(pid))
	if err := os.WriteFile(p+".tmp", b, 0o644); err != nil {
		return err
	}
	return os.Rename(p+".tmp", p)
}

// Release removes pid's line: it holds nothing any more.
func (l SimLedger) Release(pid int) {
	_ = os.Remove(filepath.Join(l.Dir, strconv.Itoa(pid)))
}

// readSimState reads the sim's state file ("" or absent: nothing extra).
func readSimState(path string) (simState, error) {
	var st simState
	if path == "" {
		return st, nil
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return st, nil // no extra usage yet
	}
	if err != nil {
		return st, fmt.Errorf("gpu.sim.state_file: %w", err)
	}
	if len(strings.TrimSpace(string(b))) == 0 {
		return st, nil
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("gpu.sim.state_file %s: %w", path, err)
	}
	return st, nil
}
