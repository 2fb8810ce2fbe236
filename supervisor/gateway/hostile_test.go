package gateway

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// Hostile and careless clients, one attack each, against a gateway in
// front of a fake vLLM: each asserts the bound that holds it.

// rawConn opens a TCP connection to the gateway and sends the headers of a
// POST with a body of length bytes (-1: chunked), and the body's first
// bytes.
func rawConn(t *testing.T, s *site, length int, first string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", strings.TrimPrefix(s.url, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	hdr := "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
	if length >= 0 {
		hdr += "Content-Length: " + strconv.Itoa(length) + "\r\n"
	} else {
		hdr += "Transfer-Encoding: chunked\r\n"
	}
	if _, err := io.WriteString(c, hdr+"\r\n"+first); err != nil {
		t.Fatal(err)
	}
	return c
}

// answer reads the status line and body of the answer on c, waiting at
// most d.
func answer(t *testing.T, c net.Conn, d time.Duration) (int, string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(d)) //nolint:errcheck // a failure shows as a read error
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer within %s: %v", d, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestSilentBodyHoldsNothing: a client that names its model and then goes
// silent holds no slot, no place in the queue and no drain, and is cut
// with 408 after body_timeout. It used to hold its slot for as long as its
// connection stayed open, and a drain before a sleep never ended.
func TestSilentBodyHoldsNothing(t *testing.T) {
	f := startFake(t, "a")
	stub := newStub(ready("a", "a", f.base))
	stub.models[0].MaxConcurrency = 1
	set := defaultSettings()
	set.BodyTimeout = 500 * time.Millisecond
	s := startGateway(t, stub, set, nil)

	silent := rawConn(t, s, 4096, `{"model":"a","messages":[`)
	// The request is read as far as it goes; it must not hold a slot.
	deadline := time.Now().Add(200 * time.Millisecond)
	for time.Now().Before(deadline) {
		if n := s.gw.InFlight("a"); n != 0 {
			t.Fatalf("a silent body holds %d slot(s)", n)
		}
		<-time.After(10 * time.Millisecond)
	}
	// The one slot is free for a real request, and a drain ends at once.
	if resp := post(t, context.Background(), s.url+"/v1/chat/completions", `{"model":"a","messages":[]}`, ""); resp.StatusCode != 200 {
		t.Fatalf("a request beside the silent one: %d %s", resp.StatusCode, readAll(t, resp))
	} else {
		readAll(t, resp)
	}
	dctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := s.gw.Drain(dctx, "a", 0); err != nil {
		t.Fatalf("drain with a silent body open: %v", err)
	}
	code, body := answer(t, silent, 5*time.Second)
	if code != http.StatusRequestTimeout || !strings.Contains(body, "gateway.body_timeout") {
		t.Errorf("the silent client: %d %s", code, body)
	}
	if v := s.value(t, "citadel_gateway_client_stalls_total", map[string]string{"reason": StallBodyIdle}); v != 1 {
		t.Errorf("client_stalls_total{reason=body_idle} = %v, want 1", v)
	}
	if v := s.value(t, "citadel_gateway_rejected_total", map[string]string{"reason": RejectClientStall}); v != 1 {
		t.Errorf("rejected_total{reason=client_stall} = %v, want 1", v)
	}
}

// TestTricklingBodyCut: a body that keeps coming, a byte at a time, well
// within body_timeout between bytes, is cut once it falls below
// min_body_rate: by body_timeout + bytes/min_body_rate.
func TestTricklingBodyCut(t *testing.T) {
	f := startFake(t, "a")
	set := defaultSettings()
	set.BodyTimeout, set.MinBodyRate = 300*time.Millisecond, 100
	s := startGateway(t, newStub(ready("a", "a", f.base)), set, nil)
	start := time.Now()
	c := rawConn(t, s, 100000, `{"model":"a","prompt":"`)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				if _, err := c.Write([]byte("x")); err != nil {
					return
				}
			}
		}
	}()
	code, body := answer(t, c, 10*time.Second)
	took := time.Since(start)
	if code != http.StatusRequestTimeout || !strings.Contains(body, "min_body_rate") {
		t.Fatalf("the trickling client: %d %s", code, body)
	}
	// ~20 bytes a second against 100 asked: cut soon after the first
	// body_timeout, well before 100000 bytes would have come.
	if took > 5*time.Second {
		t.Errorf("cut after %s", took)
	}
	if v := s.value(t, "citadel_gateway_client_stalls_total", map[string]string{"reason": StallBodyRate}); v != 1 {
		t.Errorf("client_stalls_total{reason=body_rate} = %v, want 1", v)
	}
}

// TestReadBoundsDeadline: the rule itself, without a clock.
func TestReadBoundsDeadline(t *testing.T) {
	t0 := time.Unix(1000, 0)
	b := readBounds{idle: 10 * time.Second, rate: 1000}
	for _, tc := range []struct {
		name string
		now  time.Duration // since t0
		got  int64
		want time.Duration // deadline, since t0
		why  string
	}{
		{"at first, the idle bound", 0, 0, 10 * time.Second, StallBodyIdle},
		{"early bytes buy time", 5 * time.Second, 20000, 15 * time.Second, StallBodyIdle},
		{"behind the rate", 12 * time.Second, 1000, 11 * time.Second, StallBodyRate},
		{"on the rate", 20 * time.Second, 10000, 20 * time.Second, StallBodyRate},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dl, why := b.deadline(t0, t0.Add(tc.now), tc.got)
			if dl != t0.Add(tc.want) || why != tc.why {
				t.Errorf("deadline = %s (%s), want %s (%s)", dl.Sub(t0), why, tc.want, tc.why)
			}
		})
	}
	if dl, why := (readBounds{idle: time.Second}).deadline(t0, t0.Add(time.Hour), 0); dl != t0.Add(time.Hour+time.Second) || why != StallBodyIdle {
		t.Errorf("no rate: %s %s", dl.Sub(t0), why)
	}
}

// TestNonReadingClientCut: a client that asks for a long stream and reads
// nothing of it is cut after send_timeout, and its slot is free again.
func TestNonReadingClientCut(t *testing.T) {
	f := startFake(t, "a", "--fake-tokens", "2000000", "--fake-token-delay", "0s")
	stub := newStub(ready("a", "a", f.base))
	stub.models[0].MaxConcurrency = 1
	set := defaultSettings()
	set.SendTimeout = 500 * time.Millisecond
	s := startGateway(t, stub, set, nil)
	body := `{"model":"a","prompt":"hi","stream":true}`
	c := rawConn(t, s, len(body), body)
	// Never read: the socket buffers fill, then the gateway's writes wait.
	waitFor(t, 10*time.Second, "the stream to start", func() bool { return s.gw.InFlight("a") == 1 })
	waitFor(t, 30*time.Second, "the non-reading client cut", func() bool { return s.gw.InFlight("a") == 0 })
	if v := s.value(t, "citadel_gateway_client_stalls_total", map[string]string{"reason": StallSend}); v != 1 {
		t.Errorf("client_stalls_total{reason=send} = %v, want 1", v)
	}
	_ = c
	if resp := post(t, context.Background(), s.url+"/v1/chat/completions", `{"model":"a","messages":[]}`, ""); resp.StatusCode != 200 {
		t.Errorf("the next request: %d", resp.StatusCode)
	} else {
		readAll(t, resp)
	}
}

// TestDuplicateModelRefused: a body naming "model" twice (also through an
// escape) is refused before it reaches any queue: the gateway would route
// by one and vLLM serve the other.
func TestDuplicateModelRefused(t *testing.T) {
	fa, fb := startFake(t, "a"), startFake(t, "b")
	s := startGateway(t, newStub(ready("a", "a", fa.base), ready("b", "b", fb.base)), defaultSettings(), nil)
	for _, body := range []string{
		`{"model":"a","messages":[],"model":"b"}`,
		`{"model":"a","messages":[],"mod\u0065l":"b"}`,
	} {
		resp := post(t, context.Background(), s.url+"/v1/chat/completions", body, "")
		got := readAll(t, resp)
		if msg, _, code := apiErr(t, got); resp.StatusCode != 400 || code != "invalid_request" || !strings.Contains(msg, "more than once") {
			t.Errorf("%s: %d %s", body, resp.StatusCode, got)
		}
	}
	if fa.running(t) != "0" || fb.running(t) != "0" {
		t.Error("a model saw the request")
	}
}

// TestClientInputQuotedBounded: an error that quotes what the client sent
// quotes a bounded prefix: a 1.5 MB model name is not echoed back whole.
func TestClientInputQuotedBounded(t *testing.T) {
	s := startGateway(t, newStub(), defaultSettings(), nil)
	huge := strings.Repeat("m", 1500*1000)
	for _, tc := range []struct{ name, body string }{
		{"over the name limit", `{"model":"` + huge + `"}`},
		{"unknown, under the limit", `{"model":"` + huge[:maxModelName] + `"}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := post(t, context.Background(), s.url+"/v1/completions", tc.body, "")
			got := readAll(t, resp)
			if resp.StatusCode/100 != 4 || len(got) > 512 {
				t.Errorf("%d, %d bytes: %.300s", resp.StatusCode, len(got), got)
			}
		})
	}
	resp, err := http.Get(s.url + "/v1/models/" + strings.Repeat("x", 100000))
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, resp); resp.StatusCode != 404 || len(got) > 512 {
		t.Errorf("GET /v1/models/<100000 bytes>: %d, %d bytes", resp.StatusCode, len(got))
	}
}

// TestBodyBudget: bodies beyond body_memory go to temporary files and
// reach the model whole; beyond body_spool the gateway answers 429 with the
// reason; once answered, everything held is given back.
func TestBodyBudget(t *testing.T) {
	got := make(chan string, 8)
	release := make(chan struct{})
	up := &holdServer{got: got, release: release}
	srv := &http.Server{Handler: up}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln) //nolint:errcheck // closed at the end
	defer srv.Close()
	set := defaultSettings()
	set.BodyMemory, set.BodySpool = 3<<20, 3<<20
	stub := newStub(ready("a", "org/a", "http://"+ln.Addr().String()))
	s := startGateway(t, stub, set, nil)
	s.gw.bodies.dir = t.TempDir()

	body := func(i int) string {
		return `{"model":"a","prompt":"` + strings.Repeat(string(rune('a'+i)), 2<<20) + `"}`
	}
	type res struct {
		code int
		msg  string
	}
	results := make(chan res, 4)
	for i := range 3 {
		go func() {
			resp, err := http.Post(s.url+"/v1/completions", "application/json", strings.NewReader(body(i)))
			if err != nil {
				results <- res{0, err.Error()}
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			results <- res{resp.StatusCode, string(b)}
		}()
		// One at a time, so which one finds the budget full is known:
		// the first in memory, the second in a file, the third refused.
		if i < 2 {
			waitFor(t, 10*time.Second, "the body to reach the model", func() bool { return len(got) == i+1 })
		}
	}
	r := <-results
	if msg, _, code := apiErr(t, r.msg); r.code != 429 || code != "body_budget" || !strings.Contains(msg, "gateway.body_memory, gateway.body_spool") {
		t.Fatalf("the third body: %d %s", r.code, r.msg)
	}
	if mem := s.value(t, "citadel_gateway_body_bytes", map[string]string{"store": "memory"}); mem <= 0 || mem > 3<<20 {
		t.Errorf("body_bytes{store=memory} = %v", mem)
	}
	if sp := s.value(t, "citadel_gateway_body_bytes", map[string]string{"store": "spool"}); sp < 2<<20 || sp > 3<<20 {
		t.Errorf("body_bytes{store=spool} = %v", sp)
	}
	// The spooled body's file is unlinked as it is made: a daemon killed
	// now leaves nothing behind.
	if ents, err := os.ReadDir(s.gw.bodies.dir); err != nil || len(ents) != 0 {
		t.Errorf("spool directory holds %d entries (%v)", len(ents), err)
	}
	close(release)
	for range 2 {
		if r := <-results; r.code != 200 {
			t.Errorf("a held body: %d %.200s", r.code, r.msg)
		}
	}
	for i := range 2 {
		want := strings.Replace(body(i), `"model":"a"`, `"model":"org/a"`, 1)
		if g := <-got; g != fmt.Sprintf("%x", sha256.Sum256([]byte(want))) {
			t.Errorf("a body reached the model changed")
		}
	}
	waitFor(t, 5*time.Second, "every body given back", func() bool {
		mem, spool := s.gw.bodies.held()
		return mem == 0 && spool == 0
	})
	if n := unmapFailures.Load(); n != 0 {
		t.Errorf("%d mappings not given back", n)
	}
}

// TestDeclaredIsNotHeld: clients that declare large bodies and send little
// hold only what they sent (and a window of 64 KiB each) of the budget, so
// a handful of them cannot fill it and turn everyone else away.
func TestDeclaredIsNotHeld(t *testing.T) {
	f := startFake(t, "a")
	set := defaultSettings()
	set.BodyMemory, set.BodySpool = 2<<20, 2<<20
	s := startGateway(t, newStub(ready("a", "a", f.base)), set, nil)
	s.gw.bodies.dir = t.TempDir()
	for range 20 {
		rawConn(t, s, 30<<20, `{"model":"a","prompt":"`+strings.Repeat("x", 1000))
	}
	waitFor(t, 5*time.Second, "the twenty bodies begun", func() bool {
		mem, spool := s.gw.bodies.held()
		return mem+spool >= 20*1000
	})
	mem, spool := s.gw.bodies.held()
	if mem+spool > 20*(chargeWindow+4096) {
		t.Errorf("20 bodies of 1000 bytes hold %d bytes in memory and %d in files", mem, spool)
	}
	resp := post(t, context.Background(), s.url+"/v1/completions", `{"model":"a","prompt":"`+strings.Repeat("y", 1<<20)+`","max_tokens":1}`, "")
	if b := readAll(t, resp); resp.StatusCode != 200 {
		t.Errorf("a 1 MiB request beside them: %d %s", resp.StatusCode, b)
	}
}

// holdServer reads each body, reports its digest, and answers once
// released.
type holdServer struct {
	got     chan string
	release chan struct{}
}

func (h *holdServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b, _ := io.ReadAll(r.Body)
	h.got <- fmt.Sprintf("%x", sha256.Sum256(b))
	<-h.release
	w.Write([]byte(`{}`)) //nolint:errcheck // test
}

// TestConnectionsPerAddress: with max_connections_per_address, an address
// holding its share of connections gets a 429 in OpenAI's shape on the
// next, counted; other connections are served as before.
func TestConnectionsPerAddress(t *testing.T) {
	f := startFake(t, "a")
	reg := prometheus.NewRegistry()
	gw, err := Listen("127.0.0.1:0", Options{Models: newStub(ready("a", "a", f.base)), Logger: zap.NewNop(),
		Settings: defaultSettings(), Registerer: reg, MaxConnections: 64, MaxConnectionsPerAddress: 2})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- gw.Run(ctx) }()
	defer func() { cancel(); <-done }()
	s := &site{gw: gw, url: "http://" + gw.Addr(), reg: reg}
	waitFor(t, 5*time.Second, "gateway serving", func() bool { return gw.Serving() == nil })

	// Two connections sending their body, held.
	for range 2 {
		defer rawConn(t, s, 100, "").Close()
	}
	waitFor(t, 5*time.Second, "both accepted", func() bool { return gw.Guard().Open() == 2 })
	c, err := net.Dial("tcp", gw.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	code, body := answer(t, c, 5*time.Second)
	if _, _, ecode := apiErr(t, body); code != 429 || ecode != "too_many_connections" {
		t.Errorf("the third connection: %d %s", code, body)
	}
	if v := s.value(t, "citadel_gateway_connections_refused_total", map[string]string{"reason": "per_address"}); v != 1 {
		t.Errorf("connections_refused_total{reason=per_address} = %v", v)
	}
	if v := s.value(t, "citadel_gateway_connections_max", nil); v != 64 {
		t.Errorf("connections_max = %v", v)
	}
}

// TestCutEndsStreamsWithAnEvent: an upgrade that must cut requests past
// its drain bound ends a stream with an SSE error event and [DONE], and
// answers a request still waiting in its queue 503 with Retry-After;
// requests after the cut are served as usual.
func TestCutEndsStreamsWithAnEvent(t *testing.T) {
	f := startFake(t, "a", "--fake-tokens", "100000", "--fake-token-delay", "20ms")
	stub := newStub(ready("a", "a", f.base))
	stub.models[0].MaxConcurrency = 1
	s := startGateway(t, stub, defaultSettings(), nil)
	resp := post(t, context.Background(), s.url+"/v1/completions", `{"model":"a","prompt":"hi","stream":true}`, "")
	if resp.StatusCode != 200 {
		t.Fatalf("stream: %d", resp.StatusCode)
	}
	ev := events(resp.Body)
	next(t, ev)
	queued := async(t, context.Background(), s.url+"/v1/completions", `{"model":"a","prompt":"hi"}`)
	waitFor(t, 5*time.Second, "the second request queued", func() bool { _, q := s.gw.table.Load().byName["a"].up.adm.load(); return q == 1 })

	s.gw.Cut()
	var last []string
	for e := range ev {
		last = append(last, e)
	}
	if n := len(last); n < 2 || last[n-1] != "[DONE]" || !strings.Contains(last[n-2], "gateway_upgrading") {
		t.Errorf("the stream's last events: %q", last[max(0, len(last)-2):])
	}
	r := wait(t, queued)
	if r.code != 503 || !strings.Contains(r.body, "gateway_upgrading") || r.retryAfter != "1" {
		t.Errorf("the queued request: %d %s (Retry-After %q)", r.code, r.body, r.retryAfter)
	}
	waitFor(t, 5*time.Second, "the model's slot free", func() bool { return s.gw.InFlight("a") == 0 })
	after := post(t, context.Background(), s.url+"/v1/completions", `{"model":"a","prompt":"hi","max_tokens":2}`, "")
	if b := readAll(t, after); after.StatusCode != 200 {
		t.Errorf("after the cut: %d %s", after.StatusCode, b)
	}
}
