package gpu

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"citadel-supervisor/config"
)

var now = time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)

// devs is two 80 GiB GPUs, GPU-0 and GPU-1, with used memory per GPU and
// the processes on them.
func devs(used ...config.ByteSize) []Device {
	out := make([]Device, 2)
	for i := range out {
		var u uint64
		if i < len(used) {
			u = uint64(used[i])
		}
		out[i] = Device{Index: i, UUID: fmt.Sprintf("GPU-%d", i), MemoryTotal: uint64(80 * config.GiB), MemoryUsed: u, MemoryFree: uint64(80*config.GiB) - u, Up: true, Processes: []Process{}}
	}
	return out
}

func withProc(d []Device, i, pid int, used config.ByteSize) []Device {
	d[i].Processes = append(d[i].Processes, Process{PID: pid, UsedMemory: uint64(used)})
	d[i].MemoryUsed += uint64(used)
	d[i].MemoryFree -= uint64(used)
	return d
}

func want(name string, prio int, util float64, tp int) Want {
	return Want{Request: Request{Name: name, Priority: prio, TP: tp, Util: util}}
}

func odWant(name string, prio int, util float64, tp int) Want {
	w := want(name, prio, util, tp)
	w.OnDemand = true
	return w
}

// outcome writes an Outcome as sorted "name: GPUs" or "name: reason" lines
// plus the claims' phases.
func outcome(o Outcome) string {
	var lines []string
	for n, g := range o.Grants {
		lines = append(lines, fmt.Sprintf("%s: %v", n, g))
	}
	for n, r := range o.Waits {
		lines = append(lines, n+": "+r)
	}
	slices.Sort(lines)
	var claims []string
	for _, c := range o.Claims {
		claims = append(claims, fmt.Sprintf("%s=%s%v", c.Name, c.Phase, c.UUIDs))
	}
	return strings.Join(lines, "\n") + "\nclaims: " + strings.Join(claims, " ")
}

func TestDecide(t *testing.T) {
	mixtral := Request{Name: "mixtral", Priority: 100, TP: 2, Util: 0.9}
	cases := []struct {
		name string
		in   Input
		want string
	}{{
		name: "priority first; lower ones take what is left",
		in: Input{Devices: devs(), Wants: []Want{
			want("phi3", 30, 0.6, 1), {Request: mixtral}, want("coder", 40, 0.8, 1),
		}},
		want: "coder: needs 65.0 GiB on 1 GPU; free 8.0 GiB (GPU0), 8.0 GiB (GPU1)\nmixtral: [GPU-0 GPU-1]\nphi3: needs 49.0 GiB on 1 GPU; free 8.0 GiB (GPU0), 8.0 GiB (GPU1)\nclaims: mixtral=starting[GPU-0 GPU-1]",
	}, {
		name: "starts on one GPU are serialised",
		in:   Input{Devices: devs()[:1], Wants: []Want{want("a", 0, 0.2, 1), want("b", 0, 0.2, 1)}},
		want: "a: [GPU-0]\nb: waiting for GPU0: a is starting\nclaims: a=starting[GPU-0]",
	}, {
		name: "a higher-priority model still checking holds lower ones back",
		in: Input{Devices: devs(), Wants: []Want{
			want("phi3", 30, 0.6, 1), {Request: mixtral, Checking: true},
		}},
		want: "phi3: waiting for higher-priority models to be placed first (mixtral)\nclaims: ",
	}, {
		name: "a lower-priority model still checking holds nothing back",
		in: Input{Devices: devs(), Wants: []Want{
			{Request: Request{Name: "phi3", Priority: 30, TP: 1, Util: 0.6}, Checking: true}, {Request: mixtral},
		}},
		want: "mixtral: [GPU-0 GPU-1]\nclaims: mixtral=starting[GPU-0 GPU-1]",
	}, {
		name: "a claim counts until its processes allocated it",
		in: Input{
			Devices: withProc(devs(), 0, 7, 10*config.GiB),
			Claims:  []Claim{{Name: "a", Req: Request{Name: "a", TP: 1, Util: 0.5}, UUIDs: []string{"GPU-0"}, Phase: Running, PIDs: []int{7}}},
			Wants:   []Want{want("b", 0, 0.6, 1)},
		},
		// GPU-0: 70 free − (40 − 10 allocated) claimed = 40 < 49: b goes to GPU-1.
		want: "b: [GPU-1]\nclaims: a=running[GPU-0] b=starting[GPU-1]",
	}, {
		name: "a release waits for the processes to leave the GPUs",
		in: Input{
			Devices:        withProc(devs(), 0, 7, 40*config.GiB),
			Claims:         []Claim{{Name: "old", Req: Request{Name: "old", TP: 1, Util: 0.5}, UUIDs: []string{"GPU-0"}, Phase: Releasing, PIDs: []int{7}, Since: now.Add(-time.Second)}},
			Wants:          []Want{want("old", 0, 0.5, 1)},
			ReleaseTimeout: time.Minute, Now: now,
		},
		want: "old: waiting for its previous run's GPU memory to be released (GPU0)\nclaims: old=releasing[GPU-0]",
	}, {
		name: "a completed release with keep is reserved, and reused at once",
		in: Input{
			Devices:        devs(),
			Claims:         []Claim{{Name: "old", Req: Request{Name: "old", TP: 1, Util: 0.5}, UUIDs: []string{"GPU-1"}, Phase: Releasing, PIDs: []int{7}, Keep: true}},
			Wants:          []Want{want("old", 0, 0.5, 1), want("other", 50, 0.9, 2)},
			ReleaseTimeout: time.Minute, Now: now,
		},
		want: "old: [GPU-1]\nother: needs 73.0 GiB on 2 GPUs; free 80.0 GiB (GPU0), 40.0 GiB (GPU1)\nclaims: old=starting[GPU-1]",
	}, {
		name: "a reservation is kept from a higher-priority newcomer",
		in: Input{
			Devices: devs(),
			Claims:  []Claim{{Name: "mixtral", Req: mixtral, UUIDs: []string{"GPU-0", "GPU-1"}, Phase: Reserved}},
			Wants:   []Want{want("coder", 40, 0.8, 1)},
		},
		want: "coder: needs 65.0 GiB on 1 GPU; free 8.0 GiB (GPU0), 8.0 GiB (GPU1)\nclaims: mixtral=reserved[GPU-0 GPU-1]",
	}, {
		name: "a reservation that no longer fits what the model asks is placed afresh",
		in: Input{
			Devices: devs(),
			Claims:  []Claim{{Name: "m", Req: Request{Name: "m", TP: 1, Util: 0.5}, UUIDs: []string{"GPU-1"}, Phase: Reserved}},
			Wants:   []Want{want("m", 0, 0.9, 2)},
		},
		want: "m: [GPU-0 GPU-1]\nclaims: m=starting[GPU-0 GPU-1]",
	}, {
		name: "a release that times out places anyway and leaves a note",
		in: Input{
			Devices:        withProc(devs(), 0, 7, 70*config.GiB),
			Claims:         []Claim{{Name: "old", Req: Request{Name: "old", TP: 1, Util: 0.5}, UUIDs: []string{"GPU-0"}, Phase: Releasing, PIDs: []int{7}, Since: now.Add(-time.Minute)}},
			Wants:          []Want{want("new", 0, 0.05, 1)},
			ReleaseTimeout: time.Minute, Now: now,
		},
		want: "new: [GPU-0]\nclaims: new=starting[GPU-0]",
	}, {
		name: "failed readings: every want waits, saying why",
		in:   Input{Devices: devs(), ReadErr: "nvml: GPU is lost", Wants: []Want{want("a", 0, 0.1, 1)}},
		want: "a: GPU readings failed: nvml: GPU is lost\nclaims: ",
	}, {
		name: "no readings yet",
		in:   Input{Wants: []Want{want("a", 0, 0.1, 1)}},
		want: "a: no GPU readings yet\nclaims: ",
	}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.in.Headroom = config.GiB
			if got := outcome(Decide(tc.in)); got != tc.want {
				t.Errorf("got\n%s\nwant\n%s", got, tc.want)
			}
		})
	}
}

// TestDecideEviction: on-demand models are put to sleep to make room, in
// order, only as many as needed, on the GPUs needed.
func TestDecideEviction(t *testing.T) {
	t1, t2 := now.Add(-time.Hour), now.Add(-time.Minute)
	running := func(name string, prio int, util float64, gpu int, pid int, last time.Time) Claim {
		return Claim{Name: name, Req: Request{Name: name, Priority: prio, TP: 1, Util: util}, UUIDs: []string{fmt.Sprintf("GPU-%d", gpu)},
			Phase: Running, PIDs: []int{pid}, OnDemand: true, LastUsed: last}
	}
	// GPU0 holds a (60%, pid 1), GPU1 holds b (60%, pid 2): 48 GiB used on each.
	full := func() []Device { return withProc(withProc(devs(), 0, 1, 48*config.GiB), 1, 2, 48*config.GiB) }
	cases := []struct {
		name   string
		claims []Claim
		wants  []Want
		want   string
		evict  string
	}{{
		name:   "the least recently used of equal priority goes",
		claims: []Claim{running("a", 0, 0.6, 0, 1, t2), running("b", 0, 0.6, 1, 2, t1)},
		wants:  []Want{odWant("c", 0, 0.6, 1)},
		want:   "c: waiting for b to sleep to make room\nclaims: a=running[GPU-0] b=running[GPU-1]",
		evict:  "b→c",
	}, {
		name:   "lower priority before recency",
		claims: []Claim{running("a", 0, 0.6, 0, 1, t2), running("b", 5, 0.6, 1, 2, t1)},
		wants:  []Want{odWant("c", 0, 0.6, 1)},
		want:   "c: waiting for a to sleep to make room\nclaims: a=running[GPU-0] b=running[GPU-1]",
		evict:  "a→c",
	}, {
		name: "protected (min_awake) and always models stay",
		claims: []Claim{
			func() Claim {
				c := running("a", 0, 0.6, 0, 1, t1)
				c.Protected = "woke 10s ago (min_awake 1m0s)"
				return c
			}(),
			func() Claim { c := running("b", 0, 0.6, 1, 2, t1); c.OnDemand = false; return c }(),
		},
		wants: []Want{odWant("c", 0, 0.6, 1)},
		want:  "c: needs 49.0 GiB on 1 GPU; free 32.0 GiB (GPU0), 32.0 GiB (GPU1)\nclaims: a=running[GPU-0] b=running[GPU-1]",
	}, {
		name:   "an always model preempts only lower priority",
		claims: []Claim{running("a", 10, 0.6, 0, 1, t1), running("b", 0, 0.6, 1, 2, t2)},
		wants:  []Want{want("always", 5, 0.6, 1)},
		want:   "always: waiting for b to sleep to make room\nclaims: a=running[GPU-0] b=running[GPU-1]",
		evict:  "b→always",
	}, {
		name:   "TP=2 puts both to sleep",
		claims: []Claim{running("a", 0, 0.6, 0, 1, t2), running("b", 0, 0.6, 1, 2, t1)},
		wants:  []Want{odWant("big", 0, 0.9, 2)},
		want:   "big: waiting for a, b to sleep to make room\nclaims: a=running[GPU-0] b=running[GPU-1]",
		evict:  "a→big b→big",
	}, {
		name:   "room already coming: nobody else is put to sleep",
		claims: []Claim{func() Claim { c := running("a", 0, 0.6, 0, 1, t2); c.Evicting = true; return c }(), running("b", 0, 0.6, 1, 2, t1)},
		wants:  []Want{odWant("c", 0, 0.6, 1)},
		want:   "c: waiting for a to sleep to make room\nclaims: a=running[GPU-0] b=running[GPU-1]",
	}, {
		name: "a sleeper wakes on its own GPU, putting that GPU's tenant to sleep",
		claims: []Claim{
			running("a", 0, 0.6, 0, 1, t1), running("b", 0, 0.6, 1, 2, t2),
			{Name: "s", Req: Request{Name: "s", TP: 1, Util: 0.5}, UUIDs: []string{"GPU-1"}, Phase: Asleep, OnDemand: true, Since: now.Add(-time.Hour)},
		},
		wants: []Want{odWant("s", 0, 0.5, 1)},
		want:  "s: waiting for b to sleep to make room\nclaims: a=running[GPU-0] b=running[GPU-1] s=asleep[GPU-1]",
		evict: "b→s",
	}, {
		name: "sleepers are stopped for their residue when sleeping the awake is not enough",
		claims: []Claim{
			{Name: "s1", Req: Request{Name: "s1", TP: 1, Util: 0.5}, UUIDs: []string{"GPU-0"}, Phase: Asleep, PIDs: []int{1}, OnDemand: true, Since: now.Add(-time.Hour), LastUsed: t1},
			{Name: "s2", Req: Request{Name: "s2", TP: 1, Util: 0.5}, UUIDs: []string{"GPU-0"}, Phase: Asleep, PIDs: []int{3}, OnDemand: true, Since: now.Add(-time.Hour), LastUsed: t2},
			running("b", 0, 0.6, 1, 2, t2),
		},
		wants: []Want{odWant("big", 0, 0.9, 1)},
		want:  "big: waiting for b to sleep to make room\nclaims: b=running[GPU-1] s1=asleep[GPU-0] s2=asleep[GPU-0]",
		evict: "b→big",
	}, {
		name: "a sleeper wakes when its share is free",
		claims: []Claim{
			{Name: "s", Req: Request{Name: "s", TP: 1, Util: 0.5}, UUIDs: []string{"GPU-1"}, Phase: Asleep, OnDemand: true, Since: now.Add(-time.Hour)},
		},
		wants: []Want{odWant("s", 0, 0.5, 1)},
		want:  "s: [GPU-1]\nclaims: s=starting[GPU-1]",
	}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out := Decide(Input{Devices: full(), ReadAt: now, Claims: tc.claims, Wants: tc.wants, Headroom: config.GiB, Now: now})
			if len(tc.claims) == 1 { // the sleeper alone: nothing else on the GPUs
				out = Decide(Input{Devices: devs(), ReadAt: now, Claims: tc.claims, Wants: tc.wants, Headroom: config.GiB, Now: now})
			}
			if got := outcome(out); got != tc.want {
				t.Errorf("got\n%s\nwant\n%s", got, tc.want)
			}
			var ev []string
			for v, f := range out.Evict {
				ev = append(ev, v+"→"+f)
			}
			slices.Sort(ev)
			if got := strings.Join(ev, " "); got != tc.evict {
				t.Errorf("evict %q, want %q", got, tc.evict)
			}
		})
	}
}

// TestDecideStopsSleepersForTheirResidue: with nothing awake to put to
// sleep, sleepers whose residue is in the way are stopped, as few as do.
func TestDecideStopsSleepersForTheirResidue(t *testing.T) {
	d := withProc(withProc(withProc(devs()[:1], 0, 1, 5*config.GiB), 0, 3, 5*config.GiB), 0, 4, 5*config.GiB)
	sleeper := func(name string, pid int, last time.Time) Claim {
		return Claim{Name: name, Req: Request{Name: name, TP: 1, Util: 0.5}, UUIDs: []string{"GPU-0"}, Phase: Asleep, PIDs: []int{pid}, OnDemand: true, Since: now.Add(-time.Hour), LastUsed: last}
	}
	out := Decide(Input{Devices: d, ReadAt: now, Now: now, Headroom: config.GiB,
		Claims: []Claim{sleeper("s1", 1, now.Add(-time.Hour)), sleeper("s2", 3, now.Add(-time.Minute)), sleeper("s3", 4, now.Add(-2*time.Hour))},
		Wants:  []Want{odWant("big", 0, 0.9, 1)}, // 72 + 1 GiB: 65 free, two residues must go
	})
	if got := outcome(out); !strings.HasPrefix(got, "big: waiting for s1, s3 to sleep to make room") {
		t.Errorf("got %s", got)
	}
	if len(out.Evict) != 2 || out.Evict["s1"] != "big" || out.Evict["s3"] != "big" {
		t.Errorf("evict %v", out.Evict)
	}
}

// TestDecideSleeperBusyUntilRead: a model that just fell asleep keeps its
// GPU busy until a reading taken after shows its memory back.
func TestDecideSleeperBusyUntilRead(t *testing.T) {
	sleeper := Claim{Name: "s", Req: Request{Name: "s", TP: 1, Util: 0.5}, UUIDs: []string{"GPU-0"}, Phase: Asleep, Since: now}
	in := Input{Devices: devs()[:1], ReadAt: now.Add(-time.Second), Claims: []Claim{sleeper}, Wants: []Want{want("c", 0, 0.5, 1)}, Headroom: config.GiB, Now: now}
	if got := outcome(Decide(in)); !strings.HasPrefix(got, "c: waiting for GPU0: s is going to sleep") {
		t.Errorf("before a fresh reading: %s", got)
	}
	in.ReadAt = now.Add(time.Second)
	if got := outcome(Decide(in)); !strings.HasPrefix(got, "c: [GPU-0]") {
		t.Errorf("after: %s", got)
	}
}

// TestDecideReleaseTimeoutNote: the GPUs of a release that timed out say
// so until something is placed there.
func TestDecideReleaseTimeoutNote(t *testing.T) {
	out := Decide(Input{
		Devices:        withProc(devs(), 0, 7, 70*config.GiB),
		Claims:         []Claim{{Name: "old", Req: Request{Name: "old", TP: 1, Util: 0.5}, UUIDs: []string{"GPU-0"}, Phase: Releasing, PIDs: []int{7}, Since: now.Add(-time.Minute)}},
		ReleaseTimeout: time.Minute, Now: now, Headroom: config.GiB,
	})
	if n := out.Notes["GPU-0"]; n != "old's processes [7] still held memory after release_timeout 1m0s" {
		t.Errorf("note %q", n)
	}
	if len(out.Claims) != 0 || len(out.Log) != 1 {
		t.Errorf("claims %v log %v", out.Claims, out.Log)
	}
}

// TestDecideReadErrorKeepsReleasing: without readings a release cannot be
// seen to complete; only its timeout ends it.
func TestDecideReadErrorKeepsReleasing(t *testing.T) {
	in := Input{
		Devices: devs(), ReadErr: "timeout",
		Claims:         []Claim{{Name: "old", Req: Request{Name: "old", TP: 1, Util: 0.5}, UUIDs: []string{"GPU-0"}, Phase: Releasing, PIDs: []int{7}, Since: now}},
		ReleaseTimeout: time.Minute, Now: now,
	}
	if out := Decide(in); len(out.Claims) != 1 || out.Claims[0].Phase != Releasing {
		t.Errorf("claims %v", out.Claims)
	}
	in.Now = now.Add(time.Minute)
	if out := Decide(in); len(out.Claims) != 0 {
		t.Errorf("after the timeout: claims %v", out.Claims)
	}
}

// BenchmarkDecide: the seven reference models on two GPUs, all wanting.
func BenchmarkDecide(b *testing.B) {
	var wants []Want
	for _, r := range seed {
		wants = append(wants, Want{Request: r})
	}
	in := Input{Devices: devs(), Wants: wants, Headroom: config.GiB, Now: now}
	for b.Loop() {
		Decide(in)
	}
}

// TestDecideNoEvictionOnStaleReadings: while a model that just fell asleep
// is not yet seen to have given its memory back, nobody else is put to
// sleep: the memory is coming.
func TestDecideNoEvictionOnStaleReadings(t *testing.T) {
	d := withProc(withProc(devs(), 0, 1, 48*config.GiB), 1, 2, 48*config.GiB)
	out := Decide(Input{Devices: d, ReadAt: now.Add(-time.Second), Now: now, Headroom: config.GiB,
		Claims: []Claim{
			{Name: "low", Req: Request{Name: "low", TP: 1, Util: 0.6}, UUIDs: []string{"GPU-0"}, Phase: Asleep, PIDs: []int{1}, OnDemand: true, Since: now},
			{Name: "high", Req: Request{Name: "high", Priority: 9, TP: 1, Util: 0.6}, UUIDs: []string{"GPU-1"}, Phase: Running, PIDs: []int{2}, OnDemand: true},
		},
		Wants: []Want{odWant("new", 5, 0.6, 1)},
	})
	if len(out.Evict) != 0 || !strings.HasPrefix(out.Waits["new"], "needs 49.0 GiB") && !strings.HasPrefix(out.Waits["new"], "waiting for GPU0: low is going to sleep") {
		t.Errorf("evict %v, wait %q", out.Evict, out.Waits["new"])
	}
}
