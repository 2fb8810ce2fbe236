package config

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"citadel-supervisor/vllm"
)

// vllmHost is fakeHost with the vLLM questions answered: versions by
// model, model directories on disk.
type vllmHost struct {
	*fakeHost
	versions map[string]string
	total    uint64
	eph      PortRange
	envKeys  map[string][]string
}

var _ VLLMHost = (*vllmHost)(nil)

func (h *vllmHost) ReadFile(p string) ([]byte, error)       { return os.ReadFile(p) }
func (h *vllmHost) ReadDir(p string) ([]fs.DirEntry, error) { return os.ReadDir(p) }
func (h *vllmHost) EnvKeys(p string) ([]string, error)      { return h.envKeys[p], nil }
func (h *vllmHost) GPUTotal() (uint64, bool)                { return h.total, h.total > 0 }
func (h *vllmHost) EphemeralPorts() PortRange               { return h.eph }
func (h *vllmHost) Version(m Model) (vllm.Version, error) {
	if v, ok := h.versions[m.Name]; ok {
		return vllm.Parse(v)
	}
	return vllm.Version{}, errors.New("cannot tell which Python interpreter the command runs")
}

// refModel makes a model directory holding a reference model's
// config.json and a sparse weights file of size bytes.
func refModel(t *testing.T, ref string, size int64) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), ref)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join("..", "vllm", "testdata", "models", ref, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if size > 0 {
		f, err := os.Create(filepath.Join(dir, "model-00001-of-00001.safetensors"))
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(size); err != nil { // sparse: no disk taken
			t.Fatal(err)
		}
		f.Close()
	}
	return dir
}

func TestCheckVLLM(t *testing.T) {
	phi3 := refModel(t, "phi-3-mini-128k", 7_642_159_104)
	noWeights := refModel(t, "phi-3-mini-128k", 0)
	empty := t.TempDir()
	c, err := Parse([]byte(`gateway: {listen: 0.0.0.0:8000}
gpu: {backend: nvml, visible_devices: uuid}
defaults:
  command: [python3]
models:
  phi3: {model: `+phi3+`, port: 11403, gpu_memory_utilization: 0.5, max_model_len: 128000}
  phi3ok: {model: `+phi3+`, port: 11404, gpu_memory_utilization: 0.75, max_model_len: 128000}
  phi3est: {model: `+noWeights+`, port: 11405, gpu_memory_utilization: 0.5, max_model_len: 128000}
  long: {model: `+phi3+`, port: 11406, gpu_memory_utilization: 0.9, max_model_len: 200000}
  bare: {model: `+empty+`, port: 11407}
  old: {model: `+phi3+`, port: 11408, max_model_len: 4096, activation: on_demand, sleep_level: 2, env: {VLLM_API_KEY: k}}
  keyed: {model: `+phi3+`, port: 11409, max_model_len: 4096, env_files: [/etc/keyed.env], vllm_port: 40000}
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	paths := map[string]bool{}
	for _, m := range c.Models {
		paths[m.Path] = true
	}
	h := &vllmHost{
		fakeHost: &fakeHost{paths: paths, programs: map[string]error{}, envFiles: map[string]error{}, ports: map[int]error{}, gpus: []string{"GPU-a"}, haveGPUs: true},
		versions: map[string]string{"phi3": "0.33.0", "phi3ok": "0.24.0", "phi3est": "0.33.0", "long": "0.33.0", "bare": "0.33.0", "old": "0.10.1", "keyed": "0.8.5"},
		total:    80 << 30,
		eph:      PortRange{32768, 60999},
		envKeys:  map[string][]string{"/etc/keyed.env": {"HF_TOKEN", "VLLM_API_KEY"}},
	}
	var got []string
	for _, f := range c.Check(h) {
		got = append(got, f.String())
	}
	text := strings.Join(got, "\n")
	for _, want := range []string{
		"error: models.phi3.max_model_len: 128000 tokens need 46.9 GiB of KV cache on each GPU (384.0 KiB a token); 0.5 of 80.0 GiB leaves 29.9 GiB after 7.1 GiB of weights and 3.0 GiB of overhead: at most 81",
		"or gpu_memory_utilization 0.72",
		"error: models.phi3est.max_model_len: 128000 tokens need 46.9 GiB",
		"(no weight files: 7.1 GiB estimated from config.json)",
		"error: models.long.max_model_len: 200000 is more than the model's own 131072",
		"note: models.bare.model: " + empty + " has no config.json (weights not there yet?)",
		"warning: models.old.sleep_level: 2: its vLLM is 0.10.1: sleep_level 2 needs vLLM 0.10.2",
		"error: gpu.visible_devices: uuid: models.old runs vLLM 0.10.1, which dies at start on a UUID",
		"error: gpu.visible_devices: uuid: models.keyed runs vLLM 0.8.5",
		"warning: gateway.api_keys_file: models.keyed wants an API key of its clients",
		"warning: gateway.api_keys_file: models.old wants an API key of its clients",
		"warning: models.keyed.vllm_port: block 40000-40015 lies in the host's ephemeral port range 32768-60999",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("no %q in:\n%s", want, text)
		}
	}
	for _, never := range []string{"models.phi3ok.", "gpu.visible_devices: uuid: models.phi3 ", "api_keys_file: models.phi3 "} {
		if strings.Contains(text, never) {
			t.Errorf("%q should not be there:\n%s", never, text)
		}
	}
}

func TestCheckSharedCacheRoot(t *testing.T) {
	c, err := Parse([]byte(`gpu: {backend: none}
defaults:
  env: {VLLM_CACHE_ROOT: /mnt/cache/vllm}
models:
  a: {model: /m, port: 11400}
  b: {model: /m, port: 11401}
  c: {model: /m, port: 11402, env: {VLLM_CACHE_ROOT: /mnt/cache/c}}
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, f := range c.Check(&fakeHost{paths: map[string]bool{"/m": true}}) {
		got = append(got, f.String())
	}
	want := "warning: defaults.env.VLLM_CACHE_ROOT: /mnt/cache/vllm is shared by models a, b: vLLM's compile caches race between instances (vllm#24601); leave it unset (each model gets cache_dir/vllm/<model>) or give each its own"
	if strings.Join(got, "\n") != want {
		t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), want)
	}
}
