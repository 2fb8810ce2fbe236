package config

import (
	"errors"
	"io/fs"
	"strings"
	"testing"
)

// fakeHost answers Check from tables.
type fakeHost struct {
	paths    map[string]bool
	programs map[string]error
	envFiles map[string]error
	ports    map[int]error
	gpus     []string
	haveGPUs bool
}

var _ Host = (*fakeHost)(nil)

func (h *fakeHost) Stat(path string) (fs.FileInfo, error) {
	if h.paths[path] {
		return nil, nil
	}
	return nil, &fs.PathError{Op: "stat", Path: path, Err: fs.ErrNotExist}
}
func (h *fakeHost) LookPath(file string) (string, error) { return file, h.programs[file] }
func (h *fakeHost) EnvFile(path string) error            { return h.envFiles[path] }
func (h *fakeHost) Port(_ string, port int) error        { return h.ports[port] }
func (h *fakeHost) GPUs() ([]string, bool)               { return h.gpus, h.haveGPUs }

func TestCheckHost(t *testing.T) {
	c, err := Parse([]byte(`listen: 127.0.0.1:9400
defaults:
  command: [/opt/venv/bin/python]
  env_files: [/etc/citadel/secrets.env]
models:
  a: {model: /m/a, port: 11400, tensor_parallel: 4}
  b: {model: /m/b, port: 11401, gpus: [0, 7]}
  c: {model: /m/c, port: 11402, gpus: [GPU-b, GPU-x], tensor_parallel: 1, command: [vllm]}
  d: {model: /m/gone, port: 11403, enabled: false, command: [/nope]}
`), nil)
	if err != nil {
		t.Fatal(err)
	}
	h := &fakeHost{
		paths:    map[string]bool{"/m/a": true, "/m/b": true},
		programs: map[string]error{"/opt/venv/bin/python": &fs.PathError{Op: "stat", Path: "/opt/venv/bin/python", Err: fs.ErrNotExist}, "vllm": errors.New("exec: not found")},
		envFiles: map[string]error{"/etc/citadel/secrets.env": errors.New("env_files: /etc/citadel/secrets.env line 3: expected KEY=VALUE")},
		ports:    map[int]error{9400: errors.New("port 9400 in use by pid 7 (nginx)"), 11401: errors.New("port 11401 in use by pid 8 (python3)")},
		gpus:     []string{"GPU-a", "GPU-b"},
		haveGPUs: true,
	}
	var got []string
	for _, f := range c.Check(h) {
		got = append(got, f.String())
	}
	want := `error: defaults.command[0]: /opt/venv/bin/python: no such file; a model started with it fails (failed: spawn)
warning: defaults.env_files[0]: /etc/citadel/secrets.env line 3: expected KEY=VALUE; a model using it waits as pending (env_files) until it can be read
error: listen: port 9400 in use by pid 7 (nginx): the daemon cannot serve HTTP and would exit
error: models.a.tensor_parallel: 4 GPUs needed, this host has 2 (gpu.backend nvml)
error: models.b.gpus[1]: GPU 7 does not exist: this host has 2
warning: models.b.port: port 11401 in use by pid 8 (python3); the model waits as pending (port) until it is free
error: models.c.command[0]: vllm: exec: not found; a model started with it fails (failed: spawn)
error: models.c.gpus[1]: GPU-x is not a GPU of this host
warning: models.c.model: /m/c: file does not exist; the model waits as pending (storage) until it exists`
	if g := strings.Join(got, "\n"); g != want {
		t.Errorf("got:\n%s\nwant:\n%s", g, want)
	}

	// Without GPU readings (backend none, no NVML) nothing is said about GPUs.
	h.haveGPUs = false
	for _, f := range c.Check(h) {
		if strings.Contains(f.Key, "gpus") || strings.Contains(f.Key, "tensor_parallel") {
			t.Errorf("without readings: %s", f)
		}
	}
}

func TestCheckEmpty(t *testing.T) {
	for name, src := range map[string]string{"empty": "", "comments only": "# nothing yet\n", "null": "~\n"} {
		c, err := Parse([]byte(src), nil)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		f := c.Check(&fakeHost{})
		if !c.Empty() || len(f) != 1 || f[0].String() != "warning: models: no models: the daemon would run none until a reload adds some" {
			t.Errorf("%s: empty=%v %v", name, c.Empty(), f)
		}
	}
	if c, _ := Parse([]byte("listen: \"\"\n"), nil); c.Empty() {
		t.Error("a file with a key is not empty")
	}
}
