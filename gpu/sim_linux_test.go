package gpu

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// childRole makes the test binary act as a process of a model instead of
// running tests (Go's os/exec TestHelperProcess trick).
const childRole = "CITADEL_GPU_TEST_CHILD"

func TestMain(m *testing.M) {
	switch os.Getenv(childRole) {
	case "hold":
		// A loaded model: runs until its stdin closes.
		io.Copy(io.Discard, os.Stdin) //nolint:errcheck // EOF or error: exit either way
		os.Exit(0)
	case "orphan":
		// Starts a holder with the same argv and environment, says its
		// pid and exits, so the holder is re-parented away from the test:
		// it stands for another daemon's model on the same host.
		cmd := exec.Command(os.Args[0], os.Args[1:]...)
		cmd.Env = append(os.Environ(), childRole+"=hold")
		cmd.Stdin = os.Stdin
		if err := cmd.Start(); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Println(cmd.Process.Pid)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// startModel starts the test binary as a process that looks like vLLM on
// uuids to the sim backend. It runs until the returned stop is called (or
// the test ends); stop waits for it to be gone.
func startModel(t *testing.T, role, uuids, util string) (*exec.Cmd, io.ReadCloser, func()) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "--model", "/models/x", "--gpu-memory-utilization", util)
	cmd.Env = append(os.Environ(), childRole+"="+role, "CUDA_VISIBLE_DEVICES="+uuids)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.WaitDelay = 5 * time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stopped := false
	stop := func() {
		if stopped {
			return
		}
		stopped = true
		stdin.Close()
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			cmd.Process.Kill() //nolint:errcheck // best effort; the test fails anyway
			<-done
			t.Errorf("pid %d did not exit when its stdin closed", cmd.Process.Pid)
		}
	}
	t.Cleanup(stop)
	return cmd, stdout, stop
}

func readUsage(t *testing.T, s *Sim) map[string][]Process {
	t.Helper()
	devs, err := s.Read(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]Process{}
	for _, d := range devs {
		out[d.UUID] = d.Processes
		var sum uint64
		for _, p := range d.Processes {
			sum += p.UsedMemory
		}
		if d.MemoryUsed != sum || d.MemoryFree != d.MemoryTotal-sum {
			t.Errorf("%s: used %d, free %d, processes %v", d.UUID, d.MemoryUsed, d.MemoryFree, d.Processes)
		}
	}
	return out
}

// TestSimFindsItsDescendants: a real child process with CUDA_VISIBLE_DEVICES
// and --gpu-memory-utilization shows as used memory on its sim GPUs, under
// its pid, and is gone when it exits; a process of the same kind that is not
// a descendant (another daemon's model) does not count.
func TestSimFindsItsDescendants(t *testing.T) {
	s := NewSim(threeSimGPUs(), nil)
	if u := readUsage(t, s); len(u["GPU-sim-a"])+len(u["GPU-sim-b"])+len(u["GPU-sim-c"]) != 0 {
		t.Fatalf("usage before any model: %v", u)
	}

	// Another daemon's model on GPU-sim-c, re-parented away from us. It
	// runs until the test ends (its stdin stays open).
	middle, out, _ := startModel(t, "orphan", "GPU-sim-c", "0.5")
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("orphan's pid: %v", err)
	}
	orphan, _ := strconv.Atoi(strings.TrimSpace(line))
	defer endOrphan(t, orphan)
	exited := make(chan error, 1)
	go func() { exited <- middle.Wait() }()
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		t.Fatal("the orphan's parent did not exit")
	}
	if ppid, state, err := readParent("/proc", orphan); err != nil || ppid == os.Getpid() || state == 'Z' {
		t.Fatalf("pid %d (parent %d, state %c, %v) must run outside this test's tree; is the test a subreaper?", orphan, ppid, state, err)
	}
	// It would count if it were ours: only the scope leaves it out.
	args, err1 := readNulList("/proc", orphan, "cmdline")
	env, err2 := readNulList("/proc", orphan, "environ")
	if _, uuids, ok := simClaim(SimProcess{PID: orphan, Args: args, Env: env}); !ok || !slices.Equal(uuids, []string{"GPU-sim-c"}) || err1 != nil || err2 != nil {
		t.Fatalf("the orphan does not look like a model on GPU-sim-c: %v %v %v %v", uuids, ok, err1, err2)
	}

	model, _, stop := startModel(t, "hold", "GPU-sim-a,GPU-sim-b", "0.5")
	want := []Process{{PID: model.Process.Pid, UsedMemory: 40 * gib}}
	u := readUsage(t, s)
	if !slices.Equal(u["GPU-sim-a"], want) || !slices.Equal(u["GPU-sim-b"], want) {
		t.Errorf("a running model: GPU-sim-a %v, GPU-sim-b %v; want %v on each", u["GPU-sim-a"], u["GPU-sim-b"], want)
	}
	if len(u["GPU-sim-c"]) != 0 {
		t.Errorf("GPU-sim-c counts a process that is not ours: %v", u["GPU-sim-c"])
	}

	stop()
	u = readUsage(t, s)
	if len(u["GPU-sim-a"])+len(u["GPU-sim-b"])+len(u["GPU-sim-c"]) != 0 {
		t.Errorf("usage after the model exited: %v", u)
	}
}

// endOrphan ends the re-parented holder by its pid and waits, bounded, for
// it to be gone (its new parent reaps it).
func endOrphan(t *testing.T, pid int) {
	t.Helper()
	syscall.Kill(pid, syscall.SIGKILL) //nolint:errcheck // it may have exited with its stdin
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := syscall.Kill(pid, 0)
		if errors.Is(err, syscall.ESRCH) {
			return
		}
		if _, state, err := readParent("/proc", pid); err == nil && state == 'Z' {
			return // dead; its parent has yet to reap it
		}
		if time.Now().After(deadline) {
			t.Errorf("pid %d still there", pid)
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestProcWalkKeepsClaims: a walk reads the argv and environment of a
// process that claims sim GPUs once, while it lives (the same pid and
// start time); a process that claims nothing is read again at every walk,
// so a wrapper is seen once it execs the model; a reused pid is read anew.
func TestProcWalkKeepsClaims(t *testing.T) {
	root := t.TempDir()
	proc := func(pid, ppid int, start uint64, args ...string) {
		t.Helper()
		dir := fmt.Sprintf("%s/%d", root, pid)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		stat := fmt.Sprintf("%d (a (b) c) S %d %d %d 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 %d 0 0\n", pid, ppid, pid, pid, start)
		env := "PATH=/bin\x00CUDA_VISIBLE_DEVICES=GPU-a\x00"
		for name, body := range map[string]string{"stat": stat, "cmdline": strings.Join(args, "\x00") + "\x00", "environ": env} {
			if err := os.WriteFile(dir+"/"+name, []byte(body), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	claims := func(ps []SimProcess) map[int]bool {
		out := map[int]bool{}
		for _, p := range ps {
			_, _, ok := simClaim(p)
			out[p.PID] = ok
		}
		return out
	}
	w := &procWalk{root: root, self: 1}
	proc(1, 0, 5, "daemon")
	proc(10, 1, 100, "vllm", "--gpu-memory-utilization", "0.5")
	proc(11, 1, 110, "sh", "-c", "exec vllm")
	proc(12, 99, 120, "vllm", "--gpu-memory-utilization", "0.5") // not a descendant
	ps, err := w.descendants()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := claims(ps), map[int]bool{10: true, 11: false}; !maps.Equal(got, want) {
		t.Fatalf("first walk: claims %v, want %v", got, want)
	}
	// 10 rewrites its argv (setproctitle); 11 execs the model.
	proc(10, 1, 100, "VLLM::EngineCore")
	proc(11, 1, 110, "vllm", "--gpu-memory-utilization", "0.25")
	ps, err = w.descendants()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := claims(ps), map[int]bool{10: true, 11: true}; !maps.Equal(got, want) {
		t.Fatalf("second walk: claims %v, want %v", got, want)
	}
	// 10's pid is reused by another process: read anew.
	proc(10, 1, 101, "python3")
	ps, err = w.descendants()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := claims(ps), map[int]bool{10: false, 11: true}; !maps.Equal(got, want) {
		t.Fatalf("after pid reuse: claims %v, want %v", got, want)
	}
	if len(w.claimed) != 1 {
		t.Errorf("claims kept: %v, want 11's only", w.claimed)
	}
	for _, p := range w.claimed {
		if !slices.Equal(p.Env, []string{"CUDA_VISIBLE_DEVICES=GPU-a"}) {
			t.Errorf("kept of %d's environment: %q, want its CUDA_VISIBLE_DEVICES only", p.PID, p.Env)
		}
	}
}
