package schedule_test

import (
	"strings"
	"testing"
	"time"

	"citadel-supervisor/gpu"
	"citadel-supervisor/supervisor/schedule"
	"citadel-supervisor/supervisor/schedule/scheduletest"
)

// The scheduler alone, driven as runners drive it: its answers are what
// a quiet GPU rests on (docs/on-demand.md, "Quiet GPUs").

// TestDeclinedEvictionKeepsAChangeBusy: a model whose quiet GPUs were
// granted (its sleep or stop has begun) declines an eviction decided
// meanwhile. The decline withdraws the eviction only: its GPU stays busy
// while its memory changes, so no start is placed there until it has
// slept. Before, the decline cleared the change, and a neighbour began to
// load while the model went to sleep beside it: vLLM aborts that load
// (vllm#56830), which the swap soak found.
func TestDeclinedEvictionKeepsAChangeBusy(t *testing.T) {
	sp := scheduletest.New(t)
	a, b := scheduletest.Model("a"), scheduletest.Model("b")
	sp.S.Want(a, 1, nil)
	sp.Granted("a")
	sp.S.Ready("a", time.Now())
	sp.S.Quiet("a", 1)
	if q := sp.Quiet("a"); !q.OK {
		t.Fatalf("quiet for a: %+v; want granted", q)
	}
	sp.S.Declined("a")
	sp.S.Want(b, 1, nil)
	if p := sp.Next("b"); p.GPUs != nil || !strings.Contains(p.Reason, "a is giving its memory back") {
		t.Fatalf("b while a goes to sleep: %+v; want it to wait for a", p)
	}
	sp.S.Slept("a")
	sp.Granted("b")
}

// TestNoQuietWhileModelsAreTakenOver: after an upgrade or a crash, every
// runner tells the scheduler what its model holds, each in its own time.
// A model whose stop waits for quiet GPUs is not answered until all have:
// before, a sleeper taken over first was granted quiet GPUs, and stopped,
// beside a neighbour still loading whose runner had not told yet.
func TestNoQuietWhileModelsAreTakenOver(t *testing.T) {
	sp := scheduletest.New(t)
	sp.S.Restoring()
	sp.S.Adopt(scheduletest.Model("a"), []string{scheduletest.GPU}, gpu.Asleep, time.Time{}, false)
	sp.S.Quiet("a", 1)
	sp.NoQuiet(func() { schedule.Sync(sp.S) })
	sp.S.Adopt(scheduletest.Model("b"), []string{scheduletest.GPU}, gpu.Starting, time.Time{}, false)
	sp.S.Restored()
	if q := sp.Quiet("a"); q.OK || !strings.Contains(q.Reason, "b, which is starting") {
		t.Fatalf("quiet for a while b loads: %+v; want it to wait for b", q)
	}
	sp.S.Ready("b", time.Now())
	// (A reading in between names the GPU anew: the same wait, said again.)
	for q := sp.Quiet("a"); !q.OK; q = sp.Quiet("a") {
		if !strings.Contains(q.Reason, "b, which is starting") {
			t.Fatalf("quiet for a: %+v; want it granted once b is ready", q)
		}
	}
}
