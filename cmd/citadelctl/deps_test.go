package main

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestLinksOnlyTheWire keeps citadelctl a small client: it links the
// control wire (api) and its client, never the daemon. Linking the
// supervisor or the config loader once made it a 12.5 MB binary carrying
// koanf, zap and the Prometheus client.
func TestLinksOnlyTheWire(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("the go command is needed to list citadelctl's dependencies: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, gobin, "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	deps := strings.Fields(string(out))
	if len(deps) == 0 {
		t.Fatal("go list -deps printed nothing")
	}
	for _, d := range deps {
		if why := forbiddenDep(d); why != "" {
			t.Errorf("citadelctl links %s: %s", d, why)
		}
	}
}

// forbiddenDep says why citadelctl must not link package path, or "".
func forbiddenDep(path string) string {
	const self = "citadel-supervisor/"
	switch {
	case strings.Contains(path, "github.com/knadh/koanf"):
		return "the config loader's library"
	case strings.Contains(path, "github.com/prometheus/client_golang"):
		return "the metrics library"
	case strings.HasPrefix(path, "go.uber.org/zap"):
		return "the daemon's logger"
	case path == self+"config" || strings.HasPrefix(path, self+"config/"):
		return "the daemon's configuration"
	case path == self+"supervisor/control/api", path == self+"supervisor/control/client":
		return ""
	case path == self+"supervisor" || strings.HasPrefix(path, self+"supervisor/"):
		return "the daemon; citadelctl may link only supervisor/control/api and supervisor/control/client"
	}
	return ""
}

func TestForbiddenDep(t *testing.T) {
	for path, bad := range map[string]bool{
		"citadel-supervisor/supervisor/control/api":      false,
		"citadel-supervisor/supervisor/control/client":   false,
		"citadel-supervisor/cmd/citadelctl":              false,
		"encoding/json":                                  false,
		"citadel-supervisor/supervisor":                  true,
		"citadel-supervisor/supervisor/control":          true,
		"citadel-supervisor/supervisor/proc":             true,
		"citadel-supervisor/config":                      true,
		"github.com/knadh/koanf/v2":                      true,
		"github.com/prometheus/client_golang/prometheus": true,
		"go.uber.org/zap/zapcore":                        true,
	} {
		if got := forbiddenDep(path) != ""; got != bad {
			t.Errorf("forbiddenDep(%q) forbids=%v, want %v", path, got, bad)
		}
	}
}
