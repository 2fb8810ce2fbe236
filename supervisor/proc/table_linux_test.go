package proc

import (
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseStat(t *testing.T) {
	line := "4411 (python3 (Engine) x) S 1 4411 4411 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 123456 1000000 2560 18446744073709551615"
	s, err := parseStat(4411, []byte(line))
	if err != nil {
		t.Fatal(err)
	}
	want := Stat{PID: 4411, PPID: 1, PGID: 4411, State: 'S', Start: 123456, Comm: "python3 (Engine) x", UTime: 250, STime: 50, RSSPages: 2560}
	if s != want {
		t.Errorf("got %+v\nwant %+v", s, want)
	}
	if _, err := parseStat(1, []byte("1 (x")); err == nil {
		t.Error("malformed stat accepted")
	}
	if _, err := ReadStat(os.Getpid()); err != nil {
		t.Errorf("ReadStat(self): %v", err)
	}
}

// TestExited: a process that is not our child (the shell's background
// job, orphaned to the test's reaper or init) is seen to exit through its
// pidfd, and a gone one is ErrGone.
func TestExited(t *testing.T) {
	cmd := exec.Command("sh", "-c", "sleep 30 >/dev/null 2>&1 & echo $!")
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatal(err)
	}
	st, err := ReadStat(pid)
	if err != nil {
		t.Fatal(err)
	}
	done, err := Exited(pid, st.Start)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
		t.Fatal("Exited closed while the process runs")
	default:
	}
	if err := Signal(pid, st.Start, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Exited not closed 10s after the process was killed")
	}
	if _, err := Exited(pid, st.Start); !errors.Is(err, ErrGone) {
		t.Errorf("Exited of a gone process: %v, want ErrGone", err)
	}
}

// TestReadRSSPages agrees with stat's resident set of the same process.
func TestReadRSSPages(t *testing.T) {
	pages, err := ReadRSSPages(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	st, err := ReadStat(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	// The heap may grow between the two reads; within a few pages.
	if pages <= 0 || pages < st.RSSPages-256 || pages > st.RSSPages+256 {
		t.Errorf("statm resident %d pages, stat %d", pages, st.RSSPages)
	}
	if _, err := ReadRSSPages(1 << 22); !errors.Is(err, ErrGone) {
		t.Errorf("a pid that does not exist: %v, want ErrGone", err)
	}
}
