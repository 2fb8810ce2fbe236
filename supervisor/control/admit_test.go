package control

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
)

// TestAdmitRules: the limits of admit.go, one decision at a time.
func TestAdmitRules(t *testing.T) {
	lim := Limits{Conns: 4, Reserved: 2, PerUID: 2, Followers: 3, FollowersPerUID: 1}
	a := newAdmitter(lim)
	reader := func(uid uint32) Peer { return Peer{UID: uid, GID: 100} }
	var held []*admitted
	in := func(p Peer, privileged bool) string {
		t.Helper()
		c, why := a.admit(p, true, privileged)
		if c != nil {
			held = append(held, c)
		}
		return why
	}
	if why := in(reader(1000), false); why != "" {
		t.Fatal(why)
	}
	in(reader(1000), false)
	if why := in(reader(1000), false); !strings.Contains(why, "uid 1000 already holds 2 connections") {
		t.Errorf("over the per-user cap: %q", why)
	}
	in(reader(1001), false)
	in(reader(1002), false)
	if why := in(reader(1003), false); !strings.Contains(why, "kept for root and the control group") {
		t.Errorf("a reader in the reserve: %q", why)
	}
	// The reserve is root's and the control group's.
	if why := in(Peer{UID: 0}, true); why != "" {
		t.Errorf("root in the reserve: %q", why)
	}
	if why := in(Peer{UID: 990}, true); why != "" {
		t.Errorf("an operator in the reserve: %q", why)
	}
	if why := in(Peer{UID: 0}, true); !strings.Contains(why, "its limit") {
		t.Errorf("past every slot: %q", why)
	}
	// A follower leaves the requests' count: root gets its place.
	if why := held[0].follow(); why != "" {
		t.Fatal(why)
	}
	if why := in(Peer{UID: 0}, true); why != "" {
		t.Errorf("after a connection became a follower: %q", why)
	}
	if why := held[1].follow(); !strings.Contains(why, "uid 1000 already follows logs on 1 connections") {
		t.Errorf("a second follower of one user: %q", why)
	}
	held[0].release()
	held[0].release() // twice: given back once
	if why := held[1].follow(); why != "" {
		t.Errorf("after the follower left: %q", why)
	}
	if a.followers != 1 || a.conns != 5 {
		t.Errorf("followers %d, conns %d", a.followers, a.conns)
	}
	for _, c := range held {
		c.release()
	}
	if a.conns != 0 || a.followers != 0 || len(a.byUID) != 0 || len(a.followUID) != 0 {
		t.Errorf("left counted: conns %d followers %d byUID %v followUID %v", a.conns, a.followers, a.byUID, a.followUID)
	}
}

// followBackend serves status, operations and a log that never ends.
type followBackend struct {
	Backend
	ops sync.Map
}

func (*followBackend) Status(...string) ([]api.Status, error) {
	return []api.Status{{Name: "a", State: api.Ready}}, nil
}

func (b *followBackend) Do(_ context.Context, op api.Op, names ...string) (map[string]error, error) {
	out := map[string]error{}
	for _, n := range names {
		b.ops.Store(n, op)
		out[n] = nil
	}
	return out, nil
}

func (*followBackend) Output(string, int) ([]string, error) { return []string{"line"}, nil }

func (*followBackend) Follow(string) (<-chan string, func(), error) {
	return make(chan string), func() {}, nil
}

// peers hands out the peer of each next connection, in the order they
// are made (the listener accepts in that order).
type peers struct {
	mu   sync.Mutex
	next []Peer
}

func (p *peers) push(peer Peer) {
	p.mu.Lock()
	p.next = append(p.next, peer)
	p.mu.Unlock()
}

func (p *peers) of(net.Conn) (Peer, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.next) == 0 {
		return Peer{}, false
	}
	peer := p.next[0]
	p.next = p.next[1:]
	return peer, true
}

// TestControlSocketNotMonopolised: readers holding every connection they
// can (64 `logs -f`, 64 requests sent half-way, from one user and from
// many) neither lock root out nor slow it: status and stop answer within a
// second throughout. Before, 64 of either took every connection.
func TestControlSocketNotMonopolised(t *testing.T) {
	for _, tc := range []struct {
		name    string
		uids    int  // distinct attacking users
		follow  bool // logs -f, else half-sent requests
		attacks int
	}{
		{"64 followers, one user", 1, true, 64},
		{"64 followers, 64 users", 64, true, 64},
		{"64 half-sent requests, one user", 1, false, 64},
		{"64 half-sent requests, 64 users", 64, false, 64},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := shortSocket(t)
			pp := &peers{}
			s, err := Listen(Options{Path: path, Logger: zap.NewNop(), Backend: &followBackend{}, PeerOf: pp.of})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- s.Run(ctx) }()
			defer func() { cancel(); <-done }()

			var conns []net.Conn
			defer func() {
				for _, c := range conns {
					c.Close()
				}
			}()
			admitted := 0
			for i := range tc.attacks {
				pp.push(Peer{UID: uint32(1000 + i%tc.uids), GID: 100})
				c, err := net.Dial("unix", path)
				if err != nil {
					t.Fatal(err)
				}
				conns = append(conns, c)
				if tc.follow {
					io.WriteString(c, "GET "+api.PathLogs+"?model=a&follow=1 HTTP/1.1\r\nHost: x\r\n\r\n") //nolint:errcheck // seen by the answer
					c.SetReadDeadline(time.Now().Add(5 * time.Second))                                     //nolint:errcheck // seen by the answer
					resp, err := http.ReadResponse(bufio.NewReader(c), nil)
					if err != nil {
						t.Fatalf("follower %d: %v", i, err)
					}
					if resp.StatusCode == 200 {
						admitted++
					} else if resp.StatusCode != 429 {
						t.Fatalf("follower %d: %s", i, resp.Status)
					}
				} else {
					io.WriteString(c, "POST "+api.PathOp+"stop HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mod") //nolint:errcheck // held half-way
				}
			}
			if tc.follow && admitted == 0 {
				t.Fatal("no follower admitted at all")
			}
			t.Logf("%d followers admitted", admitted)
			for round := range 5 {
				for _, what := range []string{"status", "stop"} {
					pp.push(Peer{UID: 0})
					c := client.New(path)
					start := time.Now()
					cctx, ccancel := context.WithTimeout(context.Background(), time.Second)
					var err error
					if what == "status" {
						_, err = c.Status(cctx)
					} else {
						_, err = c.Op(cctx, api.OpStop, "a")
					}
					ccancel()
					c.Close()
					if err != nil {
						t.Fatalf("round %d: root's %s: %v (after %s)", round, what, err, time.Since(start))
					}
				}
			}
		})
	}
}

// TestHalfSentRequestCut: a request whose body stops half-way is answered
// 408 after the body's read bound, and its connection closed.
func TestHalfSentRequestCut(t *testing.T) {
	path := shortSocket(t)
	s, err := Listen(Options{Path: path, Logger: zap.NewNop(), Backend: &followBackend{}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() { cancel(); <-done }()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	fmt.Fprintf(c, "POST %sstop HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mod", api.PathOp)
	c.SetReadDeadline(time.Now().Add(bodyTimeout + 5*time.Second)) //nolint:errcheck // seen by the read
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	if resp.StatusCode != http.StatusRequestTimeout || time.Since(start) < bodyTimeout-time.Second {
		t.Errorf("%s after %s", resp.Status, time.Since(start))
	}
}

// TestClientInputQuotedBounded: answers quote at most a bounded prefix of
// what the client sent: an unknown operation, model or field of a megabyte
// is not echoed back whole.
func TestClientInputQuotedBounded(t *testing.T) {
	path := shortSocket(t)
	s, err := Listen(Options{Path: path, Logger: zap.NewNop(), Backend: &followBackend{}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() { cancel(); <-done }()
	huge := strings.Repeat("x", 500<<10)
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", path)
	}}}
	for _, tc := range []struct{ method, path, body string }{
		{"POST", api.PathOp + huge, `{"models":["a"]}`},
		{"POST", api.PathOp + "start", `{"models":["a"],"` + huge + `":1}`},
		{"GET", api.PathLogs + "?model=a&n=" + huge, ""},
	} {
		req, _ := http.NewRequest(tc.method, "http://citadel"+tc.path, strings.NewReader(tc.body))
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode/100 != 4 || len(b) > 512 {
			t.Errorf("%s %.40s…: %d, %d bytes", tc.method, tc.path, resp.StatusCode, len(b))
		}
	}
}

// shortSocket is a socket path within the 108 bytes a Unix socket's name
// may have, whatever the test's name and $TMPDIR.
func shortSocket(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "ctl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "s.sock")
}
