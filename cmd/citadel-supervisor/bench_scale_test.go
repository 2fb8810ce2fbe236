//go:build benchdriver

package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/supervisor/supervisortest"
)

// TestBenchScale runs the release build of the daemon with 200 models
// (fake-vllm, the release build too) on four sim GPUs, the shipped probe
// settings, and measures once every model is ready: the daemon's resident
// memory and OS threads, and /metrics over HTTP (median of 50).
//
//	go test -tags benchdriver -count=1 -run TestBenchScale -v ./cmd/citadel-supervisor/
func TestBenchScale(t *testing.T) {
	const n = 200
	bin := t.TempDir()
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin+"/", "../../cmd/citadel-supervisor", "../../cmd/fake-vllm")
	build.Env = append(os.Environ(), "CGO_ENABLED=1", "CGO_CFLAGS=-O2 -g -Wno-deprecated-declarations")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	dir := t.TempDir()
	listen := "127.0.0.1:" + strconv.Itoa(supervisortest.FreePort(t))
	var y strings.Builder
	fmt.Fprintf(&y, "listen: %s\ncontrol_socket: %s\nlog: {level: warn}\n", listen, filepath.Join(dir, "s.sock"))
	y.WriteString("gpu:\n  backend: sim\n  sim:\n    devices:\n")
	for i := range 4 {
		fmt.Fprintf(&y, "      - {uuid: GPU-%d, memory: 80GiB}\n", i)
	}
	fmt.Fprintf(&y, "defaults:\n  command: [%q]\n  stop_timeout: 5s\nmodels:\n", filepath.Join(bin, "fake-vllm"))
	var ports []int
	for i := range n {
		port := 21000 + i // below the ephemeral range, away from the VLLM_PORT blocks
		ports = append(ports, port)
		path := filepath.Join(dir, "models", fmt.Sprintf("m%03d", i))
		if err := os.MkdirAll(path, 0o755); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&y, "  m%03d: {model: %s, port: %d, vllm_port: %d, gpu_memory_utilization: 0.004}\n", i, path, port, 23000+16*i)
	}
	conf := filepath.Join(dir, "supervisor.yaml")
	if err := os.WriteFile(conf, []byte(y.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(filepath.Join(bin, "citadel-supervisor"), "--config", conf)
	log := &supervisortest.SyncBuffer{}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }() //nolint:errcheck // ProcessState says
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM) //nolint:errcheck // stops every model
		select {
		case <-done:
		case <-time.After(60 * time.Second):
			cmd.Process.Kill() //nolint:errcheck // best effort
		}
		if t.Failed() {
			t.Logf("daemon output:\n%s", log.String())
		}
	})
	start := time.Now()
	supervisortest.WaitFor(t, 5*time.Minute, "200 models ready", func() bool {
		select {
		case <-done:
			t.Fatalf("the daemon exited:\n%s", log.String())
		default:
		}
		resp, err := http.Get("http://" + listen + "/readyz")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		// Every one of the n counted ready, not only a 200 (which a
		// daemon whose models are not all known yet might give).
		var ready struct {
			Ready int `json:"ready"`
		}
		if json.NewDecoder(resp.Body).Decode(&ready) != nil {
			return false
		}
		return resp.StatusCode == 200 && ready.Ready == n
	})
	allReady := time.Since(start)
	// Settle: a probe period of every model.
	settle := time.Now().Add(15 * time.Second)
	supervisortest.WaitFor(t, 30*time.Second, "the settling period", func() bool { return time.Now().After(settle) })
	var scrapes []time.Duration
	size := 0
	cpu0 := cpuSeconds(t, cmd.Process.Pid)
	for range 50 {
		s := time.Now()
		resp, err := http.Get("http://" + listen + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		scrapes = append(scrapes, time.Since(s))
		size = len(b)
	}
	// The daemon's CPU time over the 50 scrapes (its probes of the models
	// meanwhile included: about a second of them): on a shared machine
	// it moves less with the load than the wall-clock time does.
	cpuPerScrape := (cpuSeconds(t, cmd.Process.Pid) - cpu0) / float64(len(scrapes))
	rss, threads := procStatus(t, cmd.Process.Pid, "VmRSS"), procStatus(t, cmd.Process.Pid, "Threads")
	fmt.Printf("    | measure (200 models, release build) | value | target |\n    |---|---|---|\n")
	fmt.Printf("    | every model ready after the daemon's start | %.1f s | |\n", allReady.Seconds())
	fmt.Printf("    | daemon RSS, 200 models ready, after 50 scrapes | %.1f MiB | ≤ 64 MiB |\n", float64(rss)/1024)
	fmt.Printf("    | daemon OS threads | %d | bounded |\n", threads)
	fmt.Printf("    | /metrics over HTTP, median of 50 (%d KiB) | %s | ≤ 8 ms |\n", size/1024, ms(median(scrapes)))
	fmt.Printf("    | daemon CPU per /metrics scrape, over the 50 | %.1f ms | |\n", cpuPerScrape*1000)
}

// cpuSeconds is pid's user and system CPU time so far (/proc/PID/stat
// fields 14 and 15, in clock ticks of 10 ms).
func cpuSeconds(t *testing.T, pid int) float64 {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		t.Fatal(err)
	}
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100
}
