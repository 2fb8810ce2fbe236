package proc

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestMain makes the test binary a child subreaper, as the daemon is, so
// the processes these tests orphan are re-parented here and reaped by
// reapOrphans instead of being left to PID 1.
func TestMain(m *testing.M) {
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintln(os.Stderr, "prctl(PR_SET_CHILD_SUBREAPER):", err)
		os.Exit(2)
	}
	os.Exit(m.Run())
}

// start runs argv in its own process group with MarkerEnv=marker. Cleanup
// kills what is left of it and reaps it and any orphans.
func start(t *testing.T, marker string, argv ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), MarkerEnv+"="+marker)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil { // not reaped: its group id is still its own
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) //nolint:errcheck // gone is fine
			cmd.Wait()                                      //nolint:errcheck // killed
		}
		reapOrphans()
	})
	return cmd
}

// reapOrphans reaps exited children that no exec.Cmd waits for.
func reapOrphans() {
	for _, pid := range Children(os.Getpid()) {
		if s, err := ReadStat(pid); err == nil && s.State == 'Z' {
			var ws unix.WaitStatus
			unix.Wait4(pid, &ws, unix.WNOHANG, nil) //nolint:errcheck // best effort
		}
	}
}

// waitFor polls cond until it holds or 10 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		case <-tick.C:
		}
	}
}

func token() string { return "test/m/" + rand.Text()[:12] }

// TestTreeStop: a main process with a child that ignores SIGTERM. Refresh
// finds the child by its parent link; Stop SIGTERMs the main process, waits
// out the grace and SIGKILLs the rest; nothing survives, and SeenPIDs
// still names every process for the GPU release check.
func TestTreeStop(t *testing.T) {
	marker := token()
	cmd := start(t, marker, "sh", "-c", "sleep 300 & (trap '' TERM; exec sleep 301) & wait")
	tr := NewTree(marker, cmd.Process.Pid)
	waitFor(t, "both children", func() bool { tr.Refresh(); return len(tr.PIDs()) == 3 })
	all := tr.PIDs()
	starts := map[int]uint64{}
	for _, pid := range all {
		s, _ := ReadStat(pid)
		starts[pid] = s.Start
	}

	if err := tr.Stop(context.Background(), 200*time.Millisecond, true); err != nil {
		t.Fatal(err)
	}
	for _, pid := range all {
		if Alive(pid, starts[pid]) {
			t.Errorf("pid %d survived Stop", pid)
		}
	}
	if len(tr.PIDs()) != 0 {
		t.Errorf("members after Stop: %v", tr.PIDs())
	}
	if got := tr.SeenPIDs(); !slices.Equal(got, all) {
		t.Errorf("SeenPIDs = %v, want %v", got, all)
	}
}

// TestSweepAndMarked: a process that is no descendant of the main process
// but carries the instance's marker (vLLM's EngineCore after setsid and
// re-parenting) is found by Sweep and by Marked; one with another
// supervisor's marker is left alone.
func TestSweepAndMarked(t *testing.T) {
	marker := token()
	main := start(t, marker, "sleep", "300")
	detached := start(t, marker, "sleep", "301")
	other := start(t, "other/m/x", "sleep", "302")

	tr := NewTree(marker, main.Process.Pid)
	if err := tr.Sweep(); err != nil {
		t.Fatal(err)
	}
	want := []int{main.Process.Pid, detached.Process.Pid}
	slices.Sort(want)
	if got := tr.PIDs(); !slices.Equal(got, want) {
		t.Errorf("after Sweep: %v, want %v", got, want)
	}

	groups, err := Marked("test/")
	if err != nil {
		t.Fatal(err)
	}
	g, ok := groups[marker]
	if !ok || !slices.Equal(g.PIDs(), want) {
		t.Errorf("Marked: %v", groups)
	}
	if _, ok := groups["other/m/x"]; ok {
		t.Error("Marked took another supervisor's process")
	}

	if err := g.Stop(context.Background(), time.Second, false); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*exec.Cmd{main, detached} {
		if err := c.Wait(); err == nil {
			t.Errorf("pid %d exited cleanly; want killed", c.Process.Pid)
		}
	}
	if s, err := ReadStat(other.Process.Pid); err != nil || s.State == 'Z' {
		t.Errorf("the other supervisor's process was stopped: %v %v", s, err)
	}
}
