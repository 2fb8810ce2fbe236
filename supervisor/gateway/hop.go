package gateway

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The hop to a model: an HTTP/1.1 client that writes each request and
// reads its answer on the request's own goroutine. net/http's Transport
// hands every request to two goroutines of its connection (writeLoop,
// readLoop) and back: on a fast model those hand-offs and the scheduler's
// wake-ups were most of the gateway's CPU besides the hop's system calls
// (docs/performance.md). The parsing is the standard library's:
// http.ReadResponse reads the status, the headers and the body's framing
// (Content-Length, chunked, or to the end of an HTTP/1.0 connection).
// What is here is what a kept-alive connection needs, by the rules
// net/http's Transport follows:
//
//   - a connection goes back to the pool only once its answer was read to
//     its end, with nothing after it, and never after Connection: close or
//     an HTTP/1.0 answer without keep-alive; any other end closes it, so
//     the model sees a client that hung up as a closed connection;
//   - a request that finds its kept-alive connection closed by the model
//     while idle (vLLM closes one idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s
//     by default) is sent once more on a new connection, when no byte of
//     an answer came back: the model never saw it. Bodies are held whole
//     by the gateway (bodies.go), so the body can be sent again. A request
//     on a new connection is never sent twice;
//   - the request's context ends it: the connection is closed under any
//     read or write in progress;
//   - a connection idle for upstreamIdle is closed, and at most
//     maxIdlePerModel are kept.
//
// A connection is in the pool or owned by one request, never both: a
// request takes it out under the pool's lock and puts it back when done.

// staleAfter: a pooled connection idle longer than this is asked whether
// the model closed it before it is used (a non-blocking peek: one system
// call), instead of finding out by a failed request. Connections in use
// every few milliseconds are not asked.
const staleAfter = time.Second

// hopClient is one model's pool of kept-alive connections.
type hopClient struct {
	host       string // host:port, also the Host header
	dialer     net.Dialer
	staleAfter time.Duration
	retries    atomic.Int64 // requests sent again on a new connection

	mu     sync.Mutex
	idle   []*hopConn // oldest first
	closed bool
	timer  *time.Timer // closes connections idle for upstreamIdle
	armed  bool
}

// hopConn is one connection to the model.
type hopConn struct {
	conn      net.Conn
	br        *bufio.Reader // reads through lim
	lim       headLimit
	idleSince time.Time
	reused    bool // it served a request before
	// abort closes the connection under the I/O in progress when the
	// request's context ends: made once, for every request it serves.
	abort func()
}

// maxAnswerHead bounds what the gateway reads of an answer's status line
// and headers: net/http's Transport's default (MaxResponseHeaderBytes),
// so a model that sends headers without end cannot grow the gateway's
// memory.
const maxAnswerHead = 10 << 20

// headLimit is the reader under a connection's bufio.Reader: while an
// answer's head is read, at most left bytes come from the connection
// (left < 0: no bound, while its body is read).
type headLimit struct {
	conn net.Conn
	left int64
}

var errAnswerHead = fmt.Errorf("the model's answer has over %d bytes of headers", maxAnswerHead)

func (l *headLimit) Read(p []byte) (int, error) {
	if l.left < 0 {
		return l.conn.Read(p)
	}
	if l.left == 0 {
		return 0, errAnswerHead
	}
	if int64(len(p)) > l.left {
		p = p[:l.left]
	}
	n, err := l.conn.Read(p)
	l.left -= int64(n)
	return n, err
}

func newHopClient(host string) *hopClient {
	return &hopClient{host: host, dialer: net.Dialer{Timeout: dialTimeout, KeepAlive: 30 * time.Second}, staleAfter: staleAfter}
}

// outBody is a request's body as the gateway holds it: small bodies in
// memory, sent with the head in one write; others opened (and opened
// again, for a second try) as a reader, length -1 when unknown (chunked).
type outBody struct {
	small []byte
	open  func() (io.ReadCloser, int64)
}

// errProtocolSwitch: the gateway never asks for an upgrade (Upgrade is a
// hop-by-hop header it drops), so a 101 is a model's error.
var errProtocolSwitch = errors.New("the model switched protocols")

// roundTrip sends r (its method, path, query and headers less the
// hop-by-hop ones) with body to the model and returns its answer. The
// answer's Body must be closed; read to its end, it gives the connection
// back to the pool.
func (c *hopClient) roundTrip(ctx context.Context, r *http.Request, body outBody) (*http.Response, error) {
	hb := heads.Get().(*[]byte)
	defer heads.Put(hb)
	for attempt := 0; ; attempt++ {
		var pc *hopConn
		var err error
		if attempt == 0 {
			pc, err = c.get(ctx)
		} else {
			pc, err = c.dial(ctx)
		}
		if err != nil {
			return nil, err
		}
		stop := context.AfterFunc(ctx, pc.abort)
		res, retry, err := c.exchange(pc, r, body, hb, stop)
		if err == nil {
			return res, nil
		}
		stop()
		pc.conn.Close() //nolint:errcheck // failed: not reused
		if !retry || !pc.reused || attempt > 0 || ctx.Err() != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("%w (%w)", ctx.Err(), err)
			}
			return nil, err
		}
		c.retries.Add(1)
	}
}

// exchange writes the request on pc and reads the answer's head. retry:
// nothing of an answer was read, so the model did not take the request
// (when pc was reused: it had closed the connection while idle).
func (c *hopClient) exchange(pc *hopConn, r *http.Request, body outBody, hb *[]byte, stop func() bool) (*http.Response, bool, error) {
	if err := c.write(pc, r, body, hb); err != nil {
		return nil, true, err
	}
	pc.lim.left = maxAnswerHead
	defer func() { pc.lim.left = -1 }()
	if _, err := pc.br.Peek(1); err != nil {
		return nil, true, err
	}
	res, err := http.ReadResponse(pc.br, r)
	// 1xx answers (100 Continue to a client's Expect) come before the
	// answer; net/http's Transport skips them too.
	for n := 0; err == nil && res.StatusCode >= 100 && res.StatusCode < 200 && res.StatusCode != http.StatusSwitchingProtocols; n++ {
		if n == 5 {
			return nil, false, errors.New("too many 1xx answers")
		}
		res, err = http.ReadResponse(pc.br, r)
	}
	if err != nil {
		return nil, false, err
	}
	if res.StatusCode == http.StatusSwitchingProtocols {
		return nil, false, errProtocolSwitch
	}
	b := &hopBody{rc: res.Body, pc: pc, c: c, stop: stop, keep: !res.Close}
	if res.Body == http.NoBody {
		b.finish(io.EOF)
	}
	res.Body = b
	return res, false, nil
}

// write sends the request's head and body.
func (c *hopClient) write(pc *hopConn, r *http.Request, body outBody, hb *[]byte) error {
	if body.open == nil {
		b := appendHead((*hb)[:0], r, c.host, int64(len(body.small)))
		b = append(b, body.small...)
		*hb = b
		_, err := pc.conn.Write(b)
		return err
	}
	rd, n := body.open()
	defer rd.Close() //nolint:errcheck // a held body's reader: releases it
	b := appendHead((*hb)[:0], r, c.host, n)
	*hb = b
	bw := bufio.NewWriterSize(pc.conn, 32<<10)
	bw.Write(b) //nolint:errcheck // bufio keeps the error for Flush
	var w io.Writer = bw
	var cw io.WriteCloser
	if n < 0 {
		cw = httputil.NewChunkedWriter(bw)
		w = cw
	}
	buf := copyBuffers.Get()
	defer copyBuffers.Put(buf)
	if _, err := io.CopyBuffer(w, onlyReader{rd}, buf); err != nil {
		return err
	}
	if cw != nil {
		cw.Close()             //nolint:errcheck // bufio keeps the error for Flush
		bw.WriteString("\r\n") //nolint:errcheck // bufio keeps the error for Flush
	}
	return bw.Flush()
}

// onlyReader hides a reader's WriterTo, so io.CopyBuffer uses the buffer.
type onlyReader struct{ io.Reader }

// appendHead appends the request line and headers of r, less those
// hop-by-hop and those the framing sets, to b.
func appendHead(b []byte, r *http.Request, host string, length int64) []byte {
	b = append(b, r.Method...)
	b = append(b, ' ')
	if r.URL.RawPath == "" {
		b = append(b, r.URL.EscapedPath()...)
	} else {
		// The path as the gateway checked it (decoded), encoded again.
		b = append(b, (&url.URL{Path: r.URL.Path}).EscapedPath()...)
	}
	if r.URL.RawQuery != "" {
		b = append(b, '?')
		b = append(b, r.URL.RawQuery...)
	}
	b = append(b, " HTTP/1.1\r\nHost: "...)
	b = append(b, host...)
	b = append(b, "\r\n"...)
	named := connectionNamed(r.Header)
	for k, vv := range r.Header {
		if hopHeader(k, named) || k == "Content-Length" || k == "Host" {
			continue
		}
		for _, v := range vv {
			b = append(b, k...)
			b = append(b, ": "...)
			b = appendValue(b, v)
			b = append(b, "\r\n"...)
		}
	}
	if length >= 0 {
		b = append(b, "Content-Length: "...)
		b = strconv.AppendInt(b, length, 10)
		b = append(b, "\r\n\r\n"...)
	} else {
		b = append(b, "Transfer-Encoding: chunked\r\n\r\n"...)
	}
	return b
}

// appendValue appends a header value with line breaks made spaces, as
// net/http writes one: a value can never end the head early.
func appendValue(b []byte, v string) []byte {
	if strings.IndexByte(v, '\r') < 0 && strings.IndexByte(v, '\n') < 0 {
		return append(b, v...)
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c == '\r' || c == '\n' {
			c = ' '
		}
		b = append(b, c)
	}
	return b
}

// heads are the request heads' buffers.
var heads = sync.Pool{New: func() any { b := make([]byte, 0, 4<<10); return &b }}

// get takes the most recently used idle connection that the model has not
// closed, or dials a new one.
func (c *hopClient) get(ctx context.Context) (*hopConn, error) {
	for {
		c.mu.Lock()
		n := len(c.idle)
		if n == 0 {
			c.mu.Unlock()
			return c.dial(ctx)
		}
		pc := c.idle[n-1]
		c.idle[n-1] = nil
		c.idle = c.idle[:n-1]
		c.mu.Unlock()
		if time.Since(pc.idleSince) < c.staleAfter || pc.open() {
			return pc, nil
		}
		pc.conn.Close() //nolint:errcheck // closed by the model
	}
}

func (c *hopClient) dial(ctx context.Context) (*hopConn, error) {
	conn, err := c.dialer.DialContext(ctx, "tcp", c.host)
	if err != nil {
		return nil, err
	}
	pc := &hopConn{conn: conn, lim: headLimit{conn: conn, left: -1}}
	pc.br = bufio.NewReaderSize(&pc.lim, 4<<10)
	pc.abort = func() { conn.Close() } //nolint:errcheck // ends the I/O in progress
	return pc, nil
}

// open says whether an idle connection is still open at the model's end:
// nothing to read (EAGAIN) means open; an end of file, an error or bytes
// nobody asked for mean it cannot serve a request.
func (pc *hopConn) open() bool {
	sc, ok := pc.conn.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	open := false
	err = rc.Read(func(fd uintptr) bool {
		var b [1]byte
		_, _, rerr := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		open = errors.Is(rerr, unix.EAGAIN)
		return true
	})
	return err == nil && open
}

// put gives a connection whose answer was read whole back to the pool.
func (c *hopClient) put(pc *hopConn) {
	pc.idleSince = time.Now()
	pc.reused = true
	c.mu.Lock()
	if c.closed || len(c.idle) >= maxIdlePerModel {
		c.mu.Unlock()
		pc.conn.Close() //nolint:errcheck // not kept
		return
	}
	c.idle = append(c.idle, pc)
	if !c.armed {
		c.armed = true
		if c.timer == nil {
			c.timer = time.AfterFunc(upstreamIdle, c.sweep)
		} else {
			c.timer.Reset(upstreamIdle)
		}
	}
	c.mu.Unlock()
}

// sweep closes the connections idle for upstreamIdle, and runs again when
// the oldest left will be.
func (c *hopClient) sweep() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.armed = false
	if c.closed {
		return
	}
	now := time.Now()
	i := 0
	for ; i < len(c.idle) && now.Sub(c.idle[i].idleSince) >= upstreamIdle; i++ {
		c.idle[i].conn.Close() //nolint:errcheck // idle too long
	}
	c.idle = append(c.idle[:0], c.idle[i:]...)
	if len(c.idle) > 0 {
		c.armed = true
		c.timer.Reset(upstreamIdle - now.Sub(c.idle[0].idleSince))
	}
}

// close closes the idle connections; those in use are closed when their
// requests end.
func (c *hopClient) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for _, pc := range c.idle {
		pc.conn.Close() //nolint:errcheck // closing
	}
	c.idle = nil
	if c.timer != nil {
		c.timer.Stop()
	}
}

// idleConns is how many connections the pool holds (tests).
func (c *hopClient) idleConns() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.idle)
}

// hopBody is an answer's body. Read to its end (io.EOF), it gives the
// connection back to the pool; closed before, or failed, it closes the
// connection. Read and Close are called from the request's goroutine only.
type hopBody struct {
	rc   io.ReadCloser
	pc   *hopConn
	c    *hopClient
	stop func() bool // the request context's hook that closes the connection
	keep bool        // the answer allows another request on the connection
	err  error       // set once finished
}

func (b *hopBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	n, err := b.rc.Read(p)
	if err != nil {
		b.finish(err)
	}
	return n, err
}

func (b *hopBody) Close() error {
	if b.err == nil {
		b.finish(errBodyClosed)
	}
	return nil
}

var errBodyClosed = errors.New("answer body closed")

func (b *hopBody) finish(err error) {
	b.err = err
	// A hook that already ran closed the connection; one that did not
	// never will.
	if b.stop() && err == io.EOF && b.keep && b.pc.br.Buffered() == 0 {
		b.c.put(b.pc)
		return
	}
	b.pc.conn.Close() //nolint:errcheck // not reusable
}
