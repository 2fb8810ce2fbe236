package gpu

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"citadel-supervisor/config"
)

// twoH100 is the reference host: two 80 GiB GPUs, with free memory set per
// GPU (nil: all free).
func twoH100(free ...config.ByteSize) []Slot {
	out := make([]Slot, 2)
	for i := range out {
		f := 80 * config.GiB
		if i < len(free) {
			f = free[i]
		}
		out[i] = Slot{Device: Device{Index: i, UUID: fmt.Sprintf("GPU-%d", i), MemoryTotal: uint64(80 * config.GiB), MemoryFree: uint64(f), Up: true}}
	}
	return out
}

// seed is the reference host's table (seed-models.md) with the priorities
// of deploy/citadel.yaml.
var seed = []Request{
	{Name: "mixtral", Priority: 100, TP: 2, Util: 0.90},
	{Name: "coder", Priority: 40, TP: 1, Util: 0.80},
	{Name: "phi3", Priority: 30, TP: 1, Util: 0.60},
	{Name: "openchat", Priority: 20, TP: 1, Util: 0.70},
	{Name: "vision", Priority: 15, TP: 1, Util: 0.70},
	{Name: "hermes", Priority: 10, TP: 2, Util: 0.90},
	{Name: "yi34b", Priority: 5, TP: 2, Util: 0.85},
}

func TestPlan(t *testing.T) {
	const headroom = config.GiB
	cases := []struct {
		name  string
		reqs  []Request
		slots []Slot
		want  []string // "name: gpus" or "name: reason", in decision order
	}{
		{
			name:  "tp=2 spans both GPUs",
			reqs:  []Request{{Name: "mixtral", TP: 2, Util: 0.9}},
			slots: twoH100(),
			want:  []string{"mixtral: [0 1]"},
		},
		{
			name:  "seed table on two empty 80 GiB GPUs: priorities decide who is resident",
			reqs:  seed,
			slots: twoH100(),
			want: []string{
				"mixtral: [0 1]",
				"coder: needs 65.0 GiB on 1 GPU; free 8.0 GiB (GPU0), 8.0 GiB (GPU1)",
				"phi3: needs 49.0 GiB on 1 GPU; free 8.0 GiB (GPU0), 8.0 GiB (GPU1)",
				"openchat: needs 57.0 GiB on 1 GPU; free 8.0 GiB (GPU0), 8.0 GiB (GPU1)",
				"vision: needs 57.0 GiB on 1 GPU; free 8.0 GiB (GPU0), 8.0 GiB (GPU1)",
				"hermes: needs 73.0 GiB on 2 GPUs; free 8.0 GiB (GPU0), 8.0 GiB (GPU1)",
				"yi34b: needs 69.0 GiB on 2 GPUs; free 8.0 GiB (GPU0), 8.0 GiB (GPU1)",
			},
		},
		{
			name:  "without mixtral, two single-GPU models fill the host, tightest fit first",
			reqs:  seed[1:],
			slots: twoH100(),
			want: []string{
				"coder: [0]",
				"phi3: [1]",
				"openchat: needs 57.0 GiB on 1 GPU; free 16.0 GiB (GPU0), 32.0 GiB (GPU1)",
				"vision: needs 57.0 GiB on 1 GPU; free 16.0 GiB (GPU0), 32.0 GiB (GPU1)",
				"hermes: needs 73.0 GiB on 2 GPUs; free 16.0 GiB (GPU0), 32.0 GiB (GPU1)",
				"yi34b: needs 69.0 GiB on 2 GPUs; free 16.0 GiB (GPU0), 32.0 GiB (GPU1)",
			},
		},
		{
			name: "the message docs/placement.md shows",
			reqs: []Request{{Name: "mixtral", TP: 2, Util: 0.9}},
			slots: func() []Slot {
				s := twoH100(61*config.GiB+102*config.MiB, 58*config.GiB+307*config.MiB)
				return s
			}(),
			want: []string{"mixtral: needs 73.0 GiB on 2 GPUs; free 61.1 GiB (GPU0), 58.3 GiB (GPU1)"},
		},
		{
			name:  "best fit: a small model takes the fuller GPU, keeping the big hole",
			reqs:  []Request{{Name: "phi3", TP: 1, Util: 0.3}},
			slots: twoH100(80*config.GiB, 30*config.GiB),
			want:  []string{"phi3: [1]"},
		},
		{
			name:  "pins are respected even when another GPU has room",
			reqs:  []Request{{Name: "phi3", TP: 1, Util: 0.6, Pins: []string{"1"}}},
			slots: twoH100(80*config.GiB, 20*config.GiB),
			want:  []string{"phi3: needs 49.0 GiB on 1 GPU; free 20.0 GiB (GPU1)"},
		},
		{
			name:  "pin by UUID",
			reqs:  []Request{{Name: "phi3", TP: 1, Util: 0.6, Pins: []string{"GPU-1"}}},
			slots: twoH100(),
			want:  []string{"phi3: [1]"},
		},
		{
			name:  "headroom counts: 79 GiB free is not enough for 0.98 of 80 GiB",
			reqs:  []Request{{Name: "m", TP: 1, Util: 0.98}}, // 78.4 GiB fits in 79 without headroom
			slots: twoH100(79*config.GiB, 78*config.GiB),
			want:  []string{"m: needs 79.4 GiB on 1 GPU; free 79.0 GiB (GPU0), 78.0 GiB (GPU1)"},
		},
		{
			name:  "claims in flight: two models never take the same free memory",
			reqs:  []Request{{Name: "a", TP: 1, Util: 0.6}, {Name: "b", TP: 1, Util: 0.6}, {Name: "c", TP: 1, Util: 0.6}},
			slots: twoH100(),
			want: []string{
				"a: [0]",
				"b: [1]",
				"c: needs 49.0 GiB on 1 GPU; free 32.0 GiB (GPU0), 32.0 GiB (GPU1)",
			},
		},
		{
			name: "an earlier claim still unallocated reduces what is free",
			reqs: []Request{{Name: "b", TP: 1, Util: 0.6, Pins: []string{"0"}}},
			slots: func() []Slot {
				s := twoH100()
				s[0].Claimed = 49 * uint64(config.GiB)
				return s
			}(),
			want: []string{"b: needs 49.0 GiB on 1 GPU; free 31.0 GiB (GPU0)"},
		},
		{
			name:  "starts are serialised per GPU",
			reqs:  []Request{{Name: "a", TP: 1, Util: 0.2, Pins: []string{"0"}}, {Name: "b", TP: 1, Util: 0.2, Pins: []string{"0"}}},
			slots: twoH100(),
			want:  []string{"a: [0]", "b: waiting for GPU0: a is starting"},
		},
		{
			name: "a starting model on one GPU does not block the other",
			reqs: []Request{{Name: "b", TP: 1, Util: 0.2}},
			slots: func() []Slot {
				s := twoH100()
				s[0].Busy = "a is starting"
				return s
			}(),
			want: []string{"b: [1]"},
		},
		{
			name: "a GPU whose stopped model has not released its memory is busy",
			reqs: []Request{{Name: "b", TP: 1, Util: 0.2, Pins: []string{"1"}}},
			slots: func() []Slot {
				s := twoH100()
				s[1].Busy = "old's memory is being released"
				return s
			}(),
			want: []string{"b: waiting for GPU1: old's memory is being released"},
		},
		{
			name: "a GPU that is down gets nothing",
			reqs: []Request{{Name: "mixtral", TP: 2, Util: 0.9}, {Name: "phi3", TP: 1, Util: 0.6}},
			slots: func() []Slot {
				s := twoH100()
				s[0].Up = false
				return s
			}(),
			want: []string{"mixtral: needs 2 GPUs; the host has 1 usable (GPU0 down)", "phi3: [1]"},
		},
		{
			name: "pinned to a GPU that is down",
			reqs: []Request{{Name: "phi3", TP: 1, Util: 0.6, Pins: []string{"0"}}},
			slots: func() []Slot {
				s := twoH100()
				s[0].Up = false
				return s
			}(),
			want: []string{"phi3: needs 1 GPUs; its pins allow 0 usable (GPU0 down)"},
		},
		{
			name: "a note travels with the reason",
			reqs: []Request{{Name: "m", TP: 1, Util: 0.9, Pins: []string{"0"}}},
			slots: func() []Slot {
				s := twoH100(10 * config.GiB)
				s[0].Note = "old's memory not released within 1m0s"
				return s
			}(),
			want: []string{"m: needs 73.0 GiB on 1 GPU; free 10.0 GiB (GPU0); GPU0: old's memory not released within 1m0s"},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for _, d := range Plan(tc.reqs, tc.slots, headroom) {
				if d.GPUs != nil {
					got = append(got, fmt.Sprintf("%s: %v", d.Name, d.GPUs))
				} else {
					got = append(got, d.Name+": "+d.Reason)
				}
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("got:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}
