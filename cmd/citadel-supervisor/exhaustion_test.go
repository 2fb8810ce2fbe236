//go:build e2e

package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
)

// TestFDExhaustionRestartsNothing: a daemon with 128 file descriptors, and
// a client holding 1000 idle connections to its HTTP listener (which any
// local user can reach; the control socket is 0660). The listener's cap
// keeps the daemon's descriptors for its own work: no model is restarted
// and citadelctl answers within 1 s throughout, also after the idle
// connections' header timeout has cycled them.
func TestFDExhaustionRestartsNothing(t *testing.T) {
	if _, err := exec.LookPath("prlimit"); err != nil {
		t.Fatal("prlimit (util-linux) is needed to lower the daemon's descriptor limit")
	}
	port := supervisortest.FreePort(t)
	s := &site{Site: supervisortest.NewSite(t, fmt.Sprintf("listen: 127.0.0.1:%d\n", port),
		testModel{Name: "a"}, testModel{Name: "b"}), t: t}
	d := s.startWrapped([]string{"prlimit", "--nofile=128:128", "--"})
	d.waitFor(t, 30*time.Second, "models healthy", s.healthy)
	c := client.New(s.Socket)
	defer c.Close()
	d.waitFor(t, 10*time.Second, "both ready", func() bool {
		st, err := c.Status(context.Background())
		return err == nil && len(st) == 2 && st[0].State == api.Ready && st[1].State == api.Ready
	})

	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	addr := "127.0.0.1:" + strconv.Itoa(port)
	for range 1000 {
		conn, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			break // the backlog is full: the attack is as big as it gets
		}
		conns = append(conns, conn)
	}
	t.Logf("holding %d idle connections to %s", len(conns), addr)
	if len(conns) < 200 {
		t.Fatalf("only %d connections: the attack did not happen", len(conns))
	}

	// Past the listener's 5 s read-header timeout, so idle connections
	// are dropped and the backlog's next ones accepted meanwhile.
	end := time.Now().Add(7 * time.Second)
	for time.Now().Before(end) {
		// A new connection each time, as each citadelctl run makes.
		fresh := client.New(s.Socket)
		start := time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		st, err := fresh.Status(ctx)
		cancel()
		fresh.Close()
		if err != nil {
			t.Fatalf("citadelctl status under attack: %v (after %s)", err, time.Since(start))
		}
		for _, m := range st {
			if m.Restarts != 0 || m.State != api.Ready {
				t.Fatalf("model %s under attack: %s (%s), %d restarts", m.Name, m.State, m.Reason, m.Restarts)
			}
		}
		<-time.After(200 * time.Millisecond)
	}
	d.cmd.Process.Signal(os.Interrupt) //nolint:errcheck // checked by wait
	if code := d.wait(t); code != 0 {
		t.Errorf("exit code %d", code)
	}
}
