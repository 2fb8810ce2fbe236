package proc

import (
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestCgroupLeaf: a process cloned into a leaf, and the grandchild it
// orphans with an empty environment, are both in cgroup.procs; the leaf's
// CPU time is readable and never goes back; cgroup.kill ends both at once,
// populated goes to 0 and the leaf is removed.
func TestCgroupLeaf(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a writable cgroup v2 hierarchy (CI runs as root)")
	}
	cg, err := OpenCgroups("test-"+rand.Text()[:8], false)
	if err != nil {
		t.Fatalf("OpenCgroups as root: %v", err)
	}
	defer cg.Close() //nolint:errcheck // checked below
	leaf, err := cg.New("m@" + rand.Text()[:8])
	if err != nil {
		t.Fatal(err)
	}
	fd, err := leaf.OpenFD()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", "env -i sh -c 'sleep 300 &' ; trap '' TERM; while :; do sleep 1; done")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, UseCgroupFD: true, CgroupFD: fd}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }() //nolint:errcheck // killed
	defer reapOrphans()

	var pids []int
	waitFor(t, "main and the orphaned sleep in the leaf", func() bool {
		pids, _ = leaf.Procs()
		return slices.Contains(pids, cmd.Process.Pid) && len(pids) >= 3
	})
	if pop, err := leaf.Populated(); err != nil || !pop {
		t.Fatalf("Populated = %v, %v", pop, err)
	}
	cpu1, ok := leaf.CPUSeconds()
	if !ok {
		t.Fatal("no cpu.stat usage_usec")
	}
	if n := openFiles(t, leaf.Path); n != 1 {
		t.Errorf("%d of the leaf's files open after a read, want cpu.stat kept", n)
	}
	tr := NewCgroupTree("none", cmd.Process.Pid, leaf)
	if len(tr.PIDs()) < len(pids) {
		t.Errorf("tree %v, leaf %v", tr.PIDs(), pids)
	}
	if err := tr.Stop(context.Background(), 100*time.Millisecond, true); err != nil {
		t.Fatal(err)
	}
	for _, pid := range pids {
		if running(pid) {
			t.Errorf("pid %d survived the cgroup kill", pid)
		}
	}
	if _, err := os.Stat(leaf.Path); !os.IsNotExist(err) {
		t.Errorf("leaf not removed: %v", err)
	}
	if cpu2, ok := leaf.CPUSeconds(); ok {
		t.Errorf("the leaf's CPU time read once it was removed (%v, %v before)", cpu2, cpu1)
	}
	if n := openFiles(t, leaf.Path); n != 0 {
		t.Errorf("%d of the removed leaf's files still open", n)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("main process not reaped")
	}
}

// openFiles counts the descriptors of this process open on files in dir.
func openFiles(t *testing.T, dir string) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if l, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && strings.HasPrefix(l, dir+"/") {
			n++
		}
	}
	return n
}

func running(pid int) bool {
	s, err := ReadStat(pid)
	return err == nil && s.State != 'Z'
}

// TestCgroupAccountingFiles reads a leaf's accounting from its files, and
// stops looking for memory.current once a leaf has shown it has none.
func TestCgroupAccountingFiles(t *testing.T) {
	with, without := &Cgroup{Path: t.TempDir()}, &Cgroup{Path: t.TempDir()}
	for name, body := range map[string]string{"memory.current": "734003200\n", "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"} {
		if err := os.WriteFile(filepath.Join(with.Path, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if b, ok := with.MemoryBytes(); !ok || b != 734003200 {
		t.Errorf("MemoryBytes = %d, %v; want 734003200", b, ok)
	}
	if s, ok := with.CPUSeconds(); !ok || s != 2.5 {
		t.Errorf("CPUSeconds = %v, %v; want 2.5", s, ok)
	}
	// The files are kept open, and read anew each time.
	if n := openFiles(t, with.Path); n != 2 {
		t.Errorf("%d of the leaf's files open, want cpu.stat and memory.current kept", n)
	}
	for name, body := range map[string]string{"memory.current": "1048576\n", "cpu.stat": "usage_usec 3000000\nuser_usec 2000000\nsystem_usec 1000000\n"} {
		if err := os.WriteFile(filepath.Join(with.Path, name), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if b, ok := with.MemoryBytes(); !ok || b != 1048576 {
		t.Errorf("MemoryBytes, read again = %d, %v; want 1048576", b, ok)
	}
	if s, ok := with.CPUSeconds(); !ok || s != 3 {
		t.Errorf("CPUSeconds, read again = %v, %v; want 3", s, ok)
	}
	if _, ok := without.MemoryBytes(); ok {
		t.Error("MemoryBytes of a leaf without memory.current: ok")
	}
	if err := os.WriteFile(filepath.Join(without.Path, "memory.current"), []byte("1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, ok := without.MemoryBytes(); ok {
		t.Error("memory.current looked for again after the leaf showed it had none")
	}
}
