//go:build !e2e

package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
)

// TestAnEnvFileThatNeverAnswers: a model's env file on a mount that does
// not answer (a FIFO nobody writes: its open never returns, as a read on a
// hung hard NFS mount) holds neither the daemon nor the other models. The
// control socket comes up and status answers at once, naming what hangs;
// the model is stopped, another restarted; a model whose read returns late
// then starts; SIGTERM ends the daemon within its bounds although a read
// still hangs. Before, the daemon waited for every runner's first status,
// so its socket never came up and SIGTERM was not heard.
func TestAnEnvFileThatNeverAnswers(t *testing.T) {
	dir := t.TempDir()
	never, late := filepath.Join(dir, "never.env"), filepath.Join(dir, "late.env")
	for _, p := range []string{never, late} {
		if err := syscall.Mkfifo(p, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s := newSite(t,
		testModel{Name: "hung", YAML: "env_files: [" + never + "]"},
		testModel{Name: "late", YAML: "env_files: [" + late + "]"},
		testModel{Name: "other"},
	)
	d := s.start()
	c := client.New(s.Socket)
	defer c.Close()
	var st map[string]api.Status
	d.waitFor(t, 30*time.Second, "status answering, naming the hung read", func() bool {
		st = statusOf(t, s.Socket)
		return st != nil && st["hung"].State == api.Pending && strings.Contains(st["hung"].Reason, "reading "+never+" has not returned")
	})
	d.waitFor(t, 30*time.Second, "other ready", func() bool { return statusOf(t, s.Socket)["other"].State == api.Ready })
	// Each answer comes at once: a hung read is not waited for again.
	for range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := c.Status(ctx)
		cancel()
		if err != nil {
			t.Fatalf("status with a read hanging: %v", err)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := c.Op(ctx, api.OpStop, "hung"); err != nil {
		t.Fatalf("stop hung: %v", err)
	}
	otherPID := statusOf(t, s.Socket)["other"].PID
	if _, err := c.Op(ctx, api.OpRestart, "other"); err != nil {
		t.Fatalf("restart other: %v", err)
	}
	d.waitFor(t, 30*time.Second, "hung stopped, other restarted", func() bool {
		st := statusOf(t, s.Socket)
		return st["hung"].State == api.Stopped && st["other"].State == api.Ready && st["other"].PID != otherPID
	})

	// late's mount answers again: every open of its file is served.
	served := make(chan struct{})
	go func() {
		for {
			f, err := os.OpenFile(late, os.O_WRONLY, 0)
			if err != nil {
				return
			}
			f.WriteString("LATE_TOKEN=x\n") //nolint:errcheck // the reader says
			f.Close()
			select {
			case <-served:
				return
			default:
			}
		}
	}()
	d.waitFor(t, 30*time.Second, "late ready once its read returns", func() bool { return statusOf(t, s.Socket)["late"].State == api.Ready })
	close(served)
	// The writer may be blocked in its next open: give it a reader.
	if f, err := os.OpenFile(late, os.O_RDONLY|syscall.O_NONBLOCK, 0); err == nil {
		f.Close()
	}

	// never's read still hangs in the daemon.
	began := time.Now()
	d.cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // checked by wait
	if code := d.wait(t); code != 0 {
		t.Errorf("exit code %d after SIGTERM", code)
	}
	t.Logf("SIGTERM to exit, with a read hanging: %s", time.Since(began).Round(time.Millisecond))
}
