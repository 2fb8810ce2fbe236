package proc

import (
	"slices"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// KeptProcs keeps a model's processes' stat or statm open from one
// /metrics scrape to the next, read again at offset 0, where the kernel
// writes them anew: an open and a close cost several times the read, for
// every process of every model at every scrape. A list that names the
// same processes as the one the files were opened for (the runner
// publishes one at every probe) keeps them open. A descriptor stays bound
// to the process it was opened for: once that process is gone its reads
// fail and it is left out, as a process gone, also where its pid has been
// taken by another (until a list made since names that pid: a process of
// the model's, opened anew). The zero value is ready; Close ends it.
type KeptProcs struct {
	mu     sync.Mutex
	pids   *[]int // the latest list, of the processes the descriptors were opened for
	statm  bool   // statm, else stat
	fds    []int  // like *pids: the descriptor + 1, 0 where the open failed
	closed bool
}

// Stats calls fn with the stat of each of pids' processes that is still
// there, opening the files where pids is not the list they were opened
// for. It returns false, having called nothing, once k is closed.
func (k *KeptProcs) Stats(pids *[]int, fn func(Stat)) bool {
	buf := make([]byte, 512)
	return k.each(pids, false, func(pid, fd int) bool {
		b, err := preadSmall(fd, buf)
		if err != nil {
			return false
		}
		buf = b[:cap(b)]
		if st, err := parseStat(pid, b); err == nil {
			fn(st)
		}
		return true
	})
}

// RSSPages calls fn with the resident set, in pages, of each of pids'
// processes that is still there (statm), as Stats.
func (k *KeptProcs) RSSPages(pids *[]int, fn func(pages int64)) bool {
	var buf [128]byte
	return k.each(pids, true, func(pid, fd int) bool {
		b, err := preadSmall(fd, buf[:])
		if err != nil {
			return false
		}
		if n, err := parseRSSPages(pid, b); err == nil {
			fn(n)
		}
		return true
	})
}

func (k *KeptProcs) each(pids *[]int, statm bool, read func(pid, fd int) bool) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return false
	}
	// anew: pids lists again the processes the files were opened for (the
	// runner publishes a fresh list at every probe): the files stay open.
	anew := false
	if k.pids != pids || k.statm != statm {
		if k.pids != nil && k.statm == statm && slices.Equal(*k.pids, *pids) {
			anew = true
		} else {
			k.closeFDs()
			k.statm = statm
			for _, pid := range *pids {
				k.fds = append(k.fds, k.open(pid))
			}
		}
		k.pids = pids
	}
	for i, pid := range *pids {
		if fd := k.fds[i]; fd != 0 && read(pid, fd-1) {
			continue
		}
		if !anew {
			continue
		}
		// Its process is gone (or was not there at the open), and the
		// list made since names its pid: the model's process now, opened
		// as a new list's would be.
		if fd := k.fds[i]; fd != 0 {
			unix.Close(fd - 1) //nolint:errcheck // read-only
		}
		if k.fds[i] = k.open(pid); k.fds[i] != 0 {
			read(pid, k.fds[i]-1)
		}
	}
	return true
}

// open opens pid's stat or statm; it returns the descriptor + 1, 0 where
// the open failed.
func (k *KeptProcs) open(pid int) int {
	name := "/stat"
	if k.statm {
		name = "/statm"
	}
	fd, err := unix.Open("/proc/"+strconv.Itoa(pid)+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0
	}
	return fd + 1
}

func (k *KeptProcs) closeFDs() {
	for _, fd := range k.fds {
		if fd != 0 {
			unix.Close(fd - 1) //nolint:errcheck // read-only
		}
	}
	k.fds, k.pids = k.fds[:0], nil
}

// Close closes the files; the reads after it return false.
func (k *KeptProcs) Close() {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.closeFDs()
	k.closed = true
}

// preadSmall reads a whole small file from offset 0 through fd into buf
// (grown if too small).
func preadSmall(fd int, buf []byte) ([]byte, error) {
	n := 0
	for {
		if n == len(buf) {
			buf = append(buf, make([]byte, max(512, n))...)
		}
		m, err := unix.Pread(fd, buf[n:], int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, err
		}
		if m == 0 {
			return buf[:n], nil
		}
		n += m
	}
}
