package supervisor

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/supervisor/gateway"
)

// The gateway in front of the real supervisor: requests wait for a model
// that is loading and go through once its runner publishes ready, a model
// that crashes mid-request gives its clients a clean error while the other
// keeps serving, and a request held through the restart gets its answer.
func TestGatewayFollowsModelStates(t *testing.T) {
	h := newHarness(t,
		modelSpec{Name: "alpha", YAML: "served_name: org/alpha-7b", Fake: []string{"--fake-load-time", "300ms", "--fake-token-delay", "50ms"}},
		modelSpec{Name: "beta", Fake: []string{"--fake-load-time", "300ms"}},
	).start(Options{})
	gw, err := gateway.Listen("127.0.0.1:0", gateway.Options{
		Models: h.sup.Gateway(), Logger: zap.NewNop(),
		Settings: gateway.Settings{MaxQueue: 8, MaxWait: 15 * time.Second, MaxBody: 1 << 20},
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- gw.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("gateway: %v", err)
		}
	})
	url := "http://" + gw.Addr()
	do := func(body string) (int, string) {
		t.Helper()
		resp, err := http.Post(url+"/v1/chat/completions", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}

	// Sent while both load: held until ready, by either name.
	if st := h.status("alpha"); st.State == Ready {
		t.Fatalf("alpha ready before the test could ask: load time too short")
	}
	for _, name := range []string{"alpha", "org/alpha-7b", "beta"} {
		if code, b := do(`{"model":"` + name + `","max_tokens":2}`); code != 200 {
			t.Fatalf("%s while loading, then ready: %d %s", name, code, b)
		}
	}

	// alpha dies mid-stream.
	resp, err := http.Post(url+"/v1/chat/completions", "application/json", strings.NewReader(`{"model":"alpha","stream":true,"max_tokens":1000}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	if !sc.Scan() || !strings.HasPrefix(sc.Text(), "data: ") {
		t.Fatalf("first event: %q", sc.Text())
	}
	pid := h.status("alpha").PID
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var last []string
	for sc.Scan() {
		if l := sc.Text(); strings.HasPrefix(l, "data: ") {
			last = append(last, l)
		}
	}
	if n := len(last); n < 2 || last[n-1] != "data: [DONE]" || !strings.Contains(last[n-2], `"code":"upstream_error"`) {
		t.Fatalf("the stream of a crashed model must end with an error event and [DONE]: %q", last)
	}
	if code, b := do(`{"model":"beta","max_tokens":1}`); code != 200 {
		t.Fatalf("beta while alpha restarts: %d %s", code, b)
	}
	// Once the gateway knows alpha is down (a request sent in the instant
	// between the crash and that is answered 502: the model did not
	// answer), requests are held through backoff and starting, and
	// answered by the new process.
	h.waitFor(t, 10*time.Second, "the gateway to see alpha down", func() bool {
		resp, err := http.Get(url + "/v1/models/alpha")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return !strings.Contains(string(b), `"state":"ready"`)
	})
	if code, b := do(`{"model":"alpha","max_tokens":1}`); code != 200 {
		t.Fatalf("alpha after its restart: %d %s", code, b)
	}
	if st := h.status("alpha"); st.PID == pid || st.Restarts != 1 {
		t.Errorf("alpha pid %d restarts %d: not the restarted process", st.PID, st.Restarts)
	}

	// Held stopped by an operator: refused at once, with the reason.
	if _, err := h.sup.Do(context.Background(), "stop", "beta"); err != nil {
		t.Fatal(err)
	}
	h.waitState("beta", Stopped, 10*time.Second)
	if code, b := do(`{"model":"beta"}`); code != 503 || !strings.Contains(b, "model beta is stopped: held stopped by operator") {
		t.Errorf("stopped beta: %d %s", code, b)
	}
}
