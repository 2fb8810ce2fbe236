package fakevllm

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	"citadel-supervisor/gpu"
)

// gpuMemory is the fake's GPU memory on the sim backend's ledger
// (--fake-usage-dir, the sim's usage_dir; gpu.SimLedger): what it holds
// on each of the GPUs CUDA_VISIBLE_DEVICES names, as vLLM would. It takes
// its share (gpu_memory_utilization × each GPU's memory) when it loads and
// when it wakes, and its residue (--fake-sleep-residue) while it sleeps.
// When the share does not fit next to what the other processes on the
// ledger hold, it does what CUDA does: it exits with out-of-memory. So a
// supervisor that starts or wakes a model on memory another holds fails
// loudly in every test that keeps the ledger, not only in the soak.
type gpuMemory struct {
	ledger gpu.SimLedger
	pid    int
	start  uint64
	share  map[string]uint64 // by GPU UUID
	uuids  []string
	events *eventLog
}

// newGPUMemory resolves the fake's GPUs; nil without a ledger or GPUs.
func newGPUMemory(o *options, events *eventLog) (*gpuMemory, error) {
	if o.sleep.usageDir == "" {
		return nil, nil
	}
	visible, ok := os.LookupEnv("CUDA_VISIBLE_DEVICES")
	if !ok || visible == "" {
		return nil, nil // no GPU: backend none
	}
	l := gpu.SimLedger{Dir: o.sleep.usageDir}
	devs, err := l.Resolve(visible)
	if err != nil {
		return nil, fmt.Errorf("--fake-usage-dir: %w", err)
	}
	start, _, err := gpu.SimProcStart(os.Getpid())
	if err != nil {
		return nil, err
	}
	m := &gpuMemory{ledger: l, pid: os.Getpid(), start: start, share: map[string]uint64{}, events: events}
	for _, d := range devs {
		// With sleep mode vLLM can size its KV cache above
		// gpu_memory_utilization × total (vllm#40256): --fake-extra-gpu-memory.
		m.share[d.UUID] = min(gpu.Share(o.gpuUtil, d.Memory)+uint64(o.extraGPU), d.Memory)
		m.uuids = append(m.uuids, d.UUID)
	}
	return m, nil
}

// take allocates the full share (a load, a wake); it exits the process as
// CUDA does when that does not fit.
func (m *gpuMemory) take(what string) {
	if m == nil {
		return
	}
	err := m.ledger.Hold(m.pid, m.start, m.share, true)
	var oom *gpu.OutOfMemoryError
	if errors.As(err, &oom) {
		m.events.log("oom", map[string]any{"during": what, "gpu": oom.UUID, "asked": oom.Asked, "held": oom.Held, "total": oom.Total, "holders": oom.Holders})
		fmt.Fprintf(os.Stderr, "ERROR fake-vllm: torch.OutOfMemoryError: %s (during %s)\n", err, what)
		os.Exit(1)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "ERROR fake-vllm: sim ledger: %v\n", err)
		os.Exit(1)
	}
	m.events.log("alloc", map[string]any{"during": what, "bytes": m.share})
}

// keep holds b on each GPU, without a check: a sleeper's residue.
func (m *gpuMemory) keep(b uint64) {
	if m == nil {
		return
	}
	held := map[string]uint64{}
	for _, u := range m.uuids {
		held[u] = min(b, m.share[u])
	}
	if err := m.ledger.Hold(m.pid, m.start, held, false); err != nil {
		fmt.Fprintf(os.Stderr, "fake-vllm: sim ledger: %v\n", err)
	}
}

// profileCheck is vLLM's memory profiling at start (vllm#56830): it
// fails when the memory other processes hold on its GPUs changed while it
// loaded (a neighbour fell asleep, stopped or started meanwhile). before
// is what neighbours said when the load began. It exits as vLLM does.
func (m *gpuMemory) profileCheck(before map[string]uint64) {
	if m == nil {
		return
	}
	after := m.neighbours()
	for u, b := range before {
		if a := after[u]; a != b {
			m.events.log("profile_failed", map[string]any{"gpu": u, "before": b, "after": a})
			fmt.Fprintf(os.Stderr, "ERROR fake-vllm: AssertionError: Error in memory profiling. Initial used memory by others %d MiB, currently %d MiB on %s: another process changed this GPU's memory while vLLM profiled (vllm#56830)\n", b>>20, a>>20, u)
			os.Exit(1)
		}
	}
}

// neighbours is what the other processes hold on this model's GPUs.
func (m *gpuMemory) neighbours() map[string]uint64 {
	if m == nil {
		return nil
	}
	n, err := m.ledger.Others(m.pid, m.uuids)
	if err != nil {
		fmt.Fprintf(os.Stderr, "fake-vllm: sim ledger: %v\n", err)
	}
	return n
}

// release gives everything back: the process ends.
func (m *gpuMemory) release() {
	if m != nil {
		m.ledger.Release(m.pid)
	}
}

// eventLog is --fake-event-log: one JSON line per thing a model's user
// (the supervisor under test, the gateway) made it do, appended to a file
// several fakes share, so a test can check what the real engines would
// have seen: starts, allocations, out-of-memory, sleeps, wakes, requests
// (with the client's X-Fake-Client), and every misuse (a request while
// asleep, a sleep with requests in flight). Each line is one write on an
// O_APPEND file: lines of several processes never interleave.
type eventLog struct {
	mu    sync.Mutex
	f     *os.File
	model string
	pid   int
}

func openEventLog(path, model string) (*eventLog, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("--fake-event-log: %w", err)
	}
	return &eventLog{f: f, model: model, pid: os.Getpid()}, nil
}

// Event is one line of the event log.
type Event struct {
	T     int64          `json:"t"` // unix nanoseconds
	PID   int            `json:"pid"`
	Model string         `json:"model"` // its served name
	Ev    string         `json:"ev"`
	More  map[string]any `json:"more,omitempty"`
}

func (l *eventLog) log(ev string, more map[string]any) {
	if l == nil {
		return
	}
	b, _ := json.Marshal(Event{T: time.Now().UnixNano(), PID: l.pid, Model: l.model, Ev: ev, More: more})
	l.mu.Lock()
	defer l.mu.Unlock()
	l.f.Write(append(b, '\n')) //nolint:errcheck // best effort: a test reading it sees a gap
}
