package control

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"sync"
	"time"

	"citadel-supervisor/supervisor/control/api"
)

// Nobody can monopolise the control socket. Every member of its group may
// connect, so one of them (or a script gone wrong) could hold every
// connection: 64 `citadelctl logs -f`, or 64 requests sent half-way, used to
// lock everyone out, root included, and with them every stop, reload and
// upgrade. So:
//   - each user (peer uid) holds at most perUID connections; root is not
//     counted against it;
//   - the last `reserved` connections are kept for peers that may change
//     state (root, the daemon's user, the control group): a user who may
//     only read never takes them;
//   - `logs -f` followers are counted apart from requests, in a pool of
//     their own (followers, followersPerUID), so following logs never
//     takes a connection a command needs;
//   - a request must arrive whole within its read bound (server.go).
//
// A connection over a limit gets a 429 answer saying which, and is closed.

// Limits of the control socket's connections.
type Limits struct {
	Conns           int // connections for requests, any peer
	Reserved        int // more, for peers that may change state
	PerUID          int // connections one user may hold (root excepted)
	Followers       int // `logs -f` connections, all users
	FollowersPerUID int // `logs -f` connections one user may hold (root excepted)
}

// DefaultLimits derives the limits from the connection cap (MaxConns). Their
// total stays within twice it, which netguard.GatewayLimit sets aside.
func DefaultLimits(conns int) Limits {
	conns = max(conns, 4)
	return Limits{
		Conns:           conns,
		Reserved:        max(conns/8, 2),
		PerUID:          max(conns/4, 2),
		Followers:       max(conns/2, 2),
		FollowersPerUID: max(conns/16, 1),
	}
}

// Total is every connection the limits allow at once: the listener's cap.
func (l Limits) Total() int { return l.Conns + l.Reserved + l.Followers }

// admitter counts connections by kind and peer.
type admitter struct {
	lim       Limits
	mu        sync.Mutex
	conns     int            // request connections open (reserved ones included)
	byUID     map[uint32]int // request connections by peer uid
	followers int
	followUID map[uint32]int
}

func newAdmitter(l Limits) *admitter {
	return &admitter{lim: l, byUID: map[uint32]int{}, followUID: map[uint32]int{}}
}

// admitted is one connection's place, stored in its requests' context.
type admitted struct {
	a        *admitter
	peer     Peer
	known    bool // peer credentials read
	follower bool
	closed   bool
}

type admittedKey struct{}

// admit decides on a new connection from peer; privileged: it may change
// state. The answer is "" when admitted, else why not.
func (a *admitter) admit(peer Peer, known, privileged bool) (*admitted, string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	general := a.lim.Conns
	if privileged {
		general += a.lim.Reserved
	}
	switch {
	case a.conns >= general && !privileged:
		return nil, fmt.Sprintf("the control socket has %d connections open, its limit for users who may only read; the rest are kept for root and the control group", a.conns)
	case a.conns >= general:
		return nil, fmt.Sprintf("the control socket has %d connections open, its limit", a.conns)
	case known && peer.UID != 0 && a.byUID[peer.UID] >= a.lim.PerUID:
		return nil, fmt.Sprintf("uid %d already holds %d connections to the control socket, the most one user may (close some: a stuck script?)", peer.UID, a.byUID[peer.UID])
	}
	a.conns++
	if known {
		a.byUID[peer.UID]++
	}
	return &admitted{a: a, peer: peer, known: known}, ""
}

// follow moves a connection from the requests' count to the followers'
// pool; the answer is "" when it may follow, else why not.
func (c *admitted) follow() string {
	a := c.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if c.follower || c.closed {
		return ""
	}
	root := c.known && c.peer.UID == 0
	switch {
	case a.followers >= a.lim.Followers:
		return fmt.Sprintf("%d `logs -f` are following already, the most the control socket allows", a.followers)
	case c.known && !root && a.followUID[c.peer.UID] >= a.lim.FollowersPerUID:
		return fmt.Sprintf("uid %d already follows logs on %d connections, the most one user may", c.peer.UID, a.followUID[c.peer.UID])
	}
	a.followers++
	if c.known {
		a.followUID[c.peer.UID]++
	}
	c.follower = true
	a.conns--
	if c.known {
		if a.byUID[c.peer.UID]--; a.byUID[c.peer.UID] <= 0 {
			delete(a.byUID, c.peer.UID)
		}
	}
	return ""
}

func (c *admitted) release() {
	a := c.a
	a.mu.Lock()
	defer a.mu.Unlock()
	if c.closed {
		return
	}
	c.closed = true
	uid := c.peer.UID
	if c.follower {
		a.followers--
		if c.known {
			if a.followUID[uid]--; a.followUID[uid] <= 0 {
				delete(a.followUID, uid)
			}
		}
		return
	}
	a.conns--
	if c.known {
		if a.byUID[uid]--; a.byUID[uid] <= 0 {
			delete(a.byUID, uid)
		}
	}
}

// admitListener admits each accepted connection by its peer, answering
// and closing the ones over a limit.
type admitListener struct {
	net.Listener
	a         *admitter
	peerOf    func(net.Conn) (Peer, bool)
	privilege func(Peer) bool
}

func (l *admitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		peer, known := l.peerOf(c)
		adm, why := l.a.admit(peer, known, known && l.privilege(peer))
		if adm == nil {
			refuse(c, why)
			continue
		}
		return &admittedConn{Conn: c, adm: adm}, nil
	}
}

// refuse answers a connection over a limit and closes it. The answer fits
// any socket buffer, so the write does not wait on the client.
func refuse(c net.Conn, why string) {
	body, _ := json.Marshal(api.ErrorResponse{Error: "too many connections: " + why})
	_ = c.SetWriteDeadline(time.Now().Add(100 * time.Millisecond))
	_, _ = c.Write([]byte("HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: " +
		strconv.Itoa(len(body)+1) + "\r\n\r\n" + string(body) + "\n"))
	c.Close()
}

// admittedConn gives its place back when closed.
type admittedConn struct {
	net.Conn
	adm  *admitted
	once sync.Once
}

func (c *admittedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.adm.release)
	return err
}

// NetConn is the accepted connection (the cap's wrapper, then the socket).
func (c *admittedConn) NetConn() net.Conn { return c.Conn }

// admittedOf returns a request's connection place, if any.
func admittedOf(ctx context.Context) *admitted {
	a, _ := ctx.Value(admittedKey{}).(*admitted)
	return a
}
