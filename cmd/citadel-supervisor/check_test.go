//go:build !e2e

package main

import (
	"bytes"
	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/check/*.golden from the current output")

// TestCheckGolden runs `--check` on every testdata/check/*.yaml and compares
// its exit code, stdout and stderr with NAME.golden: what an operator reads
// is the contract (blackbox_exporter's TestLoadBadConfigs, extended to the
// host checks).
//
// A fixture may use, and its output shows back as placeholders:
//
//	${DIR}       a fresh temp dir (exists: a model directory that is there)
//	${TESTDATA}  the absolute path of testdata/check
//	${FREE1}..   ports free when the test started
//	${HELD}, ${HELD2}  ports this test listens on (another process's, for --check)
//
// and these comment lines, before any key:
//
//	# args: --strict                extra flags
//	# env: CITADEL_GPU_BACKEND=none  the daemon's environment
//	# daemon-running                a daemon answers on ${DIR}/supervisor.sock
//	# symlink                       the config is a symlink to the fixture
func TestCheckGolden(t *testing.T) {
	fixtures, _ := filepath.Glob("testdata/check/*.yaml")
	if len(fixtures) == 0 {
		t.Fatal("no fixtures")
	}
	testdata, err := filepath.Abs("testdata/check")
	if err != nil {
		t.Fatal(err)
	}
	for _, fixture := range fixtures {
		name := strings.TrimSuffix(filepath.Base(fixture), ".yaml")
		t.Run(name, func(t *testing.T) {
			src, err := os.ReadFile(fixture)
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			var fixed []int
			for _, m := range fixedPort.FindAllStringSubmatch(string(src), -1) {
				p, _ := strconv.Atoi(m[1])
				fixed = append(fixed, p)
			}
			ports, held := portRun(t, fixed)
			vars := map[string]string{
				"${DIR}":      dir,
				"${TESTDATA}": testdata,
				"${HELD}":     strconv.Itoa(ports[3]),
				"${HELD2}":    strconv.Itoa(ports[4]),
			}
			for _, ln := range held {
				defer ln.Close()
			}
			for i := 1; i <= 3; i++ {
				vars[fmt.Sprintf("${FREE%d}", i)] = strconv.Itoa(ports[i-1])
			}
			text := string(src)
			for k, v := range vars {
				text = strings.ReplaceAll(text, k, v)
			}
			var args, environ []string
			symlink := false
			for _, line := range strings.Split(text, "\n") {
				switch {
				case strings.HasPrefix(line, "# args: "):
					args = append(args, strings.Fields(strings.TrimPrefix(line, "# args: "))...)
				case strings.HasPrefix(line, "# env: "):
					environ = append(environ, strings.Fields(strings.TrimPrefix(line, "# env: "))...)
				case line == "# daemon-running":
					ln, err := net.Listen("unix", filepath.Join(dir, "supervisor.sock"))
					if err != nil {
						t.Fatal(err)
					}
					defer ln.Close()
				case line == "# symlink":
					symlink = true
				}
			}
			// --check test-binds the listen address: never the production
			// default's, which a daemon on this host may hold.
			if cfg, err := config.Parse([]byte(text), environ); err == nil {
				builtin, _ := config.Parse(nil, nil)
				if _, p, _ := net.SplitHostPort(cfg.Listen); cfg.Listen != "" && strings.HasSuffix(builtin.Listen, ":"+p) {
					t.Fatalf("the fixture listens on %s, the production default's port: use ${HELD} or listen: \"\"", cfg.Listen)
				}
			}
			path := filepath.Join(dir, "supervisor.yaml")
			if symlink {
				target := filepath.Join(dir, "elsewhere")
				if err := os.WriteFile(target, []byte(text), 0o600); err != nil {
					t.Fatal(err)
				}
				err = os.Symlink(target, path)
			} else {
				err = os.WriteFile(path, []byte(text), 0o600)
			}
			if err != nil {
				t.Fatal(err)
			}

			var stdout, stderr bytes.Buffer
			code := run(append([]string{"--check", "--config", path}, args...), environ, &stdout, &stderr)
			got := fmt.Sprintf("exit %d\n-- stdout --\n%s-- stderr --\n%s", code, stdout.String(), stderr.String())
			got = normalize(got, vars)

			golden := strings.TrimSuffix(fixture, ".yaml") + ".golden"
			if *update {
				if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -run TestCheckGolden -update to create it)", err)
			}
			if got != string(want) {
				t.Errorf("--check output differs from %s:\n%s\nwant:\n%s", golden, got, want)
			}
			if strings.Contains(got, "notshown") {
				t.Error("--check echoes a value")
			}
		})
	}
}

var portHolder = regexp.MustCompile(`in use by pid \d+ \([^)]*\)|in use \(holder not visible to this user\)`)

// normalize puts the placeholders back where the run's own values are.
func normalize(s string, vars map[string]string) string {
	s = portHolder.ReplaceAllLiteralString(s, "in use by pid ${PID} (${COMM})")
	// The longest first: ${TESTDATA} lies inside the checkout, not ${DIR},
	// but a port number could be part of another.
	for _, k := range []string{"${TESTDATA}", "${DIR}", "${HELD}", "${HELD2}", "${FREE1}", "${FREE2}", "${FREE3}"} {
		s = strings.ReplaceAll(s, vars[k], k)
	}
	return s
}

// fixedPort finds the ports a fixture writes as numbers.
var fixedPort = regexp.MustCompile(`\bport: (\d+)`)

// portRun returns five ports from the kernel, the first three free again
// and the last two held by this test (another process's, for --check).
// They are drawn again until the VLLM_PORT blocks derived from them
// (config.DefaultVLLMPort) clash neither with each other nor with those
// of the fixture's fixed ports: a clash made the validation itself random.
func portRun(t *testing.T, fixed []int) ([]int, []net.Listener) {
	t.Helper()
	eph := config.EphemeralPorts()
	clash := func(p, q int) bool {
		bp, bq := config.DefaultVLLMPort(p, eph), config.DefaultVLLMPort(q, eph)
		in := func(port, block int) bool { return port >= block && port < block+config.VLLMPortBlock }
		return in(p, bq) || in(q, bp) || in(bp, bq) || in(bq, bp)
	}
	for range 100 {
		var lns []net.Listener
		var ports []int
		for range 5 {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			lns = append(lns, ln)
			ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
		}
		ok := true
		for i, p := range ports {
			for _, q := range append(slices.Clone(ports[i+1:]), fixed...) {
				ok = ok && !clash(p, q)
			}
		}
		for _, ln := range lns[:3] {
			ln.Close()
		}
		if ok {
			return ports, lns[3:]
		}
		for _, ln := range lns[3:] {
			ln.Close()
		}
	}
	t.Fatal("no five ports from the kernel whose VLLM_PORT blocks keep apart")
	return nil, nil
}

// TestCheckSleepersResidue: --check warns of an on-demand model too large
// to wake next to the other sleepers' residue, and says what fits.
func TestCheckSleepersResidue(t *testing.T) {
	cfg, err := config.Parse([]byte(`gpu: {backend: none}
defaults: {activation: on_demand}
models:
  big: {model: /m/big, port: 12001, tensor_parallel: 2, gpu_memory_utilization: 0.95}
  s1: {model: /m/s1, port: 12002, gpu_memory_utilization: 0.5}
  s2: {model: /m/s2, port: 12003, gpu_memory_utilization: 0.5}
  s3: {model: /m/s3, port: 12004, gpu_memory_utilization: 0.5, sleep_level: 0}
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	devs := []gpu.Device{{UUID: "a", MemoryTotal: uint64(80 * config.GiB)}, {UUID: "b", MemoryTotal: uint64(80 * config.GiB)}}
	got := residueFindings(cfg, devs)
	want := "warning: models.big.gpu_memory_utilization: 0.95 needs 76.0 GiB per GPU; next to 2 sleepers' residue (about 2.0 GiB each) only 75.0 GiB is left: sleepers will be stopped to make room for it (cold starts later); at most 0.93 fits"
	if len(got) != 1 || got[0].String() != want {
		t.Errorf("got %v\nwant %s", got, want)
	}
}
