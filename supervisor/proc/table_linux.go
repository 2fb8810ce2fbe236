package proc

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Stat is what the supervisor needs from /proc/PID/stat.
type Stat struct {
	PID, PPID, PGID int
	State           byte   // R, S, D, Z, …
	Start           uint64 // start time in clock ticks since boot: with PID, a process's identity
	Comm            string
	UTime, STime    uint64 // clock ticks
	RSSPages        int64
}

// ErrGone means the process no longer exists (or is a zombie, or its PID now
// belongs to another process).
var ErrGone = errors.New("process gone")

// ReadStat parses /proc/PID/stat.
func ReadStat(pid int) (Stat, error) {
	b, err := ReadSmall("/proc/"+strconv.Itoa(pid)+"/stat", make([]byte, 512))
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ESRCH) {
			return Stat{}, ErrGone
		}
		return Stat{}, fmt.Errorf("read /proc/%d/stat: %w", pid, err)
	}
	return parseStat(pid, b)
}

// ReadRSSPages reads a process's resident set, in pages, from
// /proc/PID/statm: where that is all that is needed of it, a file the
// kernel writes in a fraction of the time of stat. A zombie's is 0.
func ReadRSSPages(pid int) (int64, error) {
	var buf [128]byte
	b, err := ReadSmall("/proc/"+strconv.Itoa(pid)+"/statm", buf[:])
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ESRCH) {
			return 0, ErrGone
		}
		return 0, fmt.Errorf("read /proc/%d/statm: %w", pid, err)
	}
	return parseRSSPages(pid, b)
}

func parseRSSPages(pid int, b []byte) (int64, error) {
	// size resident shared text lib data dt; see proc(5).
	_, rest, _ := bytes.Cut(b, []byte(" "))
	resident, _, _ := bytes.Cut(rest, []byte(" "))
	n, err := strconv.ParseInt(string(resident), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("parse /proc/%d/statm: %w", pid, err)
	}
	return n, nil
}

func parseStat(pid int, b []byte) (Stat, error) {
	// comm may hold spaces and parentheses: it ends at the last ')'.
	open, end := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	if open < 0 || end < open || end+2 >= len(b) {
		return Stat{}, fmt.Errorf("parse /proc/%d/stat: malformed", pid)
	}
	// The fields from 3 (state) on, space-separated; see proc(5). Only
	// the few needed are converted (this runs for every process of every
	// model at each /metrics scrape in marker mode).
	var f [22][]byte
	n := 0
	for field := range bytes.FieldsSeq(b[end+2:]) {
		f[n] = field
		if n++; n == len(f) {
			break
		}
	}
	if n < len(f) {
		return Stat{}, fmt.Errorf("parse /proc/%d/stat: %d fields", pid, n)
	}
	num := func(i int) uint64 { v, _ := strconv.ParseUint(string(f[i]), 10, 64); return v }
	s := Stat{
		PID:   pid,
		State: f[0][0],
		PPID:  int(num(1)),
		PGID:  int(num(2)),
		UTime: num(11),
		STime: num(12),
		Start: num(19),
		Comm:  string(b[open+1 : end]),
	}
	s.RSSPages, _ = strconv.ParseInt(string(f[21]), 10, 64)
	return s, nil
}

// Check says whether pid still is the process that started at start: nil
// when it is, ErrGone when it is not (exited, a zombie, or the PID reused),
// and any other error when /proc could not be read (EMFILE, ENOMEM, …),
// which is no verdict: the process may well be running.
// A zombie counts as gone: it holds no memory, ports or GPU contexts.
func Check(pid int, start uint64) error {
	s, err := ReadStat(pid)
	if err != nil {
		return err
	}
	if s.Start != start || s.State == 'Z' {
		return ErrGone
	}
	return nil
}

// Alive reports whether pid may still be the process that started at
// start. Only a verdict of gone (ENOENT, ESRCH, another start time, a
// zombie) is false: an error reading /proc never reads as "the process is
// gone", or a stop under descriptor exhaustion would "succeed" without
// signalling anything.
func Alive(pid int, start uint64) bool {
	return !errors.Is(Check(pid, start), ErrGone)
}

// Children lists pid's children from /proc/PID/task/*/children.
func Children(pid int) []int {
	tasks, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/children")
	var out []int
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		for _, f := range strings.Fields(string(b)) {
			if c, err := strconv.Atoi(f); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// PIDs lists every process visible in /proc.
func PIDs() ([]int, error) {
	d, err := os.Open("/proc")
	if err != nil {
		return nil, err
	}
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return nil, err
	}
	pids := make([]int, 0, len(names))
	for _, n := range names {
		if pid, err := strconv.Atoi(n); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// EnvironValue returns the value of variable key in pid's initial
// environment, if the supervisor may read it (same user, or root).
func EnvironValue(pid int, key string) (string, bool) {
	v, ok, _ := LookupEnviron(pid, key)
	return v, ok
}

// LookupEnviron is EnvironValue with the reason it could not read: ErrGone,
// fs.ErrPermission (another user's process, or one that set
// PR_SET_DUMPABLE 0), or another error (EMFILE, ENOMEM: no verdict).
func LookupEnviron(pid int, key string) (string, bool, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, unix.ESRCH) {
			return "", false, ErrGone
		}
		return "", false, err
	}
	v, ok := lookup(b, key)
	return v, ok, nil
}

// lookup finds key in the NUL-separated environment b.
func lookup(b []byte, key string) (string, bool) {
	prefix := []byte(key + "=")
	for kv := range bytes.SplitSeq(b, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, prefix); ok {
			return string(v), true
		}
	}
	return "", false
}

// Signal sends sig to pid only if pid is still the process that
// started at start. The pidfd pins the process between the identity check
// and the signal, so a recycled PID is never hit.
func Signal(pid int, start uint64, sig unix.Signal) error {
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		if errors.Is(err, unix.ESRCH) {
			return ErrGone
		}
		return fmt.Errorf("pidfd_open %d: %w", pid, err)
	}
	defer unix.Close(fd)
	if err := Check(pid, start); err != nil {
		// Unsure is not signalled: the PID might be another process's.
		return err
	}
	if err := unix.PidfdSendSignal(fd, sig, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return ErrGone
		}
		return fmt.Errorf("signal %d: %w", pid, err)
	}
	return nil
}
