//go:build !e2e

package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor/supervisortest"
)

// The daemon with its gateway: served once the listener is up (in
// /readyz), keys required, keys and limits re-read on SIGHUP, no token in
// its log or metrics.
func TestGatewayInTheDaemon(t *testing.T) {
	const oldToken, newToken = "sk-old-0123456789abcdef", "sk-new-fedcba9876543210"
	httpPort, gwPort := supervisortest.FreePort(t), supervisortest.FreePort(t)
	dir := t.TempDir()
	keys := filepath.Join(dir, "api-keys")
	if err := os.WriteFile(keys, []byte("alice "+oldToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	top := fmt.Sprintf("listen: 127.0.0.1:%d\nlog: {level: debug}\ngpu: {backend: none}\ngateway: {listen: 127.0.0.1:%d, api_keys_file: %s}\n", httpPort, gwPort, keys)
	s := &site{Site: supervisortest.NewSite(t, top, testModel{Name: "a", YAML: "served_name: org/a-7b"}), t: t}
	d := s.start()
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	get := func(url string) (int, string) {
		resp, err := http.Get(url)
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	d.waitFor(t, 30*time.Second, "readyz 200 (model ready, gateway serving)", func() bool {
		code, _ := get(fmt.Sprintf("http://127.0.0.1:%d/readyz", httpPort))
		return code == 200
	})
	ask := func(token string) int {
		req, _ := http.NewRequest(http.MethodPost, gw+"/v1/chat/completions", strings.NewReader(`{"model":"a","messages":[{"role":"user","content":"hi"}]}`))
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body) //nolint:errcheck // status is enough
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := ask(oldToken); code != 200 {
		t.Fatalf("with alice's key: %d", code)
	}
	if code := ask(newToken); code != 401 {
		t.Fatalf("with an unlisted key: %d", code)
	}

	// A new key file on reload: the new token works, the old one no more.
	if err := os.WriteFile(keys, []byte("alice "+newToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d.cmd.Process.Signal(syscall.SIGHUP) //nolint:errcheck // checked below
	d.waitFor(t, 10*time.Second, "the new key in force", func() bool { return ask(newToken) == 200 })
	if code := ask(oldToken); code != 401 {
		t.Errorf("the old key after reload: %d", code)
	}
	// A keys file others can read is refused; the gateway keeps its keys.
	if err := os.Chmod(keys, 0o644); err != nil {
		t.Fatal(err)
	}
	d.cmd.Process.Signal(syscall.SIGHUP) //nolint:errcheck // checked below
	d.waitFor(t, 10*time.Second, "the refusal logged", func() bool {
		return strings.Contains(d.logText(), "the gateway keeps its previous keys")
	})
	if code := ask(newToken); code != 200 {
		t.Errorf("after a refused keys file: %d", code)
	}

	code, metrics := get(fmt.Sprintf("http://127.0.0.1:%d/metrics", httpPort))
	if code != 200 || !strings.Contains(metrics, `citadel_gateway_requests_total{code="200",key="alice",model="a"} 3`) {
		t.Errorf("metrics: %d\n%s", code, grepLines(metrics, "citadel_gateway_requests_total"))
	}
	if !strings.Contains(d.logText(), `"key": "alice"`) && !strings.Contains(d.logText(), `"key":"alice"`) {
		t.Errorf("no debug access line names alice:\n%s", d.logText())
	}
	d.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // checked by wait
	if code := d.wait(t); code != 0 {
		t.Errorf("exit %d", code)
	}
	for _, tok := range []string{oldToken, newToken} {
		if strings.Contains(d.logText(), tok) || strings.Contains(metrics, tok) {
			t.Errorf("a token in the daemon's log or metrics")
		}
	}
}

func TestCheckGateway(t *testing.T) {
	dir := t.TempDir()
	keys := filepath.Join(dir, "keys")
	if err := os.WriteFile(keys, []byte("alice sk-secret-0123456789abcdef\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := filepath.Join(dir, "c.yaml")
	yaml := fmt.Sprintf("control_socket: %s/s.sock\ngpu: {backend: none}\ngateway: {listen: \":8000\", api_keys_file: %s}\nmodels:\n  a: {model: /m/a, port: 11400, host: 0.0.0.0}\n", dir, keys)
	if err := os.WriteFile(cfg, []byte(yaml), 0o644); err != nil {
		t.Fatal(err)
	}
	var out, errb bytes.Buffer
	code := run([]string{"--check", "--config", cfg}, nil, &out, &errb)
	// The keys file is the host's problem (exit 3), as a missing env file
	// would be; the wide bind a warning.
	if code != checkHostErr || !strings.Contains(errb.String(), "warning: models.a.host: 0.0.0.0 is reachable around the gateway") ||
		!strings.Contains(errb.String(), "mode 0644 is readable or writable by group or others") || strings.Contains(errb.String(), "sk-secret") {
		t.Errorf("exit %d\nstdout:\n%s\nstderr:\n%s", code, out.String(), errb.String())
	}
}
