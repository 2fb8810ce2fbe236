package control

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
)

type opBackend struct{ nobackend }

func (opBackend) Do(_ context.Context, _ api.Op, names ...string) (map[string]error, error) {
	out := map[string]error{}
	for _, n := range names {
		out[n] = nil
	}
	return out, nil
}

// TestDaemonInfoAndPeerThroughTheCap: /v1/daemon answers the ownership
// mode, and the connection cap's wrapper keeps SO_PEERCRED working (a
// state-changing request from the daemon's own user is admitted).
func TestDaemonInfoAndPeerThroughTheCap(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	s, err := Listen(Options{Path: path, Logger: zap.NewNop(), Backend: opBackend{}, MaxConns: 2,
		Daemon: func() api.Daemon { return api.Daemon{Ownership: "cgroup", Cgroup: "/sys/fs/cgroup/x"} }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	defer func() {
		cancel()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			t.Error("Run did not return")
		}
	}()
	c := client.New(path)
	defer c.Close()
	rctx, rcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer rcancel()
	d, err := c.Daemon(rctx)
	if err != nil || d.Ownership != "cgroup" || d.Cgroup != "/sys/fs/cgroup/x" {
		t.Errorf("Daemon() = %+v, %v", d, err)
	}
	if _, err := c.Op(rctx, api.OpStop, "m"); err != nil && strings.Contains(err.Error(), "peer credentials unknown") {
		t.Errorf("peer credentials lost behind the connection cap: %v", err)
	} else if err != nil {
		t.Errorf("Op: %v", err)
	}
}
