package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor"
	"citadel-supervisor/supervisor/control"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
)

// hostileEnv makes the re-executed test binary a hostile client of the
// control socket: "follow=N,half=M" opens N `logs -f` connections and M
// requests sent half-way, says "ready" and holds them until its stdin
// closes.
const hostileEnv = "CITADELCTL_TEST_HOSTILE"

func hostileClient(spec, socket string) int {
	var follow, half int
	for _, kv := range strings.Split(spec, ",") {
		k, v, _ := strings.Cut(kv, "=")
		n, _ := strconv.Atoi(v)
		switch k {
		case "follow":
			follow = n
		case "half":
			half = n
		}
	}
	var conns []net.Conn
	admitted := 0
	for i := range follow + half {
		c, err := net.Dial("unix", socket)
		if err != nil {
			fmt.Fprintln(os.Stderr, "hostile:", err)
			return 1
		}
		conns = append(conns, c)
		if i < follow {
			io.WriteString(c, "GET "+api.PathLogs+"?model=a&follow=1 HTTP/1.1\r\nHost: x\r\n\r\n") //nolint:errcheck // seen below
			c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))                              //nolint:errcheck // a daemon that waits is the bug
			if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err == nil && resp.StatusCode == 200 {
				admitted++
			}
			continue
		}
		io.WriteString(c, "POST "+api.PathOp+"stop HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mod") //nolint:errcheck // held half-way
	}
	fmt.Printf("ready: %d connections, %d following\n", len(conns), admitted)
	io.Copy(io.Discard, os.Stdin) //nolint:errcheck // until the test closes it
	return 0
}

// TestControlSocketHostileReader: a user who may only read the control
// socket opens 64 `citadelctl logs -f` and 64 requests sent half-way, as
// a real process of another uid. Root's status and stop still answer
// within a second, every time. Before, either attack alone took every
// connection of the socket, root's included.
func TestControlSocketHostileReader(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run a client as another user; control.TestControlSocketNotMonopolised covers the rule")
	}
	g, err := user.LookupGroup("nogroup")
	if err != nil {
		t.Skipf("no group nogroup to be the read-only group: %v", err)
	}
	readGID, _ := strconv.ParseUint(g.Gid, 10, 32)
	d := startDaemonWith(t, func(o *control.Options) { o.ReadGroup = "nogroup" }, "", model{Name: "a"}, model{Name: "b"})
	d.waitAll(t, supervisor.Ready)
	for p := filepath.Dir(d.site.Socket); p != "/" && p != "/tmp"; p = filepath.Dir(p) {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	self, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(d.site.Dir, "citadelctl.test")
	if err := os.WriteFile(bin, self, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, spec := range []string{"follow=64", "half=64", "follow=64,half=64"} {
		t.Run(spec, func(t *testing.T) {
			cmd := exec.Command(bin, d.site.Socket)
			cmd.Env = []string{hostileEnv + "=" + spec}
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: uint32(readGID), Groups: []uint32{}}}
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			cmd.Stderr = os.Stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { stdin.Close(); cmd.Wait() }() //nolint:errcheck // it ends when stdin closes
			line, err := bufio.NewReader(out).ReadString('\n')
			if err != nil || !strings.HasPrefix(line, "ready") {
				t.Fatalf("the hostile client: %q %v", line, err)
			}
			t.Logf("hostile client %s", strings.TrimSpace(line))
			for round := range 5 {
				for _, what := range []string{"status", "stop"} {
					c := client.New(d.site.Socket)
					start := time.Now()
					ctx, cancel := context.WithTimeout(context.Background(), time.Second)
					if what == "status" {
						_, err = c.Status(ctx)
					} else {
						_, err = c.Op(ctx, api.OpStop, "b")
					}
					cancel()
					c.Close()
					if err != nil {
						t.Fatalf("round %d: root's %s under attack: %v (after %s)", round, what, err, time.Since(start))
					}
				}
			}
		})
	}
}

// TestStopLosesRace: `citadelctl stop` while another operator starts the
// model again reports that operation and exits 1 as soon as it happens.
// It used to wait its whole --timeout, then exit 3 saying the daemon was
// unreachable while it ran.
func TestStopLosesRace(t *testing.T) {
	// A stop that takes 2 s (SIGTERM ignored, then SIGKILL): room for the
	// other operator's start.
	d := startDaemon(t, "", model{Name: "a", YAML: "stop_timeout: 2s", Fake: []string{"--fake-ignore-sigterm"}})
	d.waitAll(t, supervisor.Ready)
	type res struct {
		code      int
		out, errs string
		took      time.Duration
	}
	done := make(chan res, 1)
	start := time.Now()
	go func() {
		code, out, errs := d.ctl(t, "stop", "--timeout", "20s", "a")
		done <- res{code, out, errs, time.Since(start)}
	}()
	d.waitFor(t, 10*time.Second, "a stopping", func() bool { return d.state(t, "a").State == supervisor.Stopping })
	if code, _, errs := d.ctl(t, "start", "a"); code != 0 {
		t.Fatalf("start: exit %d %s", code, errs)
	}
	var r res
	select {
	case r = <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("stop still waiting 15 s after the start that undid it")
	}
	if r.code != exitFailed || !strings.Contains(r.errs, "a: not stopped: start by uid ") || !strings.Contains(r.errs, "came after this stop") {
		t.Errorf("stop: exit %d after %s\nstdout: %s\nstderr: %s", r.code, r.took, r.out, r.errs)
	}
	if st := d.state(t, "a"); st.LastOp == nil || st.LastOp.Op != "start" || !strings.HasPrefix(st.LastOp.By, "uid ") {
		t.Errorf("last_op %+v", st.LastOp)
	}
}
