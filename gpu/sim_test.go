package gpu

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"citadel-supervisor/config"
)

const gib = 1 << 30

// threeSimGPUs declares GPU-sim-a and -b (80 GiB) and GPU-sim-c (40 GiB).
func threeSimGPUs() config.GPU {
	return config.GPU{Backend: "sim", Sim: config.Sim{Devices: []config.SimDevice{
		{UUID: "GPU-sim-a", Name: "Sim H100", Memory: 80 * gib},
		{UUID: "GPU-sim-b", Name: "Sim H100", Memory: 80 * gib},
		{UUID: "GPU-sim-c", Memory: 40 * gib},
	}}}
}

func TestSimClaim(t *testing.T) {
	for _, tc := range []struct {
		name  string
		p     SimProcess
		util  float64
		uuids []string
	}{
		{"vllm as the supervisor starts it",
			SimProcess{Args: []string{"python", "-m", "vllm.entrypoints.openai.api_server", "--port", "11400", "--gpu-memory-utilization", "0.9"},
				Env: []string{"PATH=/usr/bin", "CUDA_VISIBLE_DEVICES=GPU-sim-a,GPU-sim-b", "CUDA_DEVICE_ORDER=PCI_BUS_ID"}},
			0.9, []string{"GPU-sim-a", "GPU-sim-b"}},
		{"flag with =",
			SimProcess{Args: []string{"vllm", "--gpu-memory-utilization=0.25"}, Env: []string{"CUDA_VISIBLE_DEVICES=GPU-sim-c"}},
			0.25, []string{"GPU-sim-c"}},
		{"last flag wins, as in argparse",
			SimProcess{Args: []string{"vllm", "--gpu-memory-utilization", "0.5", "--gpu-memory-utilization", "0.3"}, Env: []string{"CUDA_VISIBLE_DEVICES=GPU-sim-a"}},
			0.3, []string{"GPU-sim-a"}},
		{"first CUDA_VISIBLE_DEVICES wins, as with getenv",
			SimProcess{Args: []string{"vllm", "--gpu-memory-utilization", "0.5"}, Env: []string{"CUDA_VISIBLE_DEVICES=GPU-sim-b", "CUDA_VISIBLE_DEVICES=GPU-sim-a"}},
			0.5, []string{"GPU-sim-b"}},
		{"spaces and empty entries",
			SimProcess{Args: []string{"vllm", "--gpu-memory-utilization", "0.5"}, Env: []string{"CUDA_VISIBLE_DEVICES= GPU-sim-a, ,GPU-sim-b,"}},
			0.5, []string{"GPU-sim-a", "GPU-sim-b"}},
		{"a worker: GPUs in its environment, no flag",
			SimProcess{Args: []string{"python", "-c", "from multiprocessing.spawn import spawn_main"}, Env: []string{"CUDA_VISIBLE_DEVICES=GPU-sim-a"}}, 0, nil},
		{"no CUDA_VISIBLE_DEVICES",
			SimProcess{Args: []string{"vllm", "--gpu-memory-utilization", "0.5"}, Env: []string{"PATH=/bin"}}, 0, nil},
		{"empty CUDA_VISIBLE_DEVICES hides every GPU",
			SimProcess{Args: []string{"vllm", "--gpu-memory-utilization", "0.5"}, Env: []string{"CUDA_VISIBLE_DEVICES="}}, 0, nil},
		{"flag without a value",
			SimProcess{Args: []string{"vllm", "--gpu-memory-utilization"}, Env: []string{"CUDA_VISIBLE_DEVICES=GPU-sim-a"}}, 0, nil},
		{"not a fraction",
			SimProcess{Args: []string{"vllm", "--gpu-memory-utilization", "90"}, Env: []string{"CUDA_VISIBLE_DEVICES=GPU-sim-a"}}, 0, nil},
		{"a variable merely named like it",
			SimProcess{Args: []string{"vllm", "--gpu-memory-utilization", "0.5"}, Env: []string{"XCUDA_VISIBLE_DEVICES=GPU-sim-a"}}, 0, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			util, uuids, ok := simClaim(tc.p)
			if ok != (tc.uuids != nil) || util != tc.util || !slices.Equal(uuids, tc.uuids) {
				t.Errorf("got %v %v %v, want %v %v", util, uuids, ok, tc.util, tc.uuids)
			}
		})
	}
}

// TestSimUsageFromProcesses feeds the process table: each process that
// looks like a vLLM server uses its share of each GPU it names, under its
// pid; the state file adds to it; unknown UUIDs and other processes count
// for nothing.
func TestSimUsageFromProcesses(t *testing.T) {
	cfg := threeSimGPUs()
	cfg.Sim.StateFile = filepath.Join(t.TempDir(), "state.json")
	if err := os.WriteFile(cfg.Sim.StateFile, []byte(`{"used": {"GPU-sim-b": "10GiB"}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	s := NewSim(cfg, nil)
	s.procs = func() ([]SimProcess, error) {
		return []SimProcess{
			{PID: 100, Args: []string{"vllm", "--gpu-memory-utilization", "0.5"}, Env: []string{"CUDA_VISIBLE_DEVICES=GPU-sim-a,GPU-sim-b"}},
			{PID: 101, Args: []string{"worker"}, Env: []string{"CUDA_VISIBLE_DEVICES=GPU-sim-a,GPU-sim-b"}},
			{PID: 200, Args: []string{"vllm", "--gpu-memory-utilization=0.25"}, Env: []string{"CUDA_VISIBLE_DEVICES=GPU-sim-b,GPU-elsewhere"}},
			{PID: 300, Args: []string{"bash"}, Env: []string{"HOME=/var/lib/citadel"}},
		}, nil
	}
	devs, err := s.Read(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		used  uint64
		procs []Process
	}{
		{40 * gib, []Process{{PID: 100, UsedMemory: 40 * gib}}},
		{10*gib + 40*gib + 20*gib, []Process{{PID: 100, UsedMemory: 40 * gib}, {PID: 200, UsedMemory: 20 * gib}}},
		{0, []Process{}},
	}
	for i, d := range devs {
		if d.MemoryUsed != want[i].used || d.MemoryFree != d.MemoryTotal-want[i].used || !slices.Equal(d.Processes, want[i].procs) {
			t.Errorf("%s: used %d free %d processes %v; want used %d, processes %v", d.UUID, d.MemoryUsed, d.MemoryFree, d.Processes, want[i].used, want[i].procs)
		}
	}

	s.procs = func() ([]SimProcess, error) { return nil, errors.New("no /proc") }
	if _, err := s.Read(context.Background()); err == nil || err.Error() != "sim GPUs: read the process table: no /proc" {
		t.Errorf("a failed process table read: %v", err)
	}
}

// TestSimUsesWhenGiven: a caller that says what runs where is believed, and
// the process table is not read.
func TestSimUsesWhenGiven(t *testing.T) {
	s := NewSim(threeSimGPUs(), func() []SimUse { return []SimUse{{PID: 7, UUIDs: []string{"GPU-sim-c"}, Bytes: 30 * gib}} })
	s.procs = func() ([]SimProcess, error) { t.Error("process table read although uses were given"); return nil, nil }
	devs, err := s.Read(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if d := devs[2]; d.MemoryUsed != 30*gib || !slices.Equal(d.Processes, []Process{{PID: 7, UsedMemory: 30 * gib}}) {
		t.Errorf("GPU-sim-c: %+v", d)
	}
}

// TestSimIndexNamesDeclaredDevice: children name their GPUs by NVML index
// (docs/placement.md); the sim maps an index to the declared device at that
// position, and keeps UUIDs (gpu.visible_devices: uuid, or a process
// started before indices) as they are.
func TestSimIndexNamesDeclaredDevice(t *testing.T) {
	s := NewSim(config.GPU{Sim: config.Sim{Devices: []config.SimDevice{{UUID: "GPU-a", Memory: 80 << 30}, {UUID: "GPU-b", Memory: 80 << 30}}}}, nil)
	got := s.byIndex([]string{"1", "GPU-a", "7", "0"})
	if want := []string{"GPU-b", "GPU-a", "GPU-a"}; !slices.Equal(got, want) {
		t.Errorf("byIndex = %v, want %v (an index past the devices names none)", got, want)
	}
}
