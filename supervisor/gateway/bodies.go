package gateway

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Request bodies are held by the gateway from their first byte until the
// model has read them: while they arrive, while their request waits in a
// queue, and while they are sent on. A request is routed, queued or given a
// slot only once its body is whole, so a client that sends half a body
// holds no slot, no place in a queue and no drain (timeouts.go bounds how
// long it may take). What they hold is bounded by design, all requests
// together (docs/gateway.md, "Memory"):
//
//   - gateway.body_memory in memory. A body of known length over 64 KiB
//     is one anonymous mapping of its size, unmapped when the model has
//     read it: its memory leaves the process at once, and it is not Go
//     heap, which the garbage collector lets grow to twice what is live.
//     Smaller bodies are ordinary heap (most requests; the copy would cost
//     more than the mapping saves).
//   - beyond that, gateway.body_spool in temporary files under $TMPDIR,
//     unlinked as soon as created, so nothing is left behind by a crash.
//   - beyond that, 429 with the reason.

// smallBody: heap pieces up to this size come from a pool: a chat
// request's body is usually this small, and one buffer per request would
// be garbage on every request.
const smallBody = 4 << 10

var smallBodies = sync.Pool{New: func() any { b := make([]byte, smallBody); return &b }}

// heapBody: bodies up to this size are Go heap; larger ones are mapped.
const heapBody = 64 << 10

// chunkedSegment is the size of the mappings a body of unknown length
// (chunked) is read into, one after the other.
const chunkedSegment = 1 << 20

// bodyBudget counts what the bodies hold, against the limits.
type bodyBudget struct {
	memLimit   atomic.Int64
	spoolLimit atomic.Int64
	mem        atomic.Int64 // bytes in memory (mapped or heap)
	spool      atomic.Int64 // bytes in temporary files
	dir        string       // "" = os.TempDir()
}

func (b *bodyBudget) setLimits(mem, spool int64) {
	b.memLimit.Store(mem)
	b.spoolLimit.Store(spool)
}

// take reserves n bytes of counter under limit.
func take(counter, limit *atomic.Int64, n int64) bool {
	for {
		cur := counter.Load()
		if cur+n > limit.Load() {
			return false
		}
		if counter.CompareAndSwap(cur, cur+n) {
			return true
		}
	}
}

var errBodyBudget = errors.New("body budget exhausted")

// unmapFailures counts mappings that could not be given back.
var unmapFailures atomic.Int64

// segment is one piece of a body in memory.
type segment struct {
	b      []byte // len: bytes written; cap: the piece's size
	mapped bool   // an anonymous mapping (else Go heap)
	m      []byte // the whole mapping, as Munmap wants it back
	// charged is what the segment holds of budget.mem: a heap piece all
	// of its size; a mapping only the pages handed to reads so far (its
	// other pages are address space, not memory), so a client that
	// declares a large body and sends little holds little.
	charged int64
	// pooled: a small piece's buffer, from smallBodies and back there
	// once the body is released.
	pooled *[]byte
}

// body is one request's body, whole once received: in memory segments or
// in a temporary file, never both.
type body struct {
	budget *bodyBudget
	segs   []segment
	file   *os.File
	size   int64
	mem    int64 // bytes reserved in budget.mem
	spool  int64 // bytes reserved in budget.spool
	scan   bodyScan

	mu      sync.Mutex // guards the release against a reader
	owners  int        // the handler, and a reader given to the transport
	scratch []byte     // read buffer while spooling
	probe   [1]byte    // reads past the declared length, to see its end

	timed timedBody // the request's body as it is received
	seg0  [1]segment
}

// chargeWindow: a mapping is charged to the budget this much at a time,
// before the reads that fill it.
const chargeWindow = 64 << 10

// pageRound rounds n up to the page size: a mapping's real size.
func pageRound(n int64) int64 {
	p := int64(os.Getpagesize())
	return (n + p - 1) / p * p
}

// space returns where the next bytes of the body go, charging the budget
// for them first. length is the body's declared length, -1 when unknown.
func (b *body) space(length int64) ([]byte, error) {
	if length >= 0 && b.size >= length {
		return b.probe[:], nil // net/http ends the body at its length
	}
	if b.file != nil {
		if b.scratch == nil {
			b.scratch = copyBuffers.Get()
		}
		return b.scratch, nil
	}
	if n := len(b.segs); n > 0 {
		if s := &b.segs[n-1]; len(s.b) < cap(s.b) {
			if int64(len(s.b)) < s.charged {
				return s.b[len(s.b):s.charged], nil
			}
			// A mapping's next window: charged before it is touched.
			w := min(pageRound(int64(len(s.b))+chargeWindow), int64(cap(s.b))) - s.charged
			if take(&b.budget.mem, &b.budget.memLimit, w) {
				s.charged += w
				b.mem += w
				return s.b[len(s.b):s.charged], nil
			}
			if err := b.toSpool(); err != nil {
				return nil, err
			}
			return b.space(length)
		}
	}
	size := int64(chunkedSegment)
	switch {
	case length >= 0:
		size = length - b.size
	case len(b.segs) == 0:
		size = heapBody
	}
	seg, err := b.allocate(size)
	if err != nil {
		if serr := b.toSpool(); serr != nil {
			return nil, serr
		}
		return b.space(length)
	}
	if b.segs == nil {
		b.segs = b.seg0[:0]
	}
	b.segs = append(b.segs, seg)
	return b.space(length)
}

// allocate makes a piece of size bytes: heap, charged whole, for a small
// one; a mapping, charged as it fills, for a larger one.
func (b *body) allocate(size int64) (segment, error) {
	if size <= heapBody {
		if !take(&b.budget.mem, &b.budget.memLimit, size) {
			return segment{}, errBodyBudget
		}
		b.mem += size
		if size <= smallBody {
			p := smallBodies.Get().(*[]byte)
			return segment{b: (*p)[:0:size], charged: size, pooled: p}, nil
		}
		return segment{b: make([]byte, 0, size), charged: size}, nil
	}
	m, err := unix.Mmap(-1, 0, int(pageRound(size)), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return segment{}, fmt.Errorf("map %d bytes: %w", size, err)
	}
	return segment{b: m[:0:size], mapped: true, m: m}, nil
}

// wrote records n bytes written into the last space.
func (b *body) wrote(p []byte) error {
	if len(p) == 0 {
		return nil
	}
	if b.file != nil {
		if !b.reserveSpool(int64(len(p))) {
			return errBodyBudget
		}
		if _, err := b.file.Write(p); err != nil {
			return fmt.Errorf("spool a request body: %w", err)
		}
	} else {
		s := &b.segs[len(b.segs)-1]
		if len(s.b)+len(p) > cap(s.b) {
			return errors.New("request body longer than its Content-Length")
		}
		s.b = s.b[:len(s.b)+len(p)]
	}
	b.size += int64(len(p))
	return nil
}

// reserveSpool makes sure the body's bytes so far and n more are reserved
// in budget.spool.
func (b *body) reserveSpool(n int64) bool {
	if need := b.size + n - b.spool; need > 0 {
		if !take(&b.budget.spool, &b.budget.spoolLimit, need) {
			return false
		}
		b.spool += need
	}
	return true
}

// toSpool moves the body to a temporary file, freeing its memory. The
// file is charged to budget.spool for what it holds, as it grows.
func (b *body) toSpool() error {
	if !b.reserveSpool(0) {
		return errBodyBudget
	}
	f, err := os.CreateTemp(b.budget.dir, "citadel-body-*")
	if err != nil {
		return fmt.Errorf("spool a request body: %w", err)
	}
	// Unlinked at once: the file lives as long as the descriptor, and a
	// crash leaves nothing in the directory.
	_ = os.Remove(f.Name())
	for _, s := range b.segs {
		if _, err := f.Write(s.b); err != nil {
			f.Close()
			return fmt.Errorf("spool a request body: %w", err)
		}
	}
	b.file = f
	b.freeSegments()
	return nil
}

func (b *body) freeSegments() {
	for i, s := range b.segs {
		if s.pooled != nil {
			smallBodies.Put(s.pooled)
			b.segs[i] = segment{}
		}
		if s.mapped {
			if err := unix.Munmap(s.m); err != nil {
				// Cannot happen with the mapping Mmap gave; counted so a
				// test would see a leak.
				unmapFailures.Add(1)
			}
		}
	}
	b.segs = nil
	b.budget.mem.Add(-b.mem)
	b.mem = 0
}

// release gives back what the body holds once its last owner is done: the
// handler, and the reader the transport was given (net/http's transport
// closes a request's body, possibly after RoundTrip has returned).
func (b *body) release() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.owners--
	if b.owners > 0 {
		return
	}
	b.freeSegments()
	if b.file != nil {
		b.file.Close()
		b.file = nil
	}
	b.budget.spool.Add(-b.spool)
	b.spool = 0
	if b.scratch != nil {
		copyBuffers.Put(b.scratch)
		b.scratch = nil
	}
}

// receive reads a request's body whole, within the time bounds, max_body
// and the budget, scanning it for its model as it arrives. The caller
// releases the body.
func (g *Gateway) receive(w http.ResponseWriter, r *http.Request, set *Settings) (*body, *apiError) {
	b := &body{budget: g.bodies, owners: 1}
	b.timed = timedBody{r: r.Body, rc: controller(w), b: readBounds{idle: set.BodyTimeout, rate: set.MinBodyRate}, start: time.Now()}
	timed := &b.timed
	src := http.MaxBytesReader(w, timed, set.MaxBody)
	length := r.ContentLength
	if length > set.MaxBody {
		length = -1
	}
	for {
		p, err := b.space(length)
		if err != nil {
			return b, g.bodyError(w, r, set, err)
		}
		n, rerr := src.Read(p)
		if n > 0 {
			if err := b.wrote(p[:n]); err != nil {
				return b, g.bodyError(w, r, set, err)
			}
			if err := b.scan.write(p[:n]); err != nil {
				// Refused whatever follows: the rest is not read.
				timed.abandon()
				w.Header().Set("Connection", "close")
				return b, badBody(err)
			}
		}
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			return b, g.bodyError(w, r, set, rerr)
		}
	}
	timed.done()
	if b.scratch != nil {
		copyBuffers.Put(b.scratch)
		b.scratch = nil
	}
	if _, err := b.scan.finish(); err != nil {
		return b, badBody(err)
	}
	return b, nil
}

func badBody(err error) *apiError {
	return errBadRequest(http.StatusBadRequest, "invalid_request",
		fmt.Sprintf(`the body must be a JSON object naming its "model" once: %v`, err))
}

// bodyError answers a body that could not be received.
func (g *Gateway) bodyError(w http.ResponseWriter, r *http.Request, set *Settings, err error) *apiError {
	var tooLarge *http.MaxBytesError
	var stalled *errStalled
	switch {
	case errors.As(err, &tooLarge):
		return errBadRequest(http.StatusRequestEntityTooLarge, "request_too_large",
			fmt.Sprintf("request body over %d bytes (gateway.max_body)", set.MaxBody))
	case errors.As(err, &stalled):
		g.guard.stalls.WithLabelValues(stalled.why).Inc()
		w.Header().Set("Connection", "close")
		return errStalledClient(stalled)
	case errors.Is(err, errBodyBudget):
		w.Header().Set("Connection", "close")
		return errBodyBudgetFull(g.bodies)
	case r.Context().Err() != nil:
		return errClientGone
	case errors.Is(err, io.ErrUnexpectedEOF):
		return errClientGone // the client closed its side mid-body
	default:
		// The daemon's own trouble (no room in $TMPDIR, out of
		// descriptors): said as such, retryable.
		g.log.Warn("cannot hold a request body", zap.Error(err))
		w.Header().Set("Connection", "close")
		return &apiError{status: http.StatusServiceUnavailable, typ: "server_error", code: "body_not_held",
			msg: "the gateway cannot hold the request body now; retry", retryAfter: retryBusy, reject: RejectBodyBudget}
	}
}

// forwardBody is the body as the model gets it: served replaces the model's
// string when the client named the model otherwise. The reader releases
// the body when the transport closes it.
func (b *body) forwardBody(served string) (io.ReadCloser, int64) {
	name := b.scan.name
	var repl []byte
	if name != served {
		repl = jsonString(served)
	}
	at, end := b.scan.at, b.scan.end
	n := b.size
	if repl != nil {
		n += int64(len(repl)) - (end - at)
	}
	if buf, ok := b.heapBytes(served); ok {
		// A small body on the heap goes out as a bytes.Reader, with its
		// headers in one write; any other reader makes the transport flush
		// the headers first (Go issue 22088): a second write and packet
		// for every request. The garbage collector frees it.
		return io.NopCloser(bytes.NewReader(buf)), n
	}
	b.mu.Lock()
	b.owners++
	b.mu.Unlock()
	parts := []part{{from: 0, to: b.size}}
	if repl != nil {
		parts = []part{{from: 0, to: at}, {lit: repl}, {from: end, to: b.size}}
	}
	return &bodyReader{b: b, parts: parts}, n
}

// heapBytes returns a small body, one held whole on the heap, with served
// in place of the model's string when the client named the model
// otherwise; false for a body in a mapping or a file (forwardBody reads
// those). The garbage collector frees what it returns.
func (b *body) heapBytes(served string) ([]byte, bool) {
	if b.file != nil || len(b.segs) != 1 || b.segs[0].mapped {
		return nil, false
	}
	buf := b.segs[0].b
	if b.scan.name == served {
		return buf, true
	}
	repl := jsonString(served)
	at, end := b.scan.at, b.scan.end
	out := make([]byte, 0, int64(len(buf))+int64(len(repl))-(end-at))
	out = append(out, buf[:at]...)
	out = append(out, repl...)
	return append(out, buf[end:]...), true
}

// part is a range of the body, or literal bytes.
type part struct {
	from, to int64
	lit      []byte
}

// bodyReader reads a held body, in parts. Read and Close are serialised:
// the transport may close a body while its write loop still reads it, and
// a mapping must not be unmapped under a read.
type bodyReader struct {
	b      *body
	parts  []part
	closed bool
}

func (r *bodyReader) Read(p []byte) (int, error) {
	r.b.mu.Lock()
	defer r.b.mu.Unlock()
	if r.closed {
		return 0, errors.New("request body closed")
	}
	for len(r.parts) > 0 {
		pt := &r.parts[0]
		if pt.lit != nil {
			n := copy(p, pt.lit)
			pt.lit = pt.lit[n:]
			if len(pt.lit) == 0 {
				r.parts = r.parts[1:]
			}
			return n, nil
		}
		if pt.from >= pt.to {
			r.parts = r.parts[1:]
			continue
		}
		if int64(len(p)) > pt.to-pt.from {
			p = p[:pt.to-pt.from]
		}
		n, err := r.b.readAt(p, pt.from)
		pt.from += int64(n)
		if err != nil && !errors.Is(err, io.EOF) {
			return n, err
		}
		return n, nil
	}
	return 0, io.EOF
}

func (r *bodyReader) Close() error {
	r.b.mu.Lock()
	if r.closed {
		r.b.mu.Unlock()
		return nil
	}
	r.closed = true
	r.b.mu.Unlock()
	r.b.release()
	return nil
}

// readAt reads the body at off. Called with mu held.
func (b *body) readAt(p []byte, off int64) (int, error) {
	if b.file != nil {
		return b.file.ReadAt(p, off)
	}
	for _, s := range b.segs {
		if off < int64(len(s.b)) {
			return copy(p, s.b[off:]), nil
		}
		off -= int64(len(s.b))
	}
	return 0, io.EOF
}

// held reports the bytes bodies hold, for the metrics.
func (b *bodyBudget) held() (mem, spool int64) { return b.mem.Load(), b.spool.Load() }

// errBodyBudgetFull: the gateway holds as many bodies as it may.
func errBodyBudgetFull(b *bodyBudget) *apiError {
	mem, spool := b.held()
	return &apiError{status: http.StatusTooManyRequests, typ: "rate_limit_error", code: "body_budget",
		msg: fmt.Sprintf("the gateway already holds %s of request bodies in memory and %s in files (gateway.body_memory, gateway.body_spool); retry later",
			sizeText(mem), sizeText(spool)),
		retryAfter: retryBusy, reject: RejectBodyBudget}
}

func errStalledClient(e *errStalled) *apiError {
	return &apiError{status: http.StatusRequestTimeout, typ: "invalid_request_error", code: "request_timeout",
		msg: e.Error(), reject: RejectClientStall}
}

func sizeText(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%d KiB", n>>10)
}
