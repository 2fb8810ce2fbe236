package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParse feeds the loader arbitrary bytes. It must never panic, and
// whatever it accepts must be valid and every problem it reports must name
// a key path (or say the YAML did not parse).
func FuzzParse(f *testing.F) {
	files, _ := filepath.Glob("testdata/*.yaml")
	bad, _ := filepath.Glob("testdata/bad/*.yaml")
	for _, p := range append(append(files, bad...), "../deploy/citadel.yaml", "../deploy/demo.yaml") {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("models: {a: {model: /m, port: 1, gpus: [0, GPU-x, -1]}}"))
	f.Add([]byte("defaults: {restart: {delay: 1e9}}\nmodels: {x: null}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := Parse(data, nil)
		if err != nil {
			for _, line := range strings.Split(err.Error(), "\n") {
				if !strings.Contains(line, ": ") {
					t.Fatalf("problem without a key path: %q", line)
				}
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("Parse accepted a config that Validate rejects: %v", err)
		}
		for _, m := range cfg.Models {
			if m.Name == "" || m.ServedName == "" || m.Port < 1 || m.TensorParallel < 1 {
				t.Fatalf("accepted model is incomplete: %+v", m)
			}
		}
	})
}
