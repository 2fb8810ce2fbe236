// Package netguard keeps the daemon's listeners from being turned against
// it: a cap on concurrent connections, sized from the descriptor limit, and
// a reserve descriptor that lets an accept that hit EMFILE shed the
// connection instead of spinning, so a local user holding many idle
// connections cannot take the descriptors the daemon needs to probe its
// models, read /proc and answer citadelctl.
package netguard

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// Limits returns the connection caps for the HTTP listener and the control
// socket, from the process's descriptor limit: together at most a quarter
// of it, so most descriptors stay for the daemon's own work (model pipes,
// probes, /proc, the log).
func Limits() (http, control int) { return limitsFor(Descriptors()) }

func limitsFor(n int) (http, control int) {
	return clamp(n/6, 4, 256), clamp(n/12, 4, 64)
}

func clamp(v, lo, hi int) int { return max(lo, min(v, hi)) }

// Descriptors is the process's descriptor limit (RLIMIT_NOFILE's soft
// limit, which Go raises to the hard limit at start-up).
func Descriptors() int {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err == nil && rl.Cur < 1<<30 {
		return int(rl.Cur)
	}
	return 1024
}

// Descriptors the gateway leaves to the rest of the daemon. The gateway is
// the one listener anyone can reach in numbers, so its cap is what is left
// of the descriptor limit once these are set aside (docs/gateway.md,
// "Connections"):
const (
	// ReserveBase: the daemon's own (listeners, log, journald, NVML, the
	// cgroup and /proc files it reads, spawns in flight).
	ReserveBase = 256
	// ReservePerModel: a model's output pipes, pidfd and cgroup leaf (and
	// the files /metrics keeps open: the leaf's cpu.stat and
	// memory.current, or its processes' statm or stat), its probe's
	// connection, and the gateway's idle connections to it.
	ReservePerModel = 80
	// PerGatewayConn: one gateway request can hold a client socket, a
	// socket to its model and a temporary file for its body.
	PerGatewayConn = 3
	// MaxGatewayConns bounds the derived cap: each connection costs some
	// 30 KiB of memory besides its body; more clients than this belong
	// behind a load balancer (docs/scaling.md).
	MaxGatewayConns = 4096
)

// GatewayLimit is the gateway's connection cap for a descriptor limit and
// a number of models: what the metrics port, the control socket, the
// daemon and each model keep set aside, divided by what one gateway
// connection can hold; at least 16.
func GatewayLimit(nofile, models int) int {
	http, control := limitsFor(nofile)
	// The control socket holds up to twice its cap: the connections kept
	// for root and the control group, and `logs -f` followers, are
	// counted apart (control.Limits).
	left := nofile - ReserveBase - http - 2*control - models*ReservePerModel
	return clamp(left/PerGatewayConn, 16, MaxGatewayConns)
}

// Listener caps concurrent connections at n: Accept waits while n are
// open (the rest wait in the kernel's backlog, holding none of the
// daemon's descriptors), as golang.org/x/net/netutil.LimitListener does.
// And when accept fails for want of descriptors (EMFILE, ENFILE), it frees
// its reserve descriptor, accepts and closes the waiting connection at
// once, and takes the reserve again: the client is refused, the daemon is
// not wedged.
type Listener struct {
	net.Listener
	sem     chan struct{}
	log     *zap.Logger
	mu      sync.Mutex
	reserve int // an open /dev/null, or -1
	logged  time.Time
	done    chan struct{}
	once    sync.Once
	gate    chan struct{} // closed while accepting; open (nil-closed) again after Resume
	open    atomic.Int64  // connections accepted and not closed

	perAddr   int                // 0 = no cap per client address
	byAddr    map[netip.Addr]int // open connections per address (with perAddr)
	refuse    func(net.Conn)     // answers a connection refused by perAddr
	refused   atomic.Uint64      // connections refused by perAddr
	shedCount atomic.Uint64      // connections shed for want of descriptors
}

// LimitPerAddress caps the connections one client address may hold open at
// n (TCP only). A connection beyond it is handed to refuse (which may write
// a short answer; it must not block) and closed, and Accept goes on. Call
// it before serving.
func (l *Listener) LimitPerAddress(n int, refuse func(net.Conn)) {
	l.perAddr, l.refuse = n, refuse
	l.byAddr = map[netip.Addr]int{}
}

// Cap is the connection cap.
func (l *Listener) Cap() int { return cap(l.sem) }

// Refused counts the connections refused by the per-address cap, and those
// shed for want of descriptors.
func (l *Listener) Refused() (perAddress, descriptors uint64) {
	return l.refused.Load(), l.shedCount.Load()
}

// admitAddr counts c against its address's cap; false when it is over.
func (l *Listener) admitAddr(c net.Conn) (netip.Addr, bool) {
	ta, ok := c.RemoteAddr().(*net.TCPAddr)
	if l.perAddr <= 0 || !ok {
		return netip.Addr{}, true
	}
	ip := ta.AddrPort().Addr().Unmap()
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.byAddr[ip] >= l.perAddr {
		return ip, false
	}
	l.byAddr[ip]++
	return ip, true
}

func (l *Listener) forgetAddr(ip netip.Addr) {
	if !ip.IsValid() {
		return
	}
	l.mu.Lock()
	if l.byAddr[ip]--; l.byAddr[ip] <= 0 {
		delete(l.byAddr, ip)
	}
	l.mu.Unlock()
}

// Limit wraps ln.
func Limit(ln net.Listener, n int, log *zap.Logger) *Listener {
	l := &Listener{Listener: ln, sem: make(chan struct{}, n), log: log, reserve: -1, done: make(chan struct{}), gate: make(chan struct{})}
	close(l.gate)
	l.takeReserve()
	return l
}

// Pause stops accepting: new connections wait in the kernel's backlog, for
// whoever accepts next (this process after Resume, or the next image of it
// after an upgrade, which inherits the socket). An Accept blocked in the
// kernel is woken by a deadline in the past.
func (l *Listener) Pause() {
	l.mu.Lock()
	select {
	case <-l.gate:
		l.gate = make(chan struct{})
	default:
	}
	l.mu.Unlock()
	if dl, ok := l.Listener.(interface{ SetDeadline(time.Time) error }); ok {
		_ = dl.SetDeadline(time.Unix(1, 0))
	}
}

// Resume accepts again.
func (l *Listener) Resume() {
	if dl, ok := l.Listener.(interface{ SetDeadline(time.Time) error }); ok {
		_ = dl.SetDeadline(time.Time{})
	}
	l.mu.Lock()
	select {
	case <-l.gate:
	default:
		close(l.gate)
	}
	l.mu.Unlock()
}

func (l *Listener) accepting() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.gate
}

// Open is the number of connections open now.
func (l *Listener) Open() int { return int(l.open.Load()) }

// Quiet waits until at most n connections are open, or ctx ends.
func (l *Listener) Quiet(ctx context.Context, n int) error {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for l.Open() > n {
		select {
		case <-ctx.Done():
			return fmt.Errorf("%d connections still open: %w", l.Open(), ctx.Err())
		case <-tick.C: // connections close on the clients' schedule: polled
		}
	}
	return nil
}

// Dup returns a duplicate of the listening socket without close-on-exec,
// for the next image of this process; the caller closes it.
func (l *Listener) Dup() (int, error) {
	sc, ok := l.Listener.(syscall.Conn)
	if !ok {
		return -1, fmt.Errorf("listener %T has no descriptor", l.Listener)
	}
	return DupForExec(sc)
}

// DupForExec duplicates c's descriptor without close-on-exec (a listener,
// a pipe), for the next image of this process; the caller closes it.
func DupForExec(c syscall.Conn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	var derr error
	if err := rc.Control(func(s uintptr) { fd, derr = unix.Dup(int(s)) }); err != nil {
		return -1, err
	}
	return fd, derr
}

func (l *Listener) takeReserve() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.reserve < 0 {
		if fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
			l.reserve = fd
		}
	}
}

// Accept waits for a free slot, then accepts.
func (l *Listener) Accept() (net.Conn, error) {
	select {
	case l.sem <- struct{}{}:
	case <-l.done:
		return nil, net.ErrClosed
	}
	for {
		select {
		case <-l.accepting():
		case <-l.done:
			<-l.sem
			return nil, net.ErrClosed
		}
		c, err := l.Listener.Accept()
		if err == nil {
			ip, ok := l.admitAddr(c)
			if !ok {
				l.refused.Add(1)
				if l.refuse != nil {
					l.refuse(c)
				}
				c.Close()
				continue
			}
			l.open.Add(1)
			return &conn{Conn: c, release: func() { l.forgetAddr(ip); l.open.Add(-1); <-l.sem }}, nil
		}
		if os.IsTimeout(err) {
			continue // woken by Pause (or the shed's own deadline)
		}
		if !errors.Is(err, syscall.EMFILE) && !errors.Is(err, syscall.ENFILE) {
			<-l.sem
			return nil, err
		}
		l.shed()
	}
}

// shed uses the reserve descriptor to accept one waiting connection and
// close it, then takes the reserve back.
func (l *Listener) shed() {
	l.shedCount.Add(1)
	l.mu.Lock()
	if l.reserve >= 0 {
		unix.Close(l.reserve)
		l.reserve = -1
	}
	// Said once per 10 s: a flood would fill the journal.
	if now := time.Now(); now.Sub(l.logged) > 10*time.Second {
		l.logged = now
		l.mu.Unlock()
		l.log.Warn("out of file descriptors: refusing a connection")
	} else {
		l.mu.Unlock()
	}
	if tl, ok := l.Listener.(interface{ SetDeadline(time.Time) error }); ok {
		_ = tl.SetDeadline(time.Now().Add(10 * time.Millisecond))
	}
	if c, err := l.Listener.Accept(); err == nil {
		c.Close()
	}
	if tl, ok := l.Listener.(interface{ SetDeadline(time.Time) error }); ok {
		_ = tl.SetDeadline(time.Time{})
	}
	l.takeReserve()
	// Give what holds descriptors a moment to let go; Accept would fail
	// the same way at once.
	time.Sleep(10 * time.Millisecond)
}

// Close closes the listener and the reserve.
func (l *Listener) Close() error {
	l.once.Do(func() { close(l.done) })
	l.mu.Lock()
	if l.reserve >= 0 {
		unix.Close(l.reserve)
		l.reserve = -1
	}
	l.mu.Unlock()
	return l.Listener.Close()
}

type conn struct {
	net.Conn
	once    sync.Once
	release func()
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// NetConn is the accepted connection itself (for SO_PEERCRED on a Unix
// socket), as crypto/tls.Conn's NetConn is.
func (c *conn) NetConn() net.Conn { return c.Conn }
