//go:build nvml

// The NVML backend against a real driver. `make test` cannot run this (no
// GPU on a CI machine); `make nvml-check` builds it and deploy/e2e/gpu-host.sh
// runs it on a host with an NVIDIA GPU. Without a driver it fails: it is
// only built when a GPU is expected.

package nvmlgpu

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"go.uber.org/zap/zaptest"

	"citadel-supervisor/gpu"
)

func openReal(t *testing.T) *Backend {
	t.Helper()
	b, err := Open(nvml.New(), zaptest.NewLogger(t))
	if err != nil {
		t.Fatalf("Open on a GPU host: %v", err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return b
}

func readReal(t *testing.T, b *Backend) []gpu.Device {
	t.Helper()
	devs, err := b.Read(context.Background())
	if err != nil {
		t.Fatalf("Read: %v", err)
	}
	return devs
}

// TestRealRead: every GPU is up, named, with a UUID, a PCI bus ID and
// coherent memory figures; the readings only some GPUs have are either
// plausible or -1.
func TestRealRead(t *testing.T) {
	b := openReal(t)
	devs := readReal(t, b)
	if len(devs) == 0 {
		t.Fatal("NVML reports no GPU")
	}
	for _, d := range devs {
		t.Logf("GPU%d %s %s bus %s: %d/%d MiB used (%d free), util %.2f, %.0f C, %.0f W, %d processes, err %q",
			d.Index, d.UUID, d.Name, d.PCIBusID, d.MemoryUsed>>20, d.MemoryTotal>>20, d.MemoryFree>>20,
			d.Utilization, d.Temperature, d.PowerWatts, len(d.Processes), d.Err)
		if !d.Up || d.Err != "" {
			t.Errorf("GPU%d is not up: %s", d.Index, d.Err)
		}
		if !strings.HasPrefix(d.UUID, "GPU-") || d.Name == "" || d.PCIBusID == "" {
			t.Errorf("GPU%d: uuid %q name %q bus %q", d.Index, d.UUID, d.Name, d.PCIBusID)
		}
		if d.MemoryTotal == 0 || d.MemoryUsed > d.MemoryTotal || d.MemoryFree > d.MemoryTotal {
			t.Errorf("GPU%d memory: total %d used %d free %d", d.Index, d.MemoryTotal, d.MemoryUsed, d.MemoryFree)
		}
		if d.Utilization != -1 && (d.Utilization < 0 || d.Utilization > 1) {
			t.Errorf("GPU%d utilization %v", d.Index, d.Utilization)
		}
		if d.Temperature != -1 && (d.Temperature < 5 || d.Temperature > 120) {
			t.Errorf("GPU%d temperature %v", d.Index, d.Temperature)
		}
		if d.PowerWatts != -1 && (d.PowerWatts <= 0 || d.PowerWatts > 2000) {
			t.Errorf("GPU%d power %v", d.Index, d.PowerWatts)
		}
	}
	if b.noV2.Load() {
		t.Log("this driver has no GetMemoryInfo_v2: reserved memory counts as used")
	}
}

// TestRealProcessAttribution runs CITADEL_GPU_HOG (a command that takes
// GPU memory and holds it until killed, e.g. a python3 one-liner with
// torch) and waits for NVML to list its PID with that memory on a GPU, then
// kills it and waits for the memory to be listed no more: what the
// scheduler's release and eviction decisions rest on.
func TestRealProcessAttribution(t *testing.T) {
	hog := os.Getenv("CITADEL_GPU_HOG")
	if hog == "" {
		t.Fatal("CITADEL_GPU_HOG is not set: name a command that takes at least 1 GiB of GPU memory (deploy/e2e/gpu-host.sh sets it)")
	}
	b := openReal(t)
	cmd := exec.Command("sh", "-c", "exec "+hog)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() { _ = cmd.Process.Kill() }()
	pid := cmd.Process.Pid

	used := func() (uint64, bool) {
		for _, d := range readReal(t, b) {
			for _, p := range d.Processes {
				if p.PID == pid {
					return p.UsedMemory, true
				}
			}
		}
		return 0, false
	}
	deadline := time.Now().Add(90 * time.Second)
	for {
		if n, ok := used(); ok && n >= 1<<30 {
			t.Logf("NVML lists pid %d with %d MiB", pid, n>>20)
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("the GPU hog exited before NVML listed it: %v", err)
		case <-time.After(200 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("NVML did not list pid %d with at least 1 GiB within 90s", pid)
		}
	}
	_ = cmd.Process.Signal(syscall.SIGKILL)
	<-exited
	deadline = time.Now().Add(30 * time.Second)
	for {
		if _, ok := used(); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("NVML still lists pid %d 30s after it was killed", pid)
		}
		time.Sleep(100 * time.Millisecond) // polling the driver: no event says "freed"
	}
}

// TestRealXids: registering for Xid events works or is refused per GPU,
// and waiting for them neither fails nor blocks past its context.
func TestRealXids(t *testing.T) {
	b := openReal(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- b.WatchXids(ctx) }()
	select {
	case err := <-done:
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("WatchXids: %v", err)
		}
	case <-time.After(3*time.Second + 2*xidWait*time.Millisecond + 5*time.Second):
		t.Fatal("WatchXids did not return after its context ended")
	}
	t.Logf("Xid counts after 3s: %v", b.Xids())
}
