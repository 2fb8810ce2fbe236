package gateway

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// wireModel is a model seen at the wire, for what fake-vllm cannot be
// made to do on demand (close a kept-alive connection, stop mid-body,
// answer HTTP/1.0): each request of a connection is answered by answer,
// which writes the answer itself and says whether to keep the connection.
// It counts the connections it accepted and those still open.
type wireModel struct {
	ln       net.Listener
	base     string
	accepted atomic.Int64
	open     atomic.Int64
	wg       sync.WaitGroup
	mu       sync.Mutex
	conns    map[net.Conn]bool
}

// wireRequest is one request as the model read it.
type wireRequest struct {
	req  *http.Request
	body []byte
	n    int // its rank on its connection, from 0
	conn net.Conn
	br   *bufio.Reader
}

// startWire serves on a free port until the test ends; at the end every
// connection must have been closed by the gateway (no descriptor left).
// Start it before the gateway, so the gateway's cleanup runs first.
func startWire(t *testing.T, answer func(w io.Writer, r *wireRequest) (keep bool)) *wireModel {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := &wireModel{ln: ln, base: "http://" + ln.Addr().String(), conns: map[net.Conn]bool{}}
	m.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			m.accepted.Add(1)
			m.open.Add(1)
			m.mu.Lock()
			m.conns[c] = true
			m.mu.Unlock()
			m.wg.Go(func() {
				defer func() {
					c.Close()
					m.mu.Lock()
					delete(m.conns, c)
					m.mu.Unlock()
					m.open.Add(-1)
				}()
				br := bufio.NewReader(c)
				for n := 0; ; n++ {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					body, err := io.ReadAll(req.Body)
					if err != nil {
						return
					}
					if !answer(c, &wireRequest{req: req, body: body, n: n, conn: c, br: br}) {
						return
					}
				}
			})
		}
	})
	t.Cleanup(func() {
		// The gateway has stopped: it must have closed every connection.
		waitFor(t, 5*time.Second, "the gateway to close every connection to the model", func() bool { return m.open.Load() == 0 })
		ln.Close()
		m.mu.Lock()
		for c := range m.conns {
			c.Close()
		}
		m.mu.Unlock()
		m.wg.Wait()
	})
	return m
}

// jsonAnswer writes a 200 JSON answer with its length, and extra headers.
func jsonAnswer(w io.Writer, body string, extra ...string) {
	fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s",
		len(body), strings.Join(append(extra, ""), "\r\n"), body)
}

func wireSite(t *testing.T, m *wireModel) (*site, *hopClient) {
	t.Helper()
	s := startGateway(t, newStub(ready("m", "m", m.base)), defaultSettings(), nil)
	return s, s.gw.table.Load().byName["m"].up.hop
}

func postStatus(t *testing.T, url, body string) (int, string) {
	t.Helper()
	resp := post(t, context.Background(), url+"/v1/completions", body, "")
	return resp.StatusCode, readAll(t, resp)
}

// A kept-alive connection the model closed while it was idle is found
// out by the next request, which is sent again on a new connection: the
// client sees a 200, and the model the request once, body whole. A large
// body (held in a mapping, sent chunked with the stream's usage asked as
// it passes) is opened and sent again too.
func TestHopStaleConnectionRetried(t *testing.T) {
	for _, tc := range []struct {
		name string
		body string
	}{
		{"small body", `{"model":"m","prompt":"hi"}`},
		{"large streamed body", `{"model":"m","stream":true,"prompt":"` + strings.Repeat("x", 200<<10) + `"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var got [][]byte
			m := startWire(t, func(w io.Writer, r *wireRequest) bool {
				mu.Lock()
				got = append(got, r.body)
				mu.Unlock()
				jsonAnswer(w, `{"ok":true}`)
				return false // closed after each answer, with no Connection: close
			})
			s, hop := wireSite(t, m)
			for i := range 3 {
				if code, body := postStatus(t, s.url, tc.body); code != 200 || body != `{"ok":true}` {
					t.Fatalf("request %d: %d %q", i, code, body)
				}
				// Kept: the answer did not say the connection closes. The
				// model has closed it by now.
				waitFor(t, 5*time.Second, "the model to close its side", func() bool { return m.open.Load() == 0 })
				if n := hop.idleConns(); n != 1 {
					t.Fatalf("idle connections after request %d: %d, want 1", i, n)
				}
			}
			if r := hop.retries.Load(); r != 2 {
				t.Errorf("%d requests sent again, want 2 (the second and third found their connection closed)", r)
			}
			mu.Lock()
			defer mu.Unlock()
			if len(got) != 3 {
				t.Fatalf("the model read %d requests, want 3", len(got))
			}
			for i, b := range got {
				if !json.Valid(b) || len(b) < len(tc.body) {
					t.Errorf("request %d reached the model torn: %d bytes of %d", i, len(b), len(tc.body))
				}
				if strings.Contains(tc.body, `"stream":true`) && !bytes.Contains(b, []byte(`"stream_options":{"include_usage":true}`)) {
					t.Errorf("request %d: the stream was not asked for its usage", i)
				}
			}
		})
	}
}

// A new connection that fails is not tried again: the model may have read
// the request. The client gets the gateway's 502.
func TestHopFreshConnectionNotRetried(t *testing.T) {
	m := startWire(t, func(w io.Writer, r *wireRequest) bool { return false })
	s, hop := wireSite(t, m)
	for i := range 2 {
		code, body := postStatus(t, s.url, `{"model":"m"}`)
		if _, _, c := apiErr(t, body); code != 502 || c != "upstream_error" {
			t.Fatalf("request %d: %d %s", i, code, body)
		}
	}
	if a, r := m.accepted.Load(), hop.retries.Load(); a != 2 || r != 0 {
		t.Errorf("%d connections for 2 requests and %d sent again, want 2 and 0", a, r)
	}
}

// A pooled connection is asked whether the model closed it before it is
// used after a pause: closed, or with bytes nobody asked for, it is not.
func TestHopIdleConnectionChecked(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	for _, tc := range []struct {
		name string
		peer func(net.Conn)
		open bool
	}{
		{"open", func(net.Conn) {}, true},
		{"closed by the model", func(c net.Conn) { c.Close() }, false},
		{"bytes nobody asked for", func(c net.Conn) { c.Write([]byte("HTTP/1.1 408 Request Timeout\r\n\r\n")) }, false}, //nolint:errcheck // test
	} {
		t.Run(tc.name, func(t *testing.T) {
			hop := newHopClient(ln.Addr().String())
			pc, err := hop.dial(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			defer pc.conn.Close()
			peer, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer peer.Close()
			tc.peer(peer)
			if tc.open {
				if !pc.open() {
					t.Error("an open connection was taken for closed")
				}
				return
			}
			waitFor(t, 5*time.Second, "the connection seen closed", func() bool { return !pc.open() })
		})
	}
}

// A client that hangs up closes the model's connection, whether the model
// was streaming or had not answered yet: vLLM aborts a request when its
// connection closes, and the drain before a sleep counts on it.
func TestHopHangUpClosesUpstream(t *testing.T) {
	for _, stream := range []bool{true, false} {
		t.Run(fmt.Sprintf("stream=%v", stream), func(t *testing.T) {
			closed := make(chan struct{})
			m := startWire(t, func(w io.Writer, r *wireRequest) bool {
				if stream {
					io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n") //nolint:errcheck // test
					ev := "data: {\"choices\":[{\"text\":\"a\"}]}\n\n"
					fmt.Fprintf(w, "%x\r\n%s\r\n", len(ev), ev)
				}
				// Then nothing, until the gateway closes the connection.
				if _, err := r.br.Peek(1); err != nil {
					close(closed)
				}
				return false
			})
			s, hop := wireSite(t, m)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := make(chan struct{})
			go func() {
				defer close(done)
				resp := post(t, ctx, s.url+"/v1/completions", fmt.Sprintf(`{"model":"m","stream":%v}`, stream), "")
				if resp == nil {
					return
				}
				defer resp.Body.Close()
				if stream {
					br := bufio.NewReader(resp.Body)
					if line, err := br.ReadString('\n'); err != nil || !strings.HasPrefix(line, "data: ") {
						t.Errorf("first event: %q %v", line, err)
					}
					cancel()
				}
				io.Copy(io.Discard, resp.Body) //nolint:errcheck // cancelled
			}()
			if !stream {
				waitFor(t, 5*time.Second, "the request at the model", func() bool { return m.accepted.Load() == 1 })
				cancel()
			}
			select {
			case <-closed:
			case <-time.After(5 * time.Second):
				t.Fatal("the model's connection stayed open after its client hung up")
			}
			<-done
			if n := hop.idleConns(); n != 0 {
				t.Errorf("%d connections kept after a hang-up", n)
			}
		})
	}
}

// A model that closes its connection mid-answer: the client's answer is
// cut, the connection is not kept, and the next
// request is served on a new one.
func TestHopUpstreamClosesMidBody(t *testing.T) {
	for _, tc := range []struct{ name, torn string }{
		{"content-length", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"partial\""},
		{"chunked", "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\na\r\n{\"partial\"\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var calls atomic.Int64
			m := startWire(t, func(w io.Writer, r *wireRequest) bool {
				if calls.Add(1) == 1 {
					io.WriteString(w, tc.torn) //nolint:errcheck // test
					return false
				}
				jsonAnswer(w, `{"ok":true}`)
				return true
			})
			s, hop := wireSite(t, m)
			// Cut before its head left the gateway (a short answer is
			// sent whole or not at all), or after.
			if resp, err := http.Post(s.url+"/v1/completions", "application/json", strings.NewReader(`{"model":"m"}`)); err == nil {
				if _, err := io.ReadAll(resp.Body); err == nil {
					t.Error("a torn answer reached the client whole")
				}
				resp.Body.Close()
			}
			if code, body := postStatus(t, s.url, `{"model":"m"}`); code != 200 || body != `{"ok":true}` {
				t.Fatalf("next request: %d %q", code, body)
			}
			if a, r := m.accepted.Load(), hop.retries.Load(); a != 2 || r != 0 {
				t.Errorf("%d connections and %d retries, want 2 and 0", a, r)
			}
		})
	}
}

// An answer that closes its connection (Connection: close, HTTP/1.0, a
// body that ends with the connection) is passed on whole and its
// connection is not used again; a kept-alive one is.
func TestHopConnectionClose(t *testing.T) {
	const body = `{"ok":true}`
	for _, tc := range []struct {
		name  string
		head  string
		close bool
	}{
		{"keep-alive", "HTTP/1.1 200 OK\r\nContent-Length: 11\r\n", false},
		{"Connection: close", "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 11\r\n", true},
		{"HTTP/1.0", "HTTP/1.0 200 OK\r\nContent-Length: 11\r\n", true},
		{"HTTP/1.0 to the end", "HTTP/1.0 200 OK\r\n", true},
		{"HTTP/1.0 keep-alive", "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 11\r\n", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := startWire(t, func(w io.Writer, r *wireRequest) bool {
				io.WriteString(w, tc.head+"Content-Type: application/json\r\n\r\n"+body) //nolint:errcheck // test
				return !tc.close
			})
			s, hop := wireSite(t, m)
			for i := range 3 {
				if code, got := postStatus(t, s.url, `{"model":"m"}`); code != 200 || got != body {
					t.Fatalf("request %d: %d %q", i, code, got)
				}
			}
			want := int64(1)
			if tc.close {
				want = 3
			}
			if a := m.accepted.Load(); a != want {
				t.Errorf("%d connections for 3 requests, want %d", a, want)
			}
			if r := hop.retries.Load(); r != 0 {
				t.Errorf("%d requests sent again", r)
			}
		})
	}
}

// A pooled connection serves one request at a time: under load, with
// connections closed by the model now and then (said, or found out), no
// request is ever sent on a connection whose answer is still pending,
// and every client gets its own answer. Run with -race.
func TestHopConnectionNeverShared(t *testing.T) {
	var overlaps atomic.Int64
	m := startWire(t, func(w io.Writer, r *wireRequest) bool {
		// Nothing more may arrive on this connection before the answer.
		r.conn.SetReadDeadline(time.Now().Add(time.Millisecond)) //nolint:errcheck // test
		if _, err := r.br.Peek(1); !errors.Is(err, os.ErrDeadlineExceeded) {
			overlaps.Add(1)
		}
		r.conn.SetReadDeadline(time.Time{}) //nolint:errcheck // test
		id := r.req.Header.Get("X-Request-Id")
		switch {
		case r.n%7 == 3:
			jsonAnswer(w, id, "Connection: close")
			return false
		case r.n%11 == 5:
			jsonAnswer(w, id)
			return false // found out by the next request
		}
		jsonAnswer(w, id)
		return true
	})
	s, hop := wireSite(t, m)
	c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 32}}
	defer c.CloseIdleConnections()
	var wg sync.WaitGroup
	for i := range 32 {
		wg.Go(func() {
			for j := range 25 {
				id := "c" + strconv.Itoa(i) + "-" + strconv.Itoa(j)
				req, _ := http.NewRequest(http.MethodPost, s.url+"/v1/completions", strings.NewReader(`{"model":"m"}`))
				req.Header.Set("X-Request-Id", id)
				resp, err := c.Do(req)
				if err != nil {
					t.Error(err)
					return
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 || string(b) != id {
					t.Errorf("request %s: %d %q", id, resp.StatusCode, b)
					return
				}
			}
		})
	}
	wg.Wait()
	if n := overlaps.Load(); n != 0 {
		t.Errorf("%d requests arrived on a connection whose answer was pending", n)
	}
	// Every connection still open at the model is one in the pool: none
	// was left behind by a request.
	waitFor(t, 5*time.Second, "open connections = pooled ones", func() bool { return m.open.Load() == int64(hop.idleConns()) })
	if n := hop.idleConns(); n > maxIdlePerModel {
		t.Errorf("%d idle connections kept, over %d", n, maxIdlePerModel)
	}
}

// An answer whose headers do not end is refused past maxAnswerHead, as
// net/http's Transport refuses one: 502, and the connection is closed
// without reading the rest.
func TestHopAnswerHeadBounded(t *testing.T) {
	var sent atomic.Int64
	m := startWire(t, func(w io.Writer, r *wireRequest) bool {
		io.WriteString(w, "HTTP/1.1 200 OK\r\n") //nolint:errcheck // test
		line := "X-Filler: " + strings.Repeat("x", 1000) + "\r\n"
		for sent.Load() < 8*maxAnswerHead {
			n, err := io.WriteString(w, line)
			sent.Add(int64(n))
			if err != nil {
				break
			}
		}
		return false
	})
	s, hop := wireSite(t, m)
	code, body := postStatus(t, s.url, `{"model":"m"}`)
	if _, _, c := apiErr(t, body); code != 502 || c != "upstream_error" {
		t.Fatalf("%d %s", code, body)
	}
	waitFor(t, 5*time.Second, "the model's connection closed", func() bool { return m.open.Load() == 0 })
	if n := sent.Load(); n >= 8*maxAnswerHead {
		t.Errorf("the gateway read %d bytes of headers", n)
	}
	if n := hop.idleConns(); n != 0 {
		t.Errorf("%d connections kept", n)
	}
}
