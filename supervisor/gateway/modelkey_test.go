package gateway

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestModelKeyReplacesClientKey: the gateway sets the model's own API key on
// every request it forwards to a keyed vLLM (VLLM_API_KEY, --api-key), and
// never forwards the client's Authorization, with api_keys_file or without;
// the model's key is in no answer nor log line.
func TestModelKeyReplacesClientKey(t *testing.T) {
	const modelKey = "sk-model-77e0a3f1"
	var mu sync.Mutex
	var seen []string
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("Authorization"))
		mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"choices":[{"text":"ok"}]}`))
	}))
	defer up.Close()
	keyed := ready("keyed", "keyed", up.URL)
	keyed.APIKey = modelKey
	plain := ready("plain", "plain", up.URL)

	keysFile := filepath.Join(t.TempDir(), "keys")
	if err := os.WriteFile(keysFile, []byte("team-a sk-client-0123456789ab\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	keys, err := LoadKeys(keysFile)
	if err != nil {
		t.Fatal(err)
	}
	withKeys := defaultSettings()
	withKeys.Keys = keys
	for name, set := range map[string]Settings{"without api_keys_file": defaultSettings(), "with api_keys_file": withKeys} {
		t.Run(name, func(t *testing.T) {
			mu.Lock()
			seen = nil
			mu.Unlock()
			s := startGateway(t, newStub(keyed, plain), set, nil)
			for _, m := range []string{"keyed", "plain"} {
				resp := post(t, context.Background(), s.url+"/v1/completions", `{"model":"`+m+`","prompt":"x"}`, "sk-client-0123456789ab")
				if body := readAll(t, resp); resp.StatusCode != 200 || strings.Contains(body, modelKey) {
					t.Errorf("%s: %d %s", m, resp.StatusCode, body)
				}
			}
			mu.Lock()
			got := append([]string(nil), seen...)
			mu.Unlock()
			if len(got) != 2 || got[0] != "Bearer "+modelKey || got[1] != "" {
				t.Errorf("upstream saw Authorization %q; want the model's key for keyed and none for plain", got)
			}
			resp, err := http.Get(s.url + "/v1/models")
			if err == nil {
				var b strings.Builder
				json.NewEncoder(&b).Encode(resp.Header) //nolint:errcheck // for the check below
				body := readAll(t, resp)
				if strings.Contains(body+b.String(), modelKey) {
					t.Error("the model's key is in /v1/models")
				}
			}
			for _, e := range s.logs.All() {
				if strings.Contains(e.Message+" "+strings.Join(fieldStrings(e.ContextMap()), " "), modelKey) {
					t.Errorf("the model's key is in a log line: %s", e.Message)
				}
			}
		})
	}
}

func fieldStrings(m map[string]any) []string {
	var out []string
	for k, v := range m {
		b, _ := json.Marshal(v)
		out = append(out, k+"="+string(b))
	}
	return out
}

// TestModelsListVLLMFields: GET /v1/models keeps vLLM's root and
// max_model_len, and says the model's vLLM in citadel.vllm_version.
func TestModelsListVLLMFields(t *testing.T) {
	m := ready("phi3", "phi-3-mini", "http://127.0.0.1:1")
	m.Root, m.MaxModelLen, m.VLLMVersion = "/opt/citadel/models/phi-3-mini-128k", 128000, "0.10.1"
	s := startGateway(t, newStub(m), defaultSettings(), nil)
	resp, err := http.Get(s.url + "/v1/models/phi3")
	if err != nil {
		t.Fatal(err)
	}
	var obj struct {
		ID          string `json:"id"`
		Root        string `json:"root"`
		MaxModelLen int    `json:"max_model_len"`
		Citadel     struct {
			VLLMVersion string `json:"vllm_version"`
		} `json:"citadel"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&obj); err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if obj.ID != "phi-3-mini" || obj.Root != m.Root || obj.MaxModelLen != 128000 || obj.Citadel.VLLMVersion != "0.10.1" {
		t.Errorf("/v1/models/phi3 = %+v", obj)
	}
}

// TestHeldRequestTakesTheStartedModelsKey: a request that arrives while an
// on-demand model is stopped (no process, no key yet) waits in the queue;
// when the model is ready it goes out with the key of the process that
// serves it, not the empty one of the snapshot it arrived with.
func TestHeldRequestTakesTheStartedModelsKey(t *testing.T) {
	const modelKey = "sk-model-started-19af"
	seen := make(chan string, 1)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		seen <- r.Header.Get("Authorization")
		w.Write([]byte(`{"choices":[{"text":"ok"}]}`))
	}))
	defer up.Close()
	m := Model{Name: "od", ServedName: "od", State: "stopped", Upstream: up.URL, Enabled: true, OnDemand: true}
	stub := newStub(m)
	s := startGateway(t, stub, defaultSettings(), nil)
	done := make(chan int, 1)
	go func() {
		resp := post(t, context.Background(), s.url+"/v1/completions", `{"model":"od","prompt":"x"}`, "")
		readAll(t, resp)
		done <- resp.StatusCode
	}()
	waitFor(t, 5*time.Second, "the request queued", func() bool {
		_, queued := s.gw.table.Load().byName["od"].up.adm.load()
		return queued == 1
	})
	stub.mu.Lock()
	stub.models[0].APIKey = modelKey
	stub.mu.Unlock()
	stub.set("od", "ready", "")
	select {
	case got := <-seen:
		if got != "Bearer "+modelKey {
			t.Errorf("held request went out with Authorization %q", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the held request never reached the model")
	}
	if code := <-done; code != 200 {
		t.Errorf("status %d", code)
	}
}
