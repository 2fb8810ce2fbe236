package supervisor

import (
	"sync"

	"citadel-supervisor/supervisor/control/api"
)

// OutputLines is how many lines of a model's output are kept (docs/architecture.md).
const OutputLines = api.OutputLines

// maxLineBytes bounds one captured line; a child writing a megabyte without
// a newline must not grow the daemon's memory.
const maxLineBytes = 8 * 1024

// ring keeps the last lines of a model's output. Output readers write it;
// status and logs read it.
type ring struct {
	mu    sync.Mutex
	lines []string
	next  int
	full  bool
	subs  map[chan string]struct{}
}

func newRing(n int) *ring { return &ring{lines: make([]string, n)} }

func (r *ring) add(line string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines[r.next] = line
	r.next = (r.next + 1) % len(r.lines)
	if r.next == 0 {
		r.full = true
	}
	for ch := range r.subs {
		select {
		case ch <- line:
		default: // a slow follower misses lines rather than blocking the model
		}
	}
}

// last returns up to n of the newest lines, oldest first.
func (r *ring) last(n int) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	size := r.next
	if r.full {
		size = len(r.lines)
	}
	n = min(n, size)
	out := make([]string, 0, n)
	for i := size - n; i < size; i++ {
		idx := i
		if r.full {
			idx = (r.next + i) % len(r.lines)
		}
		out = append(out, r.lines[idx])
	}
	return out
}

// subscribe delivers new lines on the returned channel until cancel.
func (r *ring) subscribe(buf int) (<-chan string, func()) {
	ch := make(chan string, buf)
	r.mu.Lock()
	if r.subs == nil {
		r.subs = map[chan string]struct{}{}
	}
	r.subs[ch] = struct{}{}
	r.mu.Unlock()
	return ch, func() {
		r.mu.Lock()
		delete(r.subs, ch)
		r.mu.Unlock()
	}
}

// restore puts back lines a predecessor kept (an upgrade), oldest first.
func (r *ring) restore(lines []string) {
	for _, l := range lines {
		r.add(l)
	}
}
