//go:build upgradecompat

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
)

// `make upgrade-compat` runs this: it builds the daemon of an earlier
// commit (-from, a git ref of this repository) and shows that upgrading it
// in place to this build, and then adopting its models after a SIGKILL,
// keeps every model's process (the same PIDs), although this build derives
// the children's settings differently (GPUs by index, VLLM_PORT blocks
// outside the ephemeral range, a cache directory per model): those reach a
// model at its next start only (docs/vllm.md).
var from = flag.String("from", "", "the git ref whose daemon is upgraded from")

func TestUpgradeFromEarlierBuild(t *testing.T) {
	if *from == "" {
		t.Fatal("-from REF is required: the commit whose daemon to upgrade from (make upgrade-compat sets it)")
	}
	old := buildAt(t, *from)

	// Models without vllm_port: their blocks are derived, differently by
	// the two builds. Ports are drawn until neither derivation clashes
	// (either would refuse the file): this build's parse, and the earlier
	// build's own --check (exit 1: invalid).
	var s *site
	gwPort, usage := supervisortest.FreePort(t), t.TempDir()
	validForBoth := func(y string) bool {
		if _, err := config.Parse([]byte(y), nil); err != nil {
			return false
		}
		if err := os.WriteFile(s.Path, []byte(y), 0o644); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(old, "--check", "--config", s.Path).CombinedOutput()
		var exit *exec.ExitError
		if errors.As(err, &exit) && exit.ExitCode() == 1 {
			t.Logf("ports drawn again: the earlier build refuses them: %s", out)
			return false
		}
		return true
	}
	for try := 0; ; try++ {
		top := fmt.Sprintf(`listen: ""
log: {level: debug}
gpu:
  backend: sim
  sim:
    devices: [{uuid: GPU-00000000-0000-0000-0000-000000000000, name: Sim H100, memory: 80GiB}]
    usage_dir: %s
gateway: {listen: 127.0.0.1:%d, max_wait: 1m}
`, usage, gwPort)
		s = &site{Site: supervisortest.NewSite(t, top,
			testModel{Name: "a", YAML: "gpu_memory_utilization: 0.3", Fake: []string{"--fake-usage-dir", usage}},
			testModel{Name: "b", YAML: "activation: on_demand\nsleep_level: 1\nidle_after: 1h\nmin_awake: 0s\ngpu_memory_utilization: 0.3", Fake: []string{"--fake-usage-dir", usage}},
		), t: t}
		// The earlier build knows no cache_dir either.
		y := s.Edit(t, supervisortest.Delete("models.a.vllm_port"), supervisortest.Delete("models.b.vllm_port"), supervisortest.Delete("cache_dir"))
		if validForBoth(y) {
			s.YAML = y
			break
		}
		if try == 20 {
			t.Fatal("no ports found that both builds accept in 20 draws")
		}
	}

	// The earlier daemon runs from a file the upgrade replaces, as a
	// package does; this test binary, installed there, is the new one.
	exe := filepath.Join(t.TempDir(), "citadel-supervisor")
	install := func(src string) {
		t.Helper()
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(exe+".new", b, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(exe+".new", exe); err != nil {
			t.Fatal(err)
		}
	}
	// This build's fake-vllm keeps the sim's ledger of GPU memory and
	// needs the GPUs it declares (devices.json), which this build's sim
	// backend writes when the daemon starts and the earlier one did not.
	cfg, err := config.Parse([]byte(s.YAML), nil)
	if err != nil {
		t.Fatal(err)
	}
	gpu.NewSim(cfg.GPU, nil)
	if _, err := os.Stat(filepath.Join(usage, "devices.json")); err != nil {
		t.Fatal(err)
	}

	install(old)
	d := s.startCmd(func(cmd *exec.Cmd) { cmd.Path, cmd.Args[0] = exe, exe })
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	supervisortest.WaitGateway(t, d, gw)
	if code, body := chat(t, gw, "b"); code != 200 {
		t.Fatalf("b: %d %s", code, body)
	}
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if _, err := c.Op(ctx, api.OpSleep, "b"); err != nil {
		t.Fatal(err)
	}
	d.waitFor(t, 30*time.Second, "a ready, b asleep under the earlier daemon", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["b"].State == api.Sleeping
	})
	before := statusOf(t, s.Socket)
	oldEnv := procEnviron(t, before["a"].PID)
	t.Logf("under %s: a pid %d CUDA_VISIBLE_DEVICES=%s VLLM_PORT=%s; b pid %d", *from, before["a"].PID, oldEnv["CUDA_VISIBLE_DEVICES"], oldEnv["VLLM_PORT"], before["b"].PID)

	same := func(d *daemon, what string) {
		t.Helper()
		d.waitFor(t, 60*time.Second, what, func() bool {
			st := statusOf(t, s.Socket)
			return st != nil && st["a"].PID == before["a"].PID && st["a"].State == api.Ready &&
				st["b"].PID == before["b"].PID && st["b"].State == api.Sleeping
		})
		// A configuration the new image took for changed would have been
		// restarted at the takeover (stopping), and counted (reload).
		st := statusOf(t, s.Socket)
		for _, m := range []string{"a", "b"} {
			if st[m].PID != before[m].PID || st[m].Restarts != before[m].Restarts {
				t.Errorf("%s: %s: pid %d → %d, restarts %d → %d", what, m, before[m].PID, st[m].PID, before[m].Restarts, st[m].Restarts)
			}
		}
	}

	install(os.Args[0])
	if _, err := c.Upgrade(ctx); err != nil {
		t.Fatalf("upgrade from %s: %v\n%s", *from, err, d.logText())
	}
	same(d, "the same processes after the upgrade")
	if v := statusOf(t, s.Socket)["b"]; v.VLLMVersion == "" {
		t.Logf("b's version is learned once it answers: %+v", v)
	}

	// A crash of the new daemon and a fresh one: adopted, not restarted.
	d.cmd.Process.Signal(syscall.SIGKILL) //nolint:errcheck // checked by wait
	d.wait(t)
	second := s.start()
	same(second, "the same processes adopted after a SIGKILL")

	// Their next start gets what this build derives.
	if _, err := c.Op(ctx, api.OpRestart, "a"); err != nil {
		t.Fatal(err)
	}
	second.waitFor(t, 60*time.Second, "a restarted", func() bool {
		st := statusOf(t, s.Socket)
		return st["a"].State == api.Ready && st["a"].PID != before["a"].PID
	})
	env := procEnviron(t, statusOf(t, s.Socket)["a"].PID)
	if env["CUDA_VISIBLE_DEVICES"] != "0" || env["VLLM_PORT"] == oldEnv["VLLM_PORT"] || !strings.HasSuffix(env["VLLM_CACHE_ROOT"], "/vllm/a") {
		t.Errorf("after its restart: CUDA_VISIBLE_DEVICES=%s VLLM_PORT=%s (was %s) VLLM_CACHE_ROOT=%s", env["CUDA_VISIBLE_DEVICES"], env["VLLM_PORT"], oldEnv["VLLM_PORT"], env["VLLM_CACHE_ROOT"])
	}
}

// buildAt builds the daemon of ref from this repository's history, in a
// directory of its own (git archive: the working tree is not touched).
func buildAt(t *testing.T, ref string) string {
	t.Helper()
	src := t.TempDir()
	archive := exec.Command("sh", "-c", `git -C "$1" archive "$2" | tar -x -C "$3"`, "sh", "../..", ref, src)
	if out, err := archive.CombinedOutput(); err != nil {
		t.Fatalf("git archive %s: %v\n%s", ref, err, out)
	}
	bin := filepath.Join(t.TempDir(), "citadel-supervisor-"+ref)
	build := exec.Command("go", "build", "-trimpath", "-ldflags", "-X main.version="+ref, "-o", bin, "./cmd/citadel-supervisor")
	build.Dir = src
	build.Env = append(os.Environ(), "CGO_ENABLED=1", "GOFLAGS=-buildvcs=false")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("build %s: %v\n%s", ref, err, out)
	}
	return bin
}
