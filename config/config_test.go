package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestLoadGood(t *testing.T) {
	c, err := Load("testdata/good.yaml", nil)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if got, want := len(c.Models), 3; got != want {
		t.Fatalf("models = %d, want %d", got, want)
	}
	mixtral, _ := c.Model("mixtral")
	phi3, _ := c.Model("phi3")
	coder, _ := c.Model("coder")

	cases := []struct {
		name      string
		got, want any
	}{
		{"builtin command", mixtral.Command, []string{"/opt/citadel/vllm-env/bin/python", "-m", "vllm.entrypoints.openai.api_server"}},
		{"builtin host", mixtral.Host, "127.0.0.1"},
		{"served_name defaults to key", mixtral.ServedName, "mixtral"},
		{"served_name override", phi3.ServedName, "phi-3-mini"},
		{"defaults args inherited", mixtral.Args, []string{"--trust-remote-code", "--enable-chunked-prefill", "--enable-prefix-caching", "--disable-log-stats"}},
		{"model args replace defaults args", phi3.Args, []string{"--trust-remote-code"}},
		{"model env merges into defaults env", phi3.Env, map[string]string{"HF_HOME": "/mnt/citadel-models/cache", "VLLM_CACHE_ROOT": "/mnt/citadel-models/cache/vllm"}},
		{"defaults restart.delay", mixtral.Restart.Delay, 5 * time.Second},
		{"builtin restart.burst", mixtral.Restart.Burst, 5},
		{"model restart.burst keeps defaults delay", phi3.Restart, Restart{Delay: 5 * time.Second, MaxDelay: 5 * time.Minute, ResetAfter: 10 * time.Minute, Burst: 3, Interval: 30 * time.Minute, RetryFailedAfter: time.Hour}},
		{"probe override keeps other probe keys", phi3.Probe, Probe{Path: "/health", Period: 5 * time.Second, Timeout: 5 * time.Second, FailureThreshold: 3, StartupTimeout: 20 * time.Minute, DeepTimeout: 30 * time.Second}},
		{"int pin", phi3.GPUs, []GPURef{"1"}},
		{"unquoted scalars in args", coder.Args, []string{"--max-num-seqs", "256", "--enforce-eager", "true", "--swap-space", "0.5"}},
		{"unquoted scalar env value", coder.Env["OMP_NUM_THREADS"], "8"},
		{"builtin tensor_parallel", phi3.TensorParallel, 1},
		{"enabled by default", mixtral.Enabled, true},
		{"derived vllm_port", mixtral.VLLMPortStart(), DefaultVLLMPort(11400, EphemeralPorts())},
		{"vllm_port as written stays 0 when derived", mixtral.VLLMPort, 0},
		{"headroom", c.GPU.Headroom, GiB},
		{"sim memory", c.GPU.Sim.Devices[0].Memory, 80 * GiB},
		{"builtin release_timeout", c.GPU.ReleaseTimeout, 60 * time.Second},
		{"longest stop timeout", c.LongestStopTimeout(), 30 * time.Second},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if !reflect.DeepEqual(tc.got, tc.want) {
				t.Errorf("got %#v, want %#v", tc.got, tc.want)
			}
		})
	}
}

func TestLoadMinimal(t *testing.T) {
	c, err := Parse([]byte("{}"), nil)
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	if c.Listen != "127.0.0.1:9400" || c.ControlSocket != "/run/citadel/supervisor.sock" || c.GPU.Backend != "nvml" || len(c.Models) != 0 {
		t.Errorf("built-in defaults not applied: %+v", c)
	}
}

// TestLoadBadConfigs asserts every bad fixture by its exact error text: the
// messages are what an operator reads at 3 a.m., so they are part of the
// contract.
func TestLoadBadConfigs(t *testing.T) {
	cases := map[string]string{
		"defaults.yaml": `defaults.args[0]: --port is set by the supervisor from the model's key port
defaults.env.CUDA_VISIBLE_DEVICES: set by the supervisor: set gpus instead
defaults.probe.path: "health": must start with /
defaults.probe.timeout: not a duration: write it like 30s, 5m or 1h (line 5)
defaults.restart.burst: 0: must be at least 1
models.c.restart.burst: 0: must be at least 1`,
		"duplicate_port.yaml": `models.mixtral.port: 11400 already used by models.hermes
models.phi3.port: 9400 is the supervisor's own listen port`,
		"names.yaml": `defaults.port: belongs to one model: set it under models.<name>.port (line 3)
models.-x: model name may use letters, digits, '-' and '_' and must start with a letter or digit (line 6)
models.all: "all" is reserved for citadelctl; rename the model (line 5)`,
		"not_mapping.yaml": `parse config: line 1: the file must be a mapping of keys (listen:, gpu:, models: ...), not a single value`,
		"one_pass.yaml": `gpu.release_timout: unknown key (line 3; did you mean "release_timeout"?)
models.hermes.stop_timeout: not a duration: write it like 30s, 5m or 1h (line 8)
models.mixtral.gpu_memory_utilization: 2: must be in (0, 1], a fraction of each GPU's memory
models.mixtral.port: 11400 already used by models.hermes
models.mixtral.probe.period: must be positive`,
		"ranges.yaml": `defaults.probe.failure_threshold: 0: must be at least 1
defaults.probe.path: "health": must start with /
defaults.restart.burst: 0: must be at least 1
defaults.restart.max_delay: 10s is below delay 1m0s
gpu.backend: "cuda": use nvml, sim or none
log.format: "xml": use json or console
log.level: "loud": use debug, info, warn or error
models.mixtral.args[0]: --port is set by the supervisor from the model's key port
models.mixtral.env.CUDA_VISIBLE_DEVICES: set by the supervisor: set gpus instead
models.mixtral.env.bad-name: not a valid environment variable name
models.mixtral.env_files[0]: "secrets.env": must be an absolute path
models.mixtral.gpu_memory_utilization: 1.5: must be in (0, 1], a fraction of each GPU's memory
models.mixtral.port: required: a TCP port from 1 to 65535
models.mixtral.tensor_parallel: 0: must be at least 1 (the number of GPUs)
models.phi3.model: required: the model's directory (vLLM --model)`,
		"secrets.yaml": `models.a.args: expected a list, got a string (line 8)
models.a.env: expected a mapping, got a string (line 7)
models.b.env.HF_TOKEN: set twice (lines 13 and 14)
models.b.gpus[0]: expected a GPU index or UUID, got a mapping (line 16)
models.b.restart.delay: not a duration: write it like 30s, 5m or 1h (line 15)
models.c.args[0]: contains a NUL byte, which a program's argument cannot hold
models.c.env.NUL_IN_VALUE: contains a NUL byte, which an environment variable cannot hold`,
		"sim_pins.yaml": `gpu.sim.devices[1].memory: must be positive, e.g. 80GiB
gpu.sim.devices[1].uuid: GPU-a already used by gpu.sim.devices[0]
models.mixtral.gpus[1]: 0 is pinned twice
models.phi3.gpus[0]: GPU 3 does not exist: gpu.sim.devices declares 2
models.yi.gpus[0]: GPU-b is not among gpu.sim.devices`,
		"syntax.yaml": `parse config: yaml: line 1: did not find expected ',' or ']'`,
		"types.yaml": `gpu.headroom: not a size: use a number with KiB, MiB, GiB or TiB, e.g. 1GiB (line 1)
gpu.release_timeout: 60 has no unit: write a duration such as 60s (line 1)
models.mixtral.args: expected a list, got a string (line 9)
models.mixtral.enabled: expected true or false, got a string (line 7)
models.mixtral.gpu_memory_utilization: expected a number, got a string (line 6)
models.mixtral.port: expected a whole number, got a string (line 5)
models.mixtral.stop_timeout: not a duration: write it like 30s, 5m or 1h (line 8)`,
		"unknown_keys.yaml": `defaults.restart.dealy: unknown key (line 4; did you mean "delay"?)
gpu.sim.devices[0].colour: unknown key (line 2)
listn: unknown key (line 1; did you mean "listen"?)
models.mixtral.tensor_paralel: unknown key (line 9; did you mean "tensor_parallel"?)`,
		"wake.yaml": `models.a.wake_timeout: must not be negative (0 derives it from the model's recent wakes)
models.b.wake_timeout: 30m0s: must be below probe.startup_timeout 20m0s (a wake that takes as long as a cold start has failed); 0 derives it from the model's recent wakes
models.c.wake_timeout: 2m0s: must be below probe.startup_timeout 1m0s (a wake that takes as long as a cold start has failed); 0 derives it from the model's recent wakes`,
		"vllm_port.yaml": `models.a.port: 11400 lies in models.c's VLLM_PORT block; move one of them
models.b.vllm_port: block 62280-62295 overlaps models.a's block; set vllm_port to a free range
models.c.port: 11401 lies in models.c's VLLM_PORT block; move one of them`,
	}
	files, _ := filepath.Glob("testdata/bad/*.yaml")
	if len(files) != len(cases) {
		t.Errorf("testdata/bad has %d files, the table %d: every fixture needs its expected text", len(files), len(cases))
	}
	for name, want := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := Load(filepath.Join("testdata/bad", name), nil)
			if err == nil {
				t.Fatal("Load succeeded, want an error")
			}
			if got := err.Error(); got != want {
				t.Errorf("error text:\n%s\nwant:\n%s", got, want)
			}
			if strings.Contains(err.Error(), "notshown") {
				t.Error("the error echoes a value")
			}
		})
	}
}

// TestForeignFileNotEchoed: a config path that is a symlink to another
// file (or any file that is not a config) must not have its lines printed.
func TestForeignFileNotEchoed(t *testing.T) {
	cases := map[string]struct{ content, want string }{
		"shadow-like": {"root:$6$notshown.hash:19000:0:99999:7:::\n", "<key on line 1>: unknown key (line 1)"},
		"two lines":   {"root:$6$notshown:1::\ndaemon:x:1:1::/:/bin/false\n", "parse config: yaml: line 2: could not find expected ':'"},
		"a string":    {"hf_notshown\n", "parse config: line 1: the file must be a mapping of keys (listen:, gpu:, models: ...), not a single value"},
		"quoted tag":  {"listen: !!int \"notshown\"\n", "listen: this int value cannot be read (line 1)"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			target := filepath.Join(dir, "target")
			if err := os.WriteFile(target, []byte(tc.content), 0o600); err != nil {
				t.Fatal(err)
			}
			link := filepath.Join(dir, "supervisor.yaml")
			if err := os.Symlink(target, link); err != nil {
				t.Fatal(err)
			}
			_, err := Load(link, nil)
			if err == nil || err.Error() != tc.want {
				t.Errorf("got %v\nwant %s", err, tc.want)
			}
		})
	}
}

func TestYAMLAnchorsMerge(t *testing.T) {
	c, err := Parse([]byte(`gpu: {backend: none}
x-common: &common {model: /m/a, tensor_parallel: 2}
models:
  a: {<<: *common, port: 11400}
  b: {<<: *common, port: 11401, tensor_parallel: 1}
`), nil)
	if err == nil || !strings.Contains(err.Error(), "x-common: unknown key (line 2)") {
		t.Fatalf("a top-level anchor key is still an unknown key: %v", err)
	}
	c, err = Parse([]byte(`gpu: {backend: none}
models:
  a: &common {model: /m/a, port: 11400, tensor_parallel: 2}
  b: {<<: *common, port: 11401, tensor_parallel: 1}
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := c.Model("b")
	if b.Path != "/m/a" || b.Port != 11401 || b.TensorParallel != 1 {
		t.Errorf("merge: %+v", b)
	}
}

func TestEnvOverrides(t *testing.T) {
	env := []string{
		"CITADEL_LISTEN=",
		"CITADEL_CONTROL_SOCKET=/tmp/c.sock",
		"CITADEL_LOG_LEVEL=debug",
		"CITADEL_GPU_BACKEND=none",
		"CITADEL_GPU_RELEASE_TIMEOUT=5s",
		"CITADEL_CONFIG=/ignored.yaml", // names a file, not a key
		"HOME=/root",
	}
	c, err := Load("testdata/good.yaml", env)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	if c.Listen != "" || c.ControlSocket != "/tmp/c.sock" || c.Log.Level != "debug" || c.GPU.Backend != "none" || c.GPU.ReleaseTimeout != 5*time.Second {
		t.Errorf("overrides not applied: listen=%q socket=%q level=%q backend=%q release=%s",
			c.Listen, c.ControlSocket, c.Log.Level, c.GPU.Backend, c.GPU.ReleaseTimeout)
	}

	_, err = Load("testdata/good.yaml", []string{"CITADEL_LOG_FORMAT=xml"})
	if err == nil || err.Error() != `log.format: "xml": use json or console` {
		t.Errorf("bad override: got %v", err)
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"), nil)
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("got %v, want a not-exist error", err)
	}
}

func TestByteSize(t *testing.T) {
	cases := []struct {
		in   string
		want ByteSize
		text string
	}{
		{"80GiB", 80 * GiB, "80.0 GiB"},
		{"1.5 GiB", 3 * GiB / 2, "1.5 GiB"},
		{"512MiB", 512 * MiB, "512.0 MiB"},
		{"1024", KiB, "1024 B"},
		{"1TiB", TiB, "1024.0 GiB"},
	}
	for _, tc := range cases {
		got, err := ParseByteSize(tc.in)
		if err != nil || got != tc.want || got.String() != tc.text {
			t.Errorf("ParseByteSize(%q) = %d (%s), %v; want %d (%s)", tc.in, got, got, err, tc.want, tc.text)
		}
	}
	for _, bad := range []string{"", "GiB", "-1GiB", "1GB", "lots"} {
		if _, err := ParseByteSize(bad); err == nil {
			t.Errorf("ParseByteSize(%q) succeeded", bad)
		}
	}
}

func TestDiff(t *testing.T) {
	base := `
gpu: {backend: none}
models:
  a: {model: /m/a, port: 11400}
  b: {model: /m/b, port: 11401}
  c: {model: /m/c, port: 11402, env: {X: "1"}}
  d: {model: /m/d, port: 11403}
  e: {model: /m/e, port: 11404}
  g: {model: /m/g, port: 11406, activation: on_demand, sleep_level: 1}
  h: {model: /m/h, port: 11407, activation: on_demand, sleep_level: 0}
`
	next := `
gpu: {backend: none}
models:
  a: {model: /m/a, port: 11400}
  b: {model: /m/b, port: 11401, probe: {period: 3s}, priority: 5}
  c: {model: /m/c, port: 11402, env: {X: "2"}}
  d: {model: /m/d, port: 11403, enabled: false}
  f: {model: /m/f, port: 11405}
  g: {model: /m/g, port: 11406, activation: on_demand, sleep_level: 2, wake_timeout: 1m}
  h: {model: /m/h, port: 11407, activation: on_demand, sleep_level: 1}
`
	old, err := Parse([]byte(base), nil)
	if err != nil {
		t.Fatal(err)
	}
	nw, err := Parse([]byte(next), nil)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range Diff(old, nw) {
		got = append(got, c.Name+" "+c.Kind.String()+" "+strings.Join(c.Fields, ","))
	}
	want := []string{
		"a unchanged ",
		"b update probe,priority",
		"c respawn env",
		"d respawn enabled",
		"e removed ",
		"f added ",
		// sleep_level and wake_timeout are read when they are used: a
		// change from 0 applies from the next start (docs/configuration.md).
		"g update sleep_level,wake_timeout",
		"h update sleep_level",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Diff:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	for _, c := range Diff(nw, nw) {
		if c.Kind != Unchanged {
			t.Errorf("Diff of a config with itself: %s is %s", c.Name, c.Kind)
		}
	}
}

// TestDeployedConfigsAreValid keeps the shipped examples loadable.
func TestDeployedConfigsAreValid(t *testing.T) {
	for _, f := range []string{"../deploy/citadel.yaml", "../deploy/demo.yaml"} {
		c, err := Load(f, nil)
		if err != nil {
			t.Errorf("%s: %v", f, err)
			continue
		}
		if len(c.Models) != 7 {
			t.Errorf("%s: %d models, want the seven of the reference host", f, len(c.Models))
		}
	}
}

func TestRestartOnly(t *testing.T) {
	a, err := Parse([]byte("gpu: {backend: none}\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := Parse([]byte("listen: 127.0.0.1:9500\ngpu: {backend: none, headroom: 2GiB}\n"), nil)
	if got := RestartOnly(a, b); strings.Join(got, ",") != "listen,gpu" {
		t.Errorf("RestartOnly = %v", got)
	}
	c, err := Parse([]byte("gpu: {backend: none}\ncontrol_socket_read_group: adm\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := RestartOnly(a, c); strings.Join(got, ",") != "control_socket_read_group" {
		t.Errorf("RestartOnly on a new read group = %v", got)
	}
	if got := RestartOnly(a, a); len(got) != 0 {
		t.Errorf("same config: %v", got)
	}
}

// TestSpawnDigestOfEarlierBuilds: a configuration hashes as the builds
// before derived settings left the digest did (their numbers, computed by
// that build from testdata/digest/earlier-build.yaml), so the models they
// started are adopted after an upgrade or a crash, not restarted: the
// derived VLLM_PORT block, GPU naming and cache directory reach a model at
// its next start (docs/vllm.md). `make upgrade-compat` shows the same with
// the earlier daemon itself.
func TestSpawnDigestOfEarlierBuilds(t *testing.T) {
	c, err := Load("testdata/digest/earlier-build.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]string{
		"mixtral": "0e2f7a6adf4487af2221517579997865",
		"phi3":    "8c03ccf3cb9feedc0cef40502eaf27a9",
		"pinned":  "a7c14e74c923b134f0ab1f5eef0cdfea",
	} {
		m, _ := c.Model(name)
		if got := m.SpawnDigest(); got != want {
			t.Errorf("%s: digest %s, the earlier build's %s: its running model would be restarted at the upgrade", name, got, want)
		}
	}
	// Whatever the host's ephemeral range makes of the derived block.
	localPortRange = func() PortRange { return PortRange{1024, 65535} }
	defer func() { localPortRange = func() PortRange { return linuxDefaultEphemeral } }()
	c2, _ := Load("testdata/digest/earlier-build.yaml", nil)
	for i, m := range c2.Models {
		if m.SpawnDigest() != c.Models[i].SpawnDigest() {
			t.Errorf("%s: the digest depends on the host's ephemeral range", m.Name)
		}
	}
}

// TestTokenKeysNotEchoed: a token pasted where a key goes (a mis-indented
// env: block, a line of an env file copied into the YAML) is shown by its
// line, never printed: hf_… and sk-… are made of a key's characters, so
// their shape decides.
func TestTokenKeysNotEchoed(t *testing.T) {
	const hf, sk = "hf_NotShownAbCdEfGhIjKlMn0123456789", "sk-proj-NotShown0123456789abcdefAB"
	cases := map[string]struct{ yaml, want string }{
		"mis-indented env block": {"gpu: {backend: none}\nmodels:\n  a:\n    model: /m/a\n    port: 11400\n    env:\n    " + hf + ": x\n",
			"models.a.<key on line 7>: unknown key (line 7)"},
		"at the top": {"gpu: {backend: none}\n" + sk + ": 1\n",
			"<key on line 2>: unknown key (line 2)"},
		"an ordinary misspelling is still named": {"gpu: {backend: none}\nmodels:\n  a: {model: /m/a, port: 11400, tensor_paralel: 2}\n",
			`models.a.tensor_paralel: unknown key (line 3; did you mean "tensor_parallel"?)`},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := Parse([]byte(tc.yaml), nil)
			if err == nil || err.Error() != tc.want {
				t.Errorf("got %v\nwant %s", err, tc.want)
			}
			if err != nil && strings.Contains(err.Error(), "NotShown") {
				t.Error("the error prints the token")
			}
		})
	}
}
