package gpu

import (
	"strings"
	"testing"
	"time"

	"citadel-supervisor/config"
)

// The swap core's rules for memory that comes back: a wake, a reservation
// and a restored claim all pass the same memory check on readings that
// show what is there now.

func sleeperClaim(name string, gpu string) Claim {
	return Claim{Name: name, Req: Request{Name: name, TP: 1, Util: 0.6}, UUIDs: []string{gpu}, Phase: Asleep, OnDemand: true, Since: now.Add(-time.Hour)}
}

// TestDecideWakeNeedsAReading: with no reading of its GPUs (a daemon just
// started or upgraded), a sleeper does not wake: it would wake onto
// memory nobody looked at (it did: an empty reading has no GPU short of
// memory).
func TestDecideWakeNeedsAReading(t *testing.T) {
	in := Input{Claims: []Claim{sleeperClaim("s", "GPU-0")}, Wants: []Want{odWant("s", 0, 0.6, 1)}, Headroom: config.GiB, Now: now}
	if got := outcome(Decide(in)); !strings.HasPrefix(got, "s: no GPU readings yet") {
		t.Errorf("no readings: %s", got)
	}
	in.Devices, in.ReadAt = devs()[1:], now // GPU-1 only: GPU-0 is not read
	if got := outcome(Decide(in)); !strings.HasPrefix(got, "s: its GPU GPU-0 is not in the readings") {
		t.Errorf("its GPU not read: %s", got)
	}
}

// TestDecideNothingBeforeAReadingAfterTheRestore: claims restored at an
// upgrade or adoption: no wake, no start and no eviction is decided on a
// reading older than the restore; the first one after decides.
func TestDecideNothingBeforeAReadingAfterTheRestore(t *testing.T) {
	restored := now.Add(-time.Second)
	in := Input{
		Devices: withProc(devs()[:1], 0, 9, 48*config.GiB), ReadAt: restored.Add(-time.Millisecond), NotBefore: restored, Now: now, Headroom: config.GiB,
		Claims: []Claim{
			{Name: "b", Req: Request{Name: "b", TP: 1, Util: 0.6}, UUIDs: []string{"GPU-0"}, Phase: Running, PIDs: []int{9}, OnDemand: true},
			{Name: "r", Req: Request{Name: "r", TP: 1, Util: 0.1}, UUIDs: []string{"GPU-0"}, Phase: Reserved},
			sleeperClaim("s", "GPU-0"),
		},
		Wants: []Want{odWant("s", 0, 0.6, 1), odWant("n", 0, 0.1, 1), want("r", 0, 0.1, 1)},
	}
	out := Decide(in)
	for _, name := range []string{"s", "n", "r"} {
		if out.Waits[name] != "waiting for a GPU reading taken after the takeover" {
			t.Errorf("%s: %q before a reading after the restore", name, out.Waits[name])
		}
	}
	if len(out.Evict) != 0 || len(out.Grants) != 0 {
		t.Errorf("before a reading after the restore: grants %v, evict %v", out.Grants, out.Evict)
	}
	in.ReadAt = now
	if out := Decide(in); out.Grants["n"] == nil {
		t.Errorf("after a fresh reading: %s", outcome(out))
	}
	// The sleeper alone: the fresh reading shows b in its way.
	in.Claims, in.Wants = in.Claims[:1], in.Wants[:1]
	in.Claims = append(in.Claims, sleeperClaim("s", "GPU-0"))
	if out := Decide(in); out.Evict["b"] != "s" {
		t.Errorf("after a fresh reading: %s, evict %v", outcome(out), out.Evict)
	}
	in.ReadAt = restored
	if out := Decide(in); len(out.Evict) != 0 {
		t.Errorf("on a reading from the restore's instant: evict %v", out.Evict)
	}
}

// TestDecideReservationChecksItsMemory: a reservation whose memory another
// process took since (outside the daemon's claims) is not granted blindly:
// the model is placed afresh, on the GPU that has room.
func TestDecideReservationChecksItsMemory(t *testing.T) {
	in := Input{
		Devices: withProc(devs(), 0, 77, 60*config.GiB), ReadAt: now, Now: now, Headroom: config.GiB,
		Claims: []Claim{{Name: "m", Req: Request{Name: "m", TP: 1, Util: 0.5}, UUIDs: []string{"GPU-0"}, Phase: Reserved}},
		Wants:  []Want{want("m", 0, 0.5, 1)},
	}
	if got := outcome(Decide(in)); got != "m: [GPU-1]\nclaims: m=starting[GPU-1]" {
		t.Errorf("got\n%s", got)
	}
	in.Devices = devs() // the memory is there: its own GPU again
	if got := outcome(Decide(in)); got != "m: [GPU-0]\nclaims: m=starting[GPU-0]" {
		t.Errorf("got\n%s", got)
	}
}

// TestDecidePrefersVictimsNobodyWaitsFor: of two otherwise equal models,
// the one with requests waiting in its queue is put to sleep last, even
// when it is the least recently used.
func TestDecidePrefersVictimsNobodyWaitsFor(t *testing.T) {
	running := func(name string, gpu, pid int, last time.Time, waiting int) Claim {
		return Claim{Name: name, Req: Request{Name: name, TP: 1, Util: 0.6}, UUIDs: []string{[]string{"GPU-0", "GPU-1"}[gpu]},
			Phase: Running, PIDs: []int{pid}, OnDemand: true, LastUsed: last, Waiting: waiting}
	}
	out := Decide(Input{
		Devices: withProc(withProc(devs(), 0, 1, 48*config.GiB), 1, 2, 48*config.GiB), ReadAt: now, Now: now, Headroom: config.GiB,
		Claims: []Claim{running("a", 0, 1, now.Add(-time.Hour), 3), running("b", 1, 2, now.Add(-time.Minute), 0)},
		Wants:  []Want{odWant("c", 0, 0.6, 1)},
	})
	if len(out.Evict) != 1 || out.Evict["b"] != "c" {
		t.Errorf("evict %v; want b (nobody waits for it), not a", out.Evict)
	}
}
