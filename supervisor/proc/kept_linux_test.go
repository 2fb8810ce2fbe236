package proc

import (
	"os"
	"os/exec"
	"slices"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// TestKeptProcs: a process's stat and statm are read through descriptors
// kept open (one at a time, for the list they were opened for); a process
// gone is left out, its descriptor still bound to it; Close closes them
// and the reads after it say so.
func TestKeptProcs(t *testing.T) {
	cmd := exec.Command("cat") // blocks on its stdin until closed
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pid := cmd.Process.Pid
	pids := []int{pid, 1 << 30} // the second above any pid_max
	var k KeptProcs
	var stats []Stat
	if !k.Stats(&pids, func(st Stat) { stats = append(stats, st) }) || len(stats) != 1 || stats[0].PID != pid {
		t.Fatalf("stats %+v", stats)
	}
	dir := "/proc/" + strconv.Itoa(pid)
	if n := openFiles(t, dir); n != 1 {
		t.Errorf("%d of the process's files open, want its stat", n)
	}
	var pages []int64
	if !k.RSSPages(&pids, func(n int64) { pages = append(pages, n) }) || len(pages) != 1 || pages[0] <= 0 {
		t.Fatalf("pages %v", pages)
	}
	if n := openFiles(t, dir); n != 1 {
		t.Errorf("%d of the process's files open, want its statm only", n)
	}
	again := append([]int(nil), pids...) // a new list: opened anew
	pages = nil
	if !k.RSSPages(&again, func(n int64) { pages = append(pages, n) }) || len(pages) != 1 {
		t.Fatalf("pages of a new list %v", pages)
	}

	in.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	pages = nil
	if !k.RSSPages(&again, func(n int64) { pages = append(pages, n) }) || len(pages) != 0 {
		t.Errorf("pages of a process gone %v", pages)
	}
	k.Close()
	if n := openFiles(t, dir); n != 0 {
		t.Errorf("%d files open after Close", n)
	}
	if k.Stats(&again, func(Stat) {}) {
		t.Error("Stats after Close")
	}
}

// TestKeptProcsListedAnew: the same processes listed anew (the runner
// publishes a fresh list at every probe, a period of 10 s by default,
// shorter than most scrape intervals) keep their descriptors: only a list
// that names other processes opens the files again.
func TestKeptProcsListedAnew(t *testing.T) {
	pid := os.Getpid()
	pids := []int{pid}
	var k KeptProcs
	defer k.Close()
	n := 0
	if !k.RSSPages(&pids, func(int64) { n++ }) || n != 1 {
		t.Fatalf("%d pages read", n)
	}
	// A mark on the open file description: an open anew has not got it.
	fd := k.fds[0] - 1
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl|unix.O_NONBLOCK); err != nil {
		t.Fatal(err)
	}
	again := slices.Clone(pids)
	if !k.RSSPages(&again, func(int64) { n++ }) || n != 2 {
		t.Fatalf("%d pages read", n)
	}
	fl, err = unix.FcntlInt(uintptr(k.fds[0]-1), unix.F_GETFL, 0)
	if err != nil {
		t.Fatal(err)
	}
	if fl&unix.O_NONBLOCK == 0 {
		t.Error("the same process listed anew: its statm was opened again")
	}
	// A descriptor that no longer reads (as one of a process gone whose
	// pid a process of the list took since) is opened again for a list
	// made since, not for the same list.
	unix.Close(k.fds[0] - 1)
	if !k.RSSPages(&again, func(int64) { n++ }) || n != 2 {
		t.Fatalf("%d pages read through a closed descriptor", n)
	}
	third := slices.Clone(pids)
	if !k.RSSPages(&third, func(int64) { n++ }) || n != 3 {
		t.Fatalf("%d pages read, the pid listed anew", n)
	}
	if n := openFiles(t, "/proc/"+strconv.Itoa(pid)); n != 1 {
		t.Errorf("%d of the process's files open, want its statm", n)
	}
}
