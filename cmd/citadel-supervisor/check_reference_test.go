//go:build !e2e

package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"citadel-supervisor/supervisor/supervisortest"
)

// referenceWeights are the published sizes of the reference models'
// weights (bf16 safetensors), which --check divides over their GPUs.
var referenceWeights = map[string]int64{
	"mixtral-8x7b-instruct":  93_405_585_408,
	"nous-hermes-2-mixtral":  93_405_585_408,
	"openchat-3.5":           14_483_464_192,
	"phi-3-mini-128k":        7_642_159_104,
	"yi-34b-chat":            68_777_834_496,
	"deepcoder-14b-instruct": 29_540_067_328,
	"mimo-vl-7b-rl":          16_594_130_944,
}

// referenceSite is deploy/citadel.yaml on this machine: the reference
// models' directories (their config.json, sparse weights of their
// published sizes), two sim GPUs of 80 GiB for NVML, the interpreter a
// virtualenv playing vLLM 0.33.0, paths and ports of this test. edit
// rewrites the YAML further.
func referenceSite(t *testing.T, edit func(string) string) (path string, environ []string) {
	t.Helper()
	dir := t.TempDir()
	models := filepath.Join(dir, "models")
	for name, size := range referenceWeights {
		md := filepath.Join(models, name)
		if err := os.MkdirAll(md, 0o755); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(filepath.Join("..", "..", "vllm", "testdata", "models", name, "config.json"))
		if err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(md, "config.json"), b, 0o644)
		f, err := os.Create(filepath.Join(md, "model.safetensors"))
		if err != nil {
			t.Fatal(err)
		}
		f.Truncate(size) // sparse: takes no disk
		f.Close()
	}
	secrets := filepath.Join(dir, "secrets.env")
	os.WriteFile(secrets, []byte("HF_TOKEN=x\n"), 0o600)
	src, err := os.ReadFile("../../deploy/citadel.yaml")
	if err != nil {
		t.Fatal(err)
	}
	y := string(src)
	for from, to := range map[string]string{
		"/opt/citadel/models/":             models + "/",
		"/opt/citadel/vllm-env/bin/python": supervisortest.FakeVenv(t, "0.33.0"),
		"/run/citadel/supervisor.sock":     filepath.Join(dir, "s.sock"),
		"/etc/citadel/secrets.env":         secrets,
		"listen: 127.0.0.1:9400":           fmt.Sprintf("listen: 127.0.0.1:%d", supervisortest.FreePort(t)),
		"listen: 0.0.0.0:8000":             fmt.Sprintf("listen: 127.0.0.1:%d", supervisortest.FreePort(t)),
		"control_socket_group: citadel":    "",
		"  backend: nvml":                  "  backend: sim\n  sim: {devices: [{uuid: GPU-00000000-0000-0000-0000-000000000000, name: H100, memory: 80GiB}, {uuid: GPU-11111111-1111-1111-1111-111111111111, name: H100, memory: 80GiB}]}",
		"/mnt/citadel-models/cache":        filepath.Join(dir, "cache"),
		"log: {level: info, format: json}": "log: {level: info, format: json}\ncache_dir: " + filepath.Join(dir, "cache"),
		"env:\n    HF_HOME":                "env:\n    " + supervisortest.SelfEnv + ": \"1\"\n    HF_HOME",
	} {
		y = strings.ReplaceAll(y, from, to)
	}
	if edit != nil {
		y = edit(y)
	}
	path = filepath.Join(dir, "supervisor.yaml")
	if err := os.WriteFile(path, []byte(y), 0o644); err != nil {
		t.Fatal(err)
	}
	return path, os.Environ()
}

// TestCheckReferenceConfig: --check passes on the shipped reference
// configuration with the reference models' config.json and weights, and
// learns each model's vLLM from its interpreter.
func TestCheckReferenceConfig(t *testing.T) {
	path, environ := referenceSite(t, nil)
	var stdout, stderr bytes.Buffer
	code := runCheck(path, environ, false, &stdout, &stderr)
	if code != checkValid || strings.Contains(stderr.String(), "error:") || strings.Contains(stderr.String(), "max_model_len") {
		t.Fatalf("exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout.String(), stderr.String())
	}
	if !strings.Contains(stdout.String(), "  phi3         0.33.0") {
		t.Errorf("no version learned for phi3:\n%s", stdout.String())
	}
}

// TestCheckPhi3At128kAndHalf is the shipped configuration's old phi3:
// max_model_len 128000 at utilization 0.5 cannot hold one sequence;
// --check says so, naming the key, the need and what would fit.
func TestCheckPhi3At128kAndHalf(t *testing.T) {
	path, environ := referenceSite(t, func(y string) string {
		return strings.Replace(y, "gpu_memory_utilization: 0.75\n    max_model_len: 128000", "gpu_memory_utilization: 0.5\n    max_model_len: 128000", 1)
	})
	var stdout, stderr bytes.Buffer
	code := runCheck(path, environ, false, &stdout, &stderr)
	want := "error: models.phi3.max_model_len: 128000 tokens need 46.9 GiB of KV cache on each GPU (384.0 KiB a token); 0.5 of 80.0 GiB leaves 29.9 GiB after 7.1 GiB of weights and 3.0 GiB of overhead: at most 81599 tokens fit, or gpu_memory_utilization 0.72"
	if code != checkHostErr || !strings.Contains(stderr.String(), want) {
		t.Fatalf("exit %d, want %d with\n%s\nstderr:\n%s", code, checkHostErr, want, stderr.String())
	}
}
