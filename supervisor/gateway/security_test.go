package gateway

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
)

func writeKeys(t testing.TB, mode os.FileMode, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "api-keys")
	if err := os.WriteFile(p, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	return p
}

const (
	aliceToken = "sk-alice-0123456789abcdef"
	bobToken   = "sk-bob-fedcba9876543210"
)

func TestAPIKeys(t *testing.T) {
	up := startFake(t, "alpha")
	keys, err := LoadKeys(writeKeys(t, 0o600, "# lab users\nalice "+aliceToken+"\n\nbob   "+bobToken+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	set := defaultSettings()
	set.Keys = keys
	s := startGateway(t, newStub(ready("alpha", "alpha", up.base)), set, nil)
	ctx := context.Background()
	body := `{"model":"alpha","max_tokens":1}`
	var bodies []string

	for _, tc := range []struct {
		name, token string
		code        int
	}{
		{"no token", "", 401},
		{"unknown token", "sk-mallory-0123456789abcdef", 401},
		{"a token's prefix", aliceToken[:10], 401},
		{"alice", aliceToken, 200},
		{"bob", bobToken, 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := post(t, ctx, s.url+"/v1/completions", body, tc.token)
			b := readAll(t, resp)
			bodies = append(bodies, b)
			if resp.StatusCode != tc.code {
				t.Fatalf("%d, want %d: %s", resp.StatusCode, tc.code, b)
			}
			if tc.code == 401 {
				if _, _, code := apiErr(t, b); code != "invalid_api_key" {
					t.Errorf("401 code %q", code)
				}
			}
		})
	}
	for _, path := range []string{"/v1/models", "/v1/models/alpha"} {
		if resp, _ := http.Get(s.url + path); resp.StatusCode != 401 {
			t.Errorf("GET %s without a key: %d", path, resp.StatusCode)
		}
	}
	if got := s.value(t, "citadel_gateway_requests_total", map[string]string{"model": "alpha", "code": "200", "key": "alice"}); got != 1 {
		t.Errorf("requests_total{key=alice} = %v, want 1", got)
	}
	if got := s.value(t, "citadel_gateway_rejected_total", map[string]string{"reason": "unauthorized"}); got != 5 {
		t.Errorf("rejected_total{reason=unauthorized} = %v, want 5", got)
	}
	var access int
	for _, e := range s.logs.FilterMessage("request").All() {
		if e.ContextMap()["key"] == "bob" {
			access++
		}
	}
	if access != 1 {
		t.Errorf("%d debug access lines name bob, want 1", access)
	}

	// A reload with bob's key removed: bob is refused at once.
	keys2, err := LoadKeys(writeKeys(t, 0o400, "alice "+aliceToken+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	set.Keys = keys2
	s.gw.Apply(set)
	if resp := post(t, ctx, s.url+"/v1/completions", body, bobToken); resp.StatusCode != 401 {
		t.Errorf("bob after his key was removed: %d", resp.StatusCode)
	}

	// No token anywhere: logs, metrics, error bodies.
	var out strings.Builder
	for _, e := range s.logs.All() {
		fmt.Fprintf(&out, "%s %v\n", e.Message, e.ContextMap())
	}
	fams, err := s.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		expfmt.MetricFamilyToText(&out, f) //nolint:errcheck // strings.Builder
	}
	out.WriteString(strings.Join(bodies, "\n"))
	for _, tok := range []string{aliceToken, bobToken, "sk-alice", "sk-bob"} {
		if strings.Contains(out.String(), tok) {
			t.Errorf("a token appears in the logs, metrics or answers:\n%s", out.String())
		}
	}
}

func TestKeysFile(t *testing.T) {
	secret := "sk-very-secret-0123456789"
	cases := []struct {
		name    string
		mode    os.FileMode
		content string
		want    string // in the error; "" = valid
		is      error
	}{
		{"valid", 0o600, "alice " + secret + "\n", "", nil},
		{"group-readable", 0o640, "alice " + secret + "\n", "mode 0640 is readable or writable by group or others", ErrKeysFileAccess},
		{"world-readable", 0o604, "alice " + secret + "\n", "mode 0604", ErrKeysFileAccess},
		{"one field", 0o600, secret + "\n", ":1: want NAME TOKEN", nil},
		{"short token", 0o600, "alice short\n", ":1: alice's token is shorter than 16 characters", nil},
		{"same token twice", 0o600, "alice " + secret + "\nbob " + secret + "\n", ":2: bob has the same token as alice", nil},
		{"bad name", 0o600, "al/ice " + secret + "\n", ":1: NAME must be", nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			k, err := LoadKeys(writeKeys(t, tc.mode, tc.content))
			if tc.want == "" {
				if err != nil || k.Len() != 1 {
					t.Fatalf("%v, %v", k, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
			if tc.is != nil && !errors.Is(err, tc.is) {
				t.Errorf("error %v is not %v", err, tc.is)
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("the error shows the token: %v", err)
			}
		})
	}
}

// rawRequest sends a request line as written, so that no client library
// cleans the path first.
func rawRequest(t *testing.T, addr, method, path, body string) (int, string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second)) //nolint:errcheck // best effort
	fmt.Fprintf(c, "%s %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", method, path, len(body), body)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestNoDevelopmentEndpoints(t *testing.T) {
	up := startFake(t, "alpha")
	s := startGateway(t, newStub(ready("alpha", "alpha", up.base)), defaultSettings(), nil)
	addr := strings.TrimPrefix(s.url, "http://")
	body := `{"model":"alpha","method":"reload_weights"}`
	for _, tc := range []struct{ method, path string }{
		{"POST", "/sleep?level=1"}, {"POST", "/wake_up"}, {"GET", "/is_sleeping"},
		{"POST", "/collective_rpc"}, {"POST", "/reset_prefix_cache"}, {"POST", "/start_profile"},
		{"GET", "/health"}, {"GET", "/metrics"}, {"GET", "/version"}, {"POST", "/v1"},
		{"POST", "/v1/../sleep"}, {"POST", "/v1/%2e%2e/sleep"}, {"POST", "/v1/..%2fsleep"},
		{"POST", "/v1//../collective_rpc"}, {"POST", "//v1/completions"}, {"POST", "/v1/./completions"},
		{"POST", "/v1/sleep"}, {"POST", "/v1/load_lora_adapter"}, {"POST", "/v1/unload_lora_adapter"},
		{"POST", "/v1/completions/../../wake_up"}, {"POST", "/V1/completions"},
	} {
		t.Run(tc.method+" "+tc.path, func(t *testing.T) {
			code, b := rawRequest(t, addr, tc.method, tc.path, body)
			if code != 404 {
				t.Fatalf("%d %s", code, b)
			}
			// The gateway's own answer, not the model's.
			if _, _, c := apiErr(t, b); c != "not_found" {
				t.Errorf("code %q", c)
			}
		})
	}
	// The same connection path works for what is allowed.
	if code, b := rawRequest(t, addr, "POST", "/v1/completions", body); code != 200 {
		t.Errorf("POST /v1/completions: %d %s", code, b)
	}
}
