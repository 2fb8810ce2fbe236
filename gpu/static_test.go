package gpu

import (
	"slices"
	"testing"

	"citadel-supervisor/config"
)

func TestStaticPlace(t *testing.T) {
	sim := &config.Config{GPU: config.GPU{Backend: "sim", Sim: config.Sim{Devices: []config.SimDevice{
		{UUID: "GPU-a", Memory: config.GiB}, {UUID: "GPU-b", Memory: config.GiB},
	}}}}
	none := &config.Config{GPU: config.GPU{Backend: "none"}}
	cases := []struct {
		name    string
		cfg     *config.Config
		model   config.Model
		want    []string
		wantErr string
	}{
		{"sim unpinned takes the first tp", sim, config.Model{TensorParallel: 2}, []string{"GPU-a", "GPU-b"}, ""},
		{"sim pin by index maps to uuid", sim, config.Model{TensorParallel: 1, GPUs: []config.GPURef{"1"}}, []string{"GPU-b"}, ""},
		{"sim pin by uuid", sim, config.Model{TensorParallel: 1, GPUs: []config.GPURef{"GPU-a"}}, []string{"GPU-a"}, ""},
		{"sim tp beyond the host", sim, config.Model{TensorParallel: 3}, nil, "needs 3 GPUs; the host has 2"},
		{"none unpinned sets nothing", none, config.Model{TensorParallel: 2}, []string{}, ""},
		{"none pinned passes pins", none, config.Model{TensorParallel: 1, GPUs: []config.GPURef{"1"}}, []string{"1"}, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := NewStatic(tc.cfg).Place(tc.model)
			if tc.wantErr != "" {
				if err == nil || err.Error() != tc.wantErr {
					t.Errorf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || !slices.Equal(got, tc.want) {
				t.Errorf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}
