package gpu

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"testing"

	"citadel-supervisor/config"
)

// TestSimLedgerRefusesOvercommit: the ledger refuses an allocation that
// would take a GPU past its memory (what the other live processes hold,
// plus the state file's extra), counts nothing for a process gone, and the
// sim reads what a process's line says.
func TestSimLedgerRefusesOvercommit(t *testing.T) {
	dir := t.TempDir()
	state := dir + "/state.json"
	if err := os.WriteFile(state, []byte(`{"used": {"GPU-sim-b": "70GiB"}}`), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := threeSimGPUs()
	cfg.Sim.UsageDir, cfg.Sim.StateFile = dir, state
	NewSim(cfg, nil) // writes devices.json
	l := SimLedger{Dir: dir}
	// Another live process (a child of the test) holds 60 GiB on a.
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Process.Kill(); other.Wait() }) //nolint:errcheck // cleanup
	start, _, err := SimProcStart(other.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Hold(other.Process.Pid, start, map[string]uint64{"GPU-sim-a": 60 * gib}, true); err != nil {
		t.Fatal(err)
	}
	self, _, _ := SimProcStart(os.Getpid())
	var oom *OutOfMemoryError
	if err := l.Hold(os.Getpid(), self, map[string]uint64{"GPU-sim-a": 30 * gib}, true); !errors.As(err, &oom) || oom.Held != 60*gib {
		t.Fatalf("30 GiB next to 60 GiB on an 80 GiB GPU: %v", err)
	}
	if err := l.Hold(os.Getpid(), self, map[string]uint64{"GPU-sim-b": 20 * gib}, true); !errors.As(err, &oom) || oom.Extra != 70*gib {
		t.Fatalf("20 GiB next to the state file's 70 GiB: %v", err)
	}
	if err := l.Hold(os.Getpid(), self, map[string]uint64{"GPU-sim-a": 20 * gib}, true); err != nil {
		t.Fatalf("20 GiB next to 60 GiB: %v", err)
	}
	held, err := l.Held()
	if err != nil || held["GPU-sim-a"] != 80*gib {
		t.Fatalf("held %v %v, want 80 GiB on a", held, err)
	}
	// The sim reads what the ledger says of processes that are not the
	// daemon's descendants (adopted after a predecessor's death).
	sim := NewSim(cfg, nil)
	sim.procs = func() ([]SimProcess, error) { return nil, nil }
	devs, err := sim.Read(context.Background())
	if err != nil || devs[0].MemoryUsed != 80*gib || len(devs[0].Processes) != 2 {
		t.Fatalf("the sim reads %+v %v; want both lines on GPU-sim-a", devs[0], err)
	}
	// The other process dies: its line holds nothing.
	other.Process.Kill() //nolint:errcheck // it is a child
	other.Wait()         //nolint:errcheck // killed
	if held, _ := l.Held(); held["GPU-sim-a"] != 20*gib {
		t.Fatalf("after the holder died: %v", held)
	}
	if _, ok := (&Sim{usageDir: dir}).usage(os.Getpid(), "GPU-sim-a"); !ok {
		t.Error("the sim does not read this process's line")
	}
	if devs, err := l.Resolve("GPU-sim-c, 1"); err != nil || len(devs) != 2 || devs[0].Memory != uint64(config.ByteSize(40*gib)) || devs[1].UUID != "GPU-sim-b" {
		t.Errorf("resolve by UUID and index: %v %v", devs, err)
	}
}
