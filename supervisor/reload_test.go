package supervisor

import (
	"context"
	"strings"
	"testing"
	"time"
)

// TestApply reloads a changed configuration: only the models whose child
// would see a difference restart; the rest keep their process.
func TestApply(t *testing.T) {
	h := newHarness(t,
		modelSpec{Name: "same"},
		modelSpec{Name: "envchange"},
		modelSpec{Name: "probechange"},
		modelSpec{Name: "removed", Fake: []string{"--fake-detached-workers", "1"}},
	).start(Options{})
	before := map[string]Status{}
	for _, n := range []string{"same", "envchange", "probechange", "removed"} {
		before[n] = h.waitState(n, Ready, 20*time.Second)
	}
	removedProcs := h.procs("removed")

	next := *h.cfg
	next.Models = nil
	for _, m := range h.cfg.Models {
		switch m.Name {
		case "envchange":
			m.Env = map[string]string{selfEnv: "1", "NEW": "x"}
		case "probechange":
			m.Probe.Period = 70 * time.Millisecond
		case "removed":
			continue
		}
		next.Models = append(next.Models, m)
	}
	added := newHarness(t, modelSpec{Name: "added"}).cfg.Models[0]
	next.Models = append(next.Models, added)

	changes, err := h.sup.Apply(context.Background(), &next)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range changes {
		got = append(got, c.Name+":"+c.Kind.String())
	}
	if want := "added:added envchange:respawn probechange:update removed:removed same:unchanged"; strings.Join(got, " ") != want {
		t.Errorf("changes = %v, want %s", got, want)
	}
	// Removed: gone, with every process, before Apply returned.
	if _, err := h.sup.Status("removed"); err == nil {
		t.Error("removed model still has a status")
	}
	if live := liveOf(removedProcs, ""); len(live) != 0 {
		t.Errorf("removed model's processes alive: %v", live)
	}
	h.waitState("added", Ready, 20*time.Second)
	var env Status
	waitFor(t, 20*time.Second, "envchange restarted and ready", func() bool {
		env = h.status("envchange")
		return env.State == Ready && env.PID != before["envchange"].PID
	})
	if env.RestartsByReason[ReasonReload] != 1 {
		t.Errorf("envchange restarts = %v, want reload:1", env.RestartsByReason)
	}
	for _, n := range []string{"same", "probechange"} {
		if st := h.status(n); st.PID != before[n].PID || st.Restarts != 0 {
			t.Errorf("%s disturbed: pid %d → %d, restarts %d", n, before[n].PID, st.PID, st.Restarts)
		}
	}
	if h.sup.Config() != &next {
		t.Error("new configuration not in force")
	}
}
