//go:build !e2e

package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
)

// The daemon with key policies from its file: scope and rate limits apply,
// a reload applies the file's new policies, and the control socket's usage
// counts each key's requests and tokens.
func TestGatewayKeysInTheDaemon(t *testing.T) {
	const aToken, bToken = "sk-team-a-0123456789abcdef", "sk-team-b-fedcba9876543210"
	gwPort := supervisortest.FreePort(t)
	dir := t.TempDir()
	keys := filepath.Join(dir, "api-keys")
	if err := os.WriteFile(keys, []byte("team-a "+aToken+"\nteam-b "+bToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	top := func(policy string) string {
		return fmt.Sprintf("gpu: {backend: none}\ngateway:\n  listen: 127.0.0.1:%d\n  api_keys_file: %s\n  keys:\n    team-a: %s\n", gwPort, keys, policy)
	}
	s := &site{Site: supervisortest.NewSite(t, top("{models: [a], requests_per_minute: 2}"), testModel{Name: "a"}, testModel{Name: "b"}), t: t}
	d := s.start()
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	ask := func(token, model string) int {
		req, _ := http.NewRequest(http.MethodPost, gw+"/v1/chat/completions", strings.NewReader(`{"model":"`+model+`","messages":[{"role":"user","content":"hi"}],"max_tokens":4}`))
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return -1
		}
		io.Copy(io.Discard, resp.Body) //nolint:errcheck // status is enough
		resp.Body.Close()
		return resp.StatusCode
	}
	d.waitFor(t, 30*time.Second, "both models served", func() bool { return ask(bToken, "a") == 200 && ask(bToken, "b") == 200 })
	if code := ask(aToken, "b"); code != 403 {
		t.Errorf("team-a on b: %d, want 403", code)
	}
	for i, want := range []int{200, 200, 429} {
		if code := ask(aToken, "a"); code != want {
			t.Errorf("team-a's request %d on a: %d, want %d", i+1, code, want)
		}
	}

	// The file's new policy: team-a may use b, without a rate limit.
	y := s.Edit(t, supervisortest.Set("gateway.keys.team-a", map[string]any{"models": []string{"a", "b"}}))
	if err := os.WriteFile(s.Path, []byte(y), 0o644); err != nil {
		t.Fatal(err)
	}
	d.cmd.Process.Signal(syscall.SIGHUP) //nolint:errcheck // checked below
	d.waitFor(t, 10*time.Second, "the new policy in force", func() bool { return ask(aToken, "b") == 200 })
	if code := ask(aToken, "a"); code != 200 {
		t.Errorf("team-a on a after the reload: %d", code)
	}

	c := client.New(s.Socket)
	defer c.Close()
	u, err := c.Usage(context.Background())
	if err != nil || !u.Gateway {
		t.Fatalf("usage: %+v %v", u, err)
	}
	got := map[string][3]int64{}
	for _, r := range u.Rows {
		got[r.Model+"/"+r.Key] = [3]int64{r.Requests, r.PromptTokens, r.CompletionTokens}
	}
	// fake-vllm reports 1 prompt token and max_tokens completion tokens.
	if a := got["a/team-a"]; a[0] != 4 || a[1] != 3 || a[2] != 12 {
		t.Errorf("a/team-a: %v, want 4 requests (one refused), 3 and 12 tokens; all: %v", a, got)
	}
	if b := got["b/team-a"]; b[0] < 2 || b[1] != 1 || b[2] != 4 {
		t.Errorf("b/team-a: %v, want the 403s and one answered after the reload; all: %v", b, got)
	}
	d.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // checked by wait
	if code := d.wait(t); code != 0 {
		t.Errorf("exit %d", code)
	}
	if strings.Contains(d.logText(), aToken) || strings.Contains(d.logText(), bToken) {
		t.Error("a token in the daemon's log")
	}
}
