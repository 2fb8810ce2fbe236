package fakevllm_test

import (
	"bytes"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor/supervisortest"
	"citadel-supervisor/vllm"
)

func TestMain(m *testing.M) {
	supervisortest.RunFakeIfAsked()
	supervisortest.ExitWithoutDelay()
	os.Exit(m.Run())
}

func fake(t *testing.T, env []string, args ...string) *exec.Cmd {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(append(os.Environ(), supervisortest.SelfEnv+"=1"), env...)
	return cmd
}

// TestFakeDiesAtStartLikeOldVLLM: before 0.24 a UUID in
// CUDA_VISIBLE_DEVICES kills vLLM at start (int()); before 0.7.0
// --enable-sleep-mode is an unknown flag, before 0.18.0 --shutdown-timeout.
// Indices start fine everywhere.
func TestFakeDiesAtStartLikeOldVLLM(t *testing.T) {
	for _, tc := range []struct {
		name, version, visible string
		extra                  []string
		code                   int
		out                    string
	}{
		{"UUID on 0.20.1", "0.20.1", "GPU-52a3a85d-3c55-ca3a-a955-82c69ed360fc", nil, 1, "ValueError: invalid literal for int() with base 10: 'GPU-52a3a85d"},
		{"MIG UUID on 0.23.0", "0.23.0", "MIG-377e0049-554c-540b-93c6-d0976f8426cb", nil, 1, "invalid literal for int()"},
		{"sleep mode flag on 0.6.3", "0.6.3", "0", []string{"--enable-sleep-mode"}, 2, "unrecognized arguments: --enable-sleep-mode"},
		{"shutdown timeout on 0.17.1", "0.17.1", "0", []string{"--shutdown-timeout", "4"}, 2, "unrecognized arguments: --shutdown-timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"--model", "/m", "--port", strconv.Itoa(supervisortest.FreePort(t)), "--fake-vllm-version", tc.version, "--fake-load-time", "1h"}, tc.extra...)
			cmd := fake(t, []string{"CUDA_VISIBLE_DEVICES=" + tc.visible}, args...)
			var out bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &out
			done := make(chan error, 1)
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			go func() { done <- cmd.Wait() }()
			select {
			case err := <-done:
				var ee *exec.ExitError
				if !errors.As(err, &ee) || ee.ExitCode() != tc.code || !strings.Contains(out.String(), tc.out) {
					t.Errorf("exit %v, output:\n%s\nwant code %d with %q", err, out.String(), tc.code, tc.out)
				}
			case <-time.After(30 * time.Second):
				cmd.Process.Kill()
				t.Fatalf("still running: output\n%s", out.String())
			}
		})
	}
	// Indices and 0.24 with a UUID both start (and load for an hour).
	for _, env := range [][]string{{"CUDA_VISIBLE_DEVICES=0,1"}, {"CUDA_VISIBLE_DEVICES=GPU-52a3a85d-3c55-ca3a-a955-82c69ed360fc"}} {
		version := "0.20.1"
		if strings.Contains(env[0], "GPU-") {
			version = "0.24.0"
		}
		cmd := fake(t, env, "--model", "/m", "--port", strconv.Itoa(supervisortest.FreePort(t)), "--fake-vllm-version", version, "--fake-load-time", "1h")
		var out supervisortest.SyncBuffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		supervisortest.WaitFor(t, 30*time.Second, "loading", func() bool { return strings.Contains(out.String(), "Loading weights") })
		cmd.Process.Kill()
		cmd.Wait()
	}
}

// TestFakeRefusesWhileLoading: with --fake-bind-early the port is bound
// but not listening: connections are refused, as vLLM's are while it
// loads (it does not accept and hang).
func TestFakeRefusesWhileLoading(t *testing.T) {
	port := supervisortest.FreePort(t)
	cmd := fake(t, nil, "--model", "/m", "--port", strconv.Itoa(port), "--fake-bind-early", "--fake-load-time", "1h")
	var out supervisortest.SyncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	supervisortest.WaitFor(t, 30*time.Second, "loading", func() bool { return strings.Contains(out.String(), "Loading weights") })
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), 5*time.Second)
	if err == nil {
		c.Close()
		t.Fatal("a connection was accepted while loading")
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("dial while loading: %v, want connection refused", err)
	}
}

// TestFakeAsInterpreter: run as its model's python, fake-vllm answers the
// version lookup from package metadata (a virtualenv around it, or
// PYTHONPATH), or fails as Python does without vllm.
func TestFakeAsInterpreter(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "venv", "bin")
	site := filepath.Join(dir, "venv", "lib", "python3.12", "site-packages")
	for _, d := range []string{bin, filepath.Join(site, "vllm-0.8.5.dist-info"), filepath.Join(dir, "pp", "vllm-0.10.1.dist-info")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(site, "vllm-0.8.5.dist-info", "METADATA"), []byte("Metadata-Version: 2.1\nName: vllm\nVersion: 0.8.5\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "pp", "vllm-0.10.1.dist-info", "METADATA"), []byte("Name: vllm\nVersion: 0.10.1\n"), 0o644)
	python := filepath.Join(bin, "python3")
	if err := os.Symlink(os.Args[0], python); err != nil {
		t.Fatal(err)
	}
	run := func(env ...string) (string, error) {
		cmd := exec.Command(python, "-c", vllm.Snippet)
		cmd.Env = append(append(os.Environ(), supervisortest.SelfEnv+"=1"), env...)
		out, err := cmd.CombinedOutput()
		return strings.TrimSpace(string(out)), err
	}
	if out, err := run(); err != nil || out != "0.8.5" {
		t.Errorf("in its virtualenv: %q, %v", out, err)
	}
	if out, err := run("PYTHONPATH=" + filepath.Join(dir, "pp")); err != nil || out != "0.10.1" {
		t.Errorf("with PYTHONPATH: %q, %v", out, err)
	}
	os.RemoveAll(filepath.Join(site, "vllm-0.8.5.dist-info"))
	if out, err := run(); err == nil || !strings.Contains(out, "No package metadata was found for vllm") {
		t.Errorf("without vllm: %q, %v", out, err)
	}
}
