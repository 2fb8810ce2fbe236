package proc

import (
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// KeptProcs keeps a model's processes' stat or statm open from one
// /metrics scrape to the next, read again at offset 0, where the kernel
// writes them anew: an open and a close cost several times the read, for
// every process of every model at every scrape. A descriptor stays bound
// to the process it was opened for: once that process is gone its reads
// fail and it is left out, as a process gone, also where its pid has been
// taken by another. The zero value is ready; Close ends it.
type KeptProcs struct {
	mu     sync.Mutex
	pids   *[]int // the list the descriptors were opened for
	statm  bool   // statm, else stat
	fds    []int  // like *pids: the descriptor + 1, 0 where the open failed
	closed bool
}

// Stats calls fn with the stat of each of pids' processes that is still
// there, opening the files where pids is not the list they were opened
// for. It returns false, having called nothing, once k is closed.
func (k *KeptProcs) Stats(pids *[]int, fn func(Stat)) bool {
	buf := make([]byte, 512)
	return k.each(pids, false, func(pid, fd int) {
		b, err := preadSmall(fd, buf)
		if err != nil {
			return
		}
		buf = b[:cap(b)]
		if st, err := parseStat(pid, b); err == nil {
			fn(st)
		}
	})
}

// RSSPages calls fn with the resident set, in pages, of each of pids'
// processes that is still there (statm), as Stats.
func (k *KeptProcs) RSSPages(pids *[]int, fn func(pages int64)) bool {
	var buf [128]byte
	return k.each(pids, true, func(pid, fd int) {
		b, err := preadSmall(fd, buf[:])
		if err != nil {
			return
		}
		if n, err := parseRSSPages(pid, b); err == nil {
			fn(n)
		}
	})
}

func (k *KeptProcs) each(pids *[]int, statm bool, read func(pid, fd int)) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		return false
	}
	if k.pids != pids || k.statm != statm {
		k.closeFDs()
		name := "/stat"
		if statm {
			name = "/statm"
		}
		k.pids, k.statm = pids, statm
		for _, pid := range *pids {
			fd, err := unix.Open("/proc/"+strconv.Itoa(pid)+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				fd = -1
			}
			k.fds = append(k.fds, fd+1)
		}
	}
	for i, pid := range *pids {
		if fd := k.fds[i]; fd != 0 {
			read(pid, fd-1)
		}
	}
	return true
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
