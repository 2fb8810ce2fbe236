package fakevllm

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func fakeServer(t *testing.T, args ...string) *httptest.Server {
	t.Helper()
	o, err := parse(append([]string{"--model", "/m", "--port", "1", "--served-model-name", "m"}, args...))
	if err != nil {
		t.Fatal(err)
	}
	h, _ := newHandler(o, time.Now())
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

func do(t *testing.T, method, url, auth, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestFakePlaysVersions: the routes each release has, its error shape and
// /version.
func TestFakePlaysVersions(t *testing.T) {
	for _, tc := range []struct {
		version                               string
		sleep, isSleeping, collective, nested bool
	}{
		{"0.6.3", false, false, false, false},
		{"0.7.3", true, false, false, false},
		{"0.8.0", true, true, false, false},
		{"0.10.1", true, true, false, true},
		{"0.10.2", true, true, true, true},
		{"0.33.0", true, true, true, true},
	} {
		t.Run(tc.version, func(t *testing.T) {
			t.Setenv("VLLM_SERVER_DEV_MODE", "1")
			srv := fakeServer(t, "--fake-vllm-version", tc.version, "--enable-sleep-mode")
			if code, body := do(t, "GET", srv.URL+"/version", "", ""); code != 200 || !strings.Contains(body, `"version":"`+tc.version+`"`) {
				t.Errorf("/version: %d %s", code, body)
			}
			code, body := do(t, "POST", srv.URL+"/v1/completions", "", `{"model":"nope"}`)
			var e map[string]any
			json.Unmarshal([]byte(body), &e)
			if _, nested := e["error"].(map[string]any); code != 404 || nested != tc.nested || (!nested && e["object"] != "error") {
				t.Errorf("error body %d %s, nested wanted %v", code, body, tc.nested)
			}
			has := func(method, path string) bool { code, _ := do(t, method, srv.URL+path, "", ""); return code != 404 }
			if got := has("GET", "/is_sleeping"); got != tc.isSleeping {
				t.Errorf("/is_sleeping served: %v", got)
			}
			if got := has("POST", "/collective_rpc"); got != tc.collective {
				t.Errorf("/collective_rpc served: %v", got)
			}
			if got := has("POST", "/sleep?level=1"); got != tc.sleep {
				t.Errorf("/sleep served: %v", got)
			}
		})
	}
}

// TestFakeAPIKey: with --api-key or VLLM_API_KEY, /v1 wants the bearer
// token; /health, /version and /metrics do not.
func TestFakeAPIKey(t *testing.T) {
	for name, srv := range map[string]*httptest.Server{
		"flag": fakeServer(t, "--api-key", "k1"),
		"env": func() *httptest.Server {
			t.Setenv("VLLM_API_KEY", "k1")
			return fakeServer(t)
		}(),
	} {
		if code, body := do(t, "GET", srv.URL+"/v1/models", "", ""); code != 401 || !strings.Contains(body, "Unauthorized") {
			t.Errorf("%s: /v1/models without the key: %d %s", name, code, body)
		}
		if code, _ := do(t, "GET", srv.URL+"/v1/models", "Bearer wrong", ""); code != 401 {
			t.Errorf("%s: wrong key: %d", name, code)
		}
		if code, _ := do(t, "GET", srv.URL+"/v1/models", "Bearer k1", ""); code != 200 {
			t.Errorf("%s: with the key: %d", name, code)
		}
		for _, p := range []string{"/health", "/version", "/metrics"} {
			if code, _ := do(t, "GET", srv.URL+p, "", ""); code != 200 {
				t.Errorf("%s: %s without a key: %d", name, p, code)
			}
		}
	}
}

func TestFakeDisableLogStats(t *testing.T) {
	_, with := do(t, "GET", fakeServer(t).URL+"/metrics", "", "")
	_, without := do(t, "GET", fakeServer(t, "--disable-log-stats").URL+"/metrics", "", "")
	if !strings.Contains(with, "vllm:request_success_total") || strings.Contains(without, "vllm:") {
		t.Errorf("metrics with stats:\n%s\nwith --disable-log-stats:\n%s", with, without)
	}
}

// TestFakeStreamsAndEmbeddings: the role chunk first, the usage chunk on
// request, base64 embeddings that decode to the floats.
func TestFakeStreamsAndEmbeddings(t *testing.T) {
	srv := fakeServer(t, "--fake-tokens", "3")
	_, body := do(t, "POST", srv.URL+"/v1/chat/completions", "", `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`)
	var events []map[string]any
	for _, line := range strings.Split(body, "\n") {
		if d, ok := strings.CutPrefix(line, "data: "); ok && d != "[DONE]" {
			var ev map[string]any
			if err := json.Unmarshal([]byte(d), &ev); err != nil {
				t.Fatalf("event %q: %v", d, err)
			}
			events = append(events, ev)
		}
	}
	if len(events) != 5 || !strings.HasSuffix(strings.TrimSpace(body), "data: [DONE]") {
		t.Fatalf("%d events (want role, 3 tokens, usage):\n%s", len(events), body)
	}
	delta := events[0]["choices"].([]any)[0].(map[string]any)["delta"].(map[string]any)
	if delta["role"] != "assistant" {
		t.Errorf("first chunk %v has no role", events[0])
	}
	last := events[4]
	if len(last["choices"].([]any)) != 0 || last["usage"].(map[string]any)["completion_tokens"] != 3.0 {
		t.Errorf("usage chunk %v", last)
	}
	_, plain := do(t, "POST", srv.URL+"/v1/chat/completions", "", `{"model":"m","stream":true}`)
	if strings.Contains(plain, `"usage"`) {
		t.Errorf("usage without include_usage:\n%s", plain)
	}

	_, emb := do(t, "POST", srv.URL+"/v1/embeddings", "", `{"model":"m","input":"x","encoding_format":"base64"}`)
	var out struct {
		Data []struct {
			Embedding string `json:"embedding"`
		} `json:"data"`
	}
	if err := json.Unmarshal([]byte(emb), &out); err != nil || len(out.Data) != 1 {
		t.Fatalf("base64 embedding answer %s: %v", emb, err)
	}
	raw, err := base64.StdEncoding.DecodeString(out.Data[0].Embedding)
	if err != nil || len(raw) != 16 {
		t.Fatalf("decoded %d bytes, %v", len(raw), err)
	}
	if f := math.Float32frombits(binary.LittleEndian.Uint32(raw[4:])); f != float32(-0.2) {
		t.Errorf("second value %v, want -0.2", f)
	}
	_, floats := do(t, "POST", srv.URL+"/v1/embeddings", "", `{"model":"m","input":"x"}`)
	if !strings.Contains(floats, "[0.1,-0.2,0.3,0.05]") {
		t.Errorf("float embedding %s", floats)
	}
}

func TestParseRelease(t *testing.T) {
	for s, want := range map[string]string{"0.10.1": "0.10.1", "0.10.1.post1": "0.10.1", "0.11.0rc2": "0.11.0", "v0.7.3+cu121": "0.7.3", "0.6": "0.6.0"} {
		r, err := parseRelease(s)
		if err != nil || r.String() != want {
			t.Errorf("parseRelease(%q) = %v, %v", s, r, err)
		}
	}
	if _, err := parseRelease("x"); err == nil {
		t.Error("x parsed")
	}
	if r, _ := parseRelease("0.23.9"); r.atLeast("0.24.0") {
		t.Error("0.23.9 counted as 0.24")
	}
}
