package config

import (
	"slices"
	"strings"
	"testing"
)

func TestArgvAndEnv(t *testing.T) {
	m := Model{
		Name: "mixtral", Command: []string{"/opt/py", "-m", "vllm"}, Host: "127.0.0.1",
		Path: "/models/mixtral", ServedName: "mixtral", Port: 11400, VLLMPort: 50368,
		TensorParallel: 2, GPUMemoryUtilization: 0.9, MaxModelLen: 32768,
		Args: []string{"--trust-remote-code"}, Env: map[string]string{"HF_HOME": "/cache", "HF_TOKEN": "from-env-wins"},
	}
	wantArgv := []string{"/opt/py", "-m", "vllm", "--model", "/models/mixtral", "--host", "127.0.0.1", "--port", "11400",
		"--served-model-name", "mixtral", "--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.9",
		"--max-model-len", "32768", "--trust-remote-code"}
	if got := m.Argv(); !slices.Equal(got, wantArgv) {
		t.Errorf("argv:\n%q\nwant\n%q", got, wantArgv)
	}
	m.MaxModelLen = 0
	if got := m.Argv(); slices.Contains(got, "--max-model-len") {
		t.Error("max_model_len 0 must leave the flag to vLLM")
	}

	base := []string{"PATH=/usr/bin", "NOTIFY_SOCKET=/run/n", "WATCHDOG_USEC=1", "WATCHDOG_PID=1", "LISTEN_FDS=1",
		"LISTEN_PID=1", "JOURNAL_STREAM=8:9", "CITADEL_CONFIG=/etc/x", "CUDA_VISIBLE_DEVICES=0,1", "HOME=/home/c"}
	env := m.ChildEnv(base, map[string]string{"HF_TOKEN": "secret"}, []string{"GPU-a", "GPU-b"}, map[string]string{"CITADEL_SUPERVISOR_INSTANCE": "id/mixtral/tok"})
	want := []string{
		"CITADEL_SUPERVISOR_INSTANCE=id/mixtral/tok",
		"CUDA_DEVICE_ORDER=PCI_BUS_ID",
		"CUDA_VISIBLE_DEVICES=GPU-a,GPU-b",
		"HF_HOME=/cache",
		"HF_TOKEN=from-env-wins",
		"HOME=/home/c",
		"PATH=/usr/bin",
		"VLLM_PORT=50368",
	}
	if !slices.Equal(env, want) {
		t.Errorf("env:\n%q\nwant\n%q", env, want)
	}
	// No GPUs placed (backend none, no pins): the inherited value stands.
	env = m.ChildEnv(base, nil, nil, nil)
	if !slices.Contains(env, "CUDA_VISIBLE_DEVICES=0,1") {
		t.Errorf("inherited CUDA_VISIBLE_DEVICES dropped: %q", env)
	}
}

// TestOwnedAreRefused: every flag and variable Argv and ChildEnv set is one
// Validate refuses in a model's args or env, with the key to set instead.
func TestOwnedAreRefused(t *testing.T) {
	good, err := Load("testdata/good.yaml", nil)
	if err != nil {
		t.Fatal(err)
	}
	m, _ := good.Model("mixtral")
	m.MaxModelLen = 4096 // every owned flag is built
	m.Activation, m.SleepLevel = ActivationOnDemand, 1
	argv := m.Argv()
	for _, f := range ownedFlags {
		t.Run(f.flag, func(t *testing.T) {
			if !slices.Contains(argv, f.flag) {
				t.Errorf("Argv lacks %s: %q", f.flag, argv)
			}
			c := *good
			c.Models = slices.Clone(good.Models)
			for i := range c.Models {
				if c.Models[i].Name == "mixtral" {
					c.Models[i].Args = []string{f.flag + "=x"}
				}
			}
			want := "models.mixtral.args[0]: " + f.flag + " is set by the supervisor from the model's key " + f.key
			if err := c.Validate(); err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("Validate: %v\nwant %q", err, want)
			}
		})
	}
	env := m.ChildEnv(nil, nil, []string{"GPU-a"}, nil)
	for _, v := range ownedVars {
		t.Run(v.name, func(t *testing.T) {
			if !slices.ContainsFunc(env, func(kv string) bool { return strings.HasPrefix(kv, v.name+"=") }) {
				t.Errorf("ChildEnv lacks %s: %q", v.name, env)
			}
			c := *good
			c.Models = slices.Clone(good.Models)
			for i := range c.Models {
				if c.Models[i].Name == "mixtral" {
					c.Models[i].Env = map[string]string{v.name: "x"}
				}
			}
			want := "models.mixtral.env." + v.name + ": set by the supervisor: " + v.hint
			if err := c.Validate(); err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("Validate: %v\nwant %q", err, want)
			}
		})
	}
}
