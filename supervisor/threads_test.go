package supervisor

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestExitsWatchedWithoutAThreadEach: the end of every model's process is
// awaited on the runtime's poller (its pidfd), not in a wait that blocks an
// OS thread for as long as the model runs: 24 running models add far fewer
// than 24 threads to the daemon. Before, each added one (os/exec's Wait).
func TestExitsWatchedWithoutAThreadEach(t *testing.T) {
	const n = 24
	var specs []modelSpec
	for i := range n {
		specs = append(specs, modelSpec{Name: fmt.Sprintf("m%02d", i), YAML: "probe: {period: 200ms}"})
	}
	h := newHarness(t, specs...)
	before := threads(t)
	h.start(Options{})
	h.waitFor(t, time.Minute, "every model ready", func() bool {
		st, _ := h.sup.Status()
		return len(st) == n && !slices.ContainsFunc(st, func(s Status) bool { return s.State != Ready })
	})
	// Threads that spawns and probes needed a moment stay in the
	// runtime's pool, idle, and are counted: the bound is loose.
	after := threads(t)
	t.Logf("OS threads: %d before, %d with %d models running", before, after, n)
	if after-before >= n {
		t.Errorf("OS threads grew from %d to %d with %d models: a thread blocked per model", before, after, n)
	}
}

// threads is this process's number of OS threads.
func threads(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Threads:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatal("no Threads: in /proc/self/status")
	return 0
}
