package config

import (
	"os"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestGatewayDefaults(t *testing.T) {
	c, err := Parse([]byte("gpu: {backend: none}\nmodels:\n  a: {model: /m/a, port: 11400}\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	want := Gateway{Listen: "", MaxQueue: 64, MaxWait: 3 * time.Minute, MaxBody: 32 * MiB,
		BodyTimeout: 10 * time.Second, MinBodyRate: 16 * KiB, SendTimeout: time.Minute, BodyMemory: 64 * MiB, BodySpool: 2 * GiB, UpgradeDrain: 30 * time.Second}
	got := c.Gateway
	if len(got.Keys) != 0 {
		t.Errorf("keys by default: %v", got.Keys)
	}
	got.Keys = nil
	if !reflect.DeepEqual(got, want) || c.Models[0].MaxConcurrency != 0 {
		t.Errorf("defaults %+v, max_concurrency %d", c.Gateway, c.Models[0].MaxConcurrency)
	}
	c, err = Parse([]byte("gpu: {backend: none}\ngateway: {listen: \":8000\"}\n"), []string{"CITADEL_GATEWAY_LISTEN=127.0.0.1:8001"})
	if err != nil || c.Gateway.Listen != "127.0.0.1:8001" {
		t.Errorf("CITADEL_GATEWAY_LISTEN: %+v %v", c.Gateway, err)
	}
}

func TestGatewayBadConfig(t *testing.T) {
	_, err := Load("testdata/gateway/bad.yaml", nil)
	if err == nil {
		t.Fatal("loaded")
	}
	// An unknown key hides nothing else: every problem in one pass.
	if want := `gateway.max_queu: unknown key (line 9; did you mean "max_queue"?)`; !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "gateway.max_wait: must be positive") {
		t.Fatalf("got:\n%v\nwant it with the rest, and:\n%s", err, want)
	}
	raw, err := os.ReadFile("testdata/gateway/bad.yaml")
	if err != nil {
		t.Fatal(err)
	}
	data := strings.Replace(string(raw), "  max_queu: 3\n", "", 1)
	_, err = Parse([]byte(data), nil)
	want := `gateway.api_keys_file: "keys.txt": must be an absolute path
gateway.body_memory: must be at least 1MiB
gateway.body_timeout: must be positive
gateway.listen: port 11401 is models.beta's port
gateway.max_body: must be at least 1KiB
gateway.max_connections: -1: must not be negative (0 = derived from the descriptor limit)
gateway.max_connections_per_address: -3: must not be negative (0 = no cap)
gateway.max_queue: -1: must not be negative (0 = no queue: 429 when a model is busy)
gateway.max_wait: must be positive
gateway.send_timeout: must be positive
models.alpha.max_concurrency: -2: must not be negative (0 = no cap)
models.alpha.served_name: "beta" already names models.beta: the gateway could not tell them apart
models.gamma.served_name: "shared" already names models.delta: the gateway could not tell them apart`
	if err == nil || err.Error() != want {
		t.Errorf("got:\n%v\nwant:\n%s", err, want)
	}
}

// TestGatewayBodyBudget: a budget that could never hold the largest body
// allowed is refused, naming both keys.
func TestGatewayBodyBudget(t *testing.T) {
	_, err := Parse([]byte("gpu: {backend: none}\ngateway: {max_body: 64MiB, body_memory: 16MiB, body_spool: 0}\n"), nil)
	want := "gateway.body_spool: body_memory + body_spool (16.0 MiB) is less than max_body (64.0 MiB): the largest body allowed could never be held"
	if err == nil || err.Error() != want {
		t.Errorf("got %v\nwant %s", err, want)
	}
	if _, err := Parse([]byte("gpu: {backend: none}\ngateway: {max_body: 64MiB, body_memory: 16MiB, body_spool: 48MiB}\n"), nil); err != nil {
		t.Errorf("exactly enough: %v", err)
	}
}

func TestGatewayDiffAndWarnings(t *testing.T) {
	old, err := Parse([]byte("gpu: {backend: none}\nmodels:\n  a: {model: /m/a, port: 11400}\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	nw, err := Parse([]byte("gpu: {backend: none}\ngateway: {listen: \":8000\", max_queue: 3, max_wait: 1s}\nmodels:\n  a: {model: /m/a, port: 11400, max_concurrency: 4, host: 0.0.0.0}\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	nw.Models[0].Host = old.Models[0].Host // compare max_concurrency alone
	if d := Diff(old, nw); len(d) != 1 || d[0].Kind != Update || strings.Join(d[0].Fields, ",") != "max_concurrency" {
		t.Errorf("max_concurrency needs no restart: %+v", d)
	}
	if got := RestartOnly(old, nw); strings.Join(got, ",") != "gateway.listen" {
		t.Errorf("RestartOnly = %v: only gateway.listen of the gateway's keys", got)
	}
	nw.Gateway.MaxConnections, nw.Gateway.MaxConnectionsPerAddress, nw.Gateway.BodyMemory = 100, 4, 128*MiB
	if got := RestartOnly(old, nw); strings.Join(got, ",") != "gateway.listen,gateway.max_connections,gateway.max_connections_per_address" {
		t.Errorf("RestartOnly = %v: the connection caps are bound at start-up, body_memory is not", got)
	}
	nw.Models[0].Host = "0.0.0.0"
	if w := nw.GatewayWarnings(); len(w) != 1 || !strings.HasPrefix(w[0], "models.a.host: 0.0.0.0 is reachable around the gateway") {
		t.Errorf("warnings %q", w)
	}
	if w := old.GatewayWarnings(); len(w) != 0 {
		t.Errorf("no gateway, no warning: %q", w)
	}
}

func TestGatewayKeys(t *testing.T) {
	const models = "gpu: {backend: none}\nmodels:\n  a: {model: /m/a, port: 11400, served_name: org/a}\n  b: {model: /m/b, port: 11401}\n"
	c, err := Parse([]byte(models+`gateway:
  listen: ":8000"
  api_keys_file: /etc/citadel/api-keys
  keys:
    team-a: {models: [org/a], requests_per_minute: 5, tokens_per_minute: 30, max_concurrency: 2, weight: 3}
    batch: {}
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]KeyPolicy{
		"team-a": {Models: []string{"org/a"}, RequestsPerMinute: 5, TokensPerMinute: 30, MaxConcurrency: 2, Weight: 3},
		"batch":  {},
	}
	if !reflect.DeepEqual(c.Gateway.Keys, want) {
		t.Errorf("keys %+v, want %+v", c.Gateway.Keys, want)
	}
	if c.Gateway.Keys["batch"].Share() != 1 || c.Gateway.Keys["team-a"].Share() != 3 {
		t.Error("weight: 0 means 1")
	}

	_, err = Parse([]byte(models+`gateway:
  listen: ":8000"
  keys:
    "bad name": {}
    team-b: {models: [a, c], requests_per_minute: -1, tokens_per_minute: -2, max_concurrency: -3, weight: -4, burst: 3}
`), nil)
	wantErr := `gateway.keys: policies need keys: set gateway.api_keys_file (one ` + "`NAME TOKEN`" + ` per line) and name its NAMEs here
gateway.keys.<key on line 8>: a key NAME is letters, digits, '_', '.', '@' or '-' (at most 64), as in api_keys_file
gateway.keys.team-b.burst: unknown key (line 9)
gateway.keys.team-b.max_concurrency: -3: must not be negative (0 = no cap)
gateway.keys.team-b.models[1]: "c" names no model (configured: a, b)
gateway.keys.team-b.requests_per_minute: -1: must not be negative (0 = no limit)
gateway.keys.team-b.tokens_per_minute: -2: must not be negative (0 = no limit)
gateway.keys.team-b.weight: -4: must not be negative (0 = 1)`
	if err == nil || err.Error() != wantErr {
		t.Errorf("got:\n%v\nwant:\n%s", err, wantErr)
	}
}
