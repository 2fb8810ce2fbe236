package supervisor

import (
	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/supervisortest"
	"context"
	"os"
	"path/filepath"
	"strconv"
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
	h.waitFor(t, 20*time.Second, "envchange restarted and ready", func() bool {
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

// TestReloadRestartsOnRotatedSecret: the configuration is the same, the
// contents of an env file changed; only the model using it restarts.
func TestReloadRestartsOnRotatedSecret(t *testing.T) {
	h := newHarness(t, modelSpec{Name: "uses"}, modelSpec{Name: "other"})
	secrets := filepath.Join(h.dir, "secrets.env")
	if err := os.WriteFile(secrets, []byte("HF_TOKEN=old\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	h.cfg.Models[1].EnvFiles = []string{secrets} // sorted: other, uses
	h.start(Options{})
	uses := h.waitState("uses", Ready, 20*time.Second)
	other := h.waitState("other", Ready, 20*time.Second)

	same := *h.cfg
	changes, err := h.sup.Apply(context.Background(), &same)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range changes {
		if c.Kind != config.Unchanged {
			t.Errorf("unchanged secret: %s is %s", c.Name, c.Kind)
		}
	}

	if err := os.WriteFile(secrets, []byte("HF_TOKEN=rotated\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	changes, err = h.sup.Apply(context.Background(), &same)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range changes {
		got = append(got, c.Name+":"+c.Kind.String()+":"+strings.Join(c.Fields, ","))
	}
	if want := "other:unchanged: uses:respawn:env_files contents"; strings.Join(got, " ") != want {
		t.Errorf("changes = %v, want %s", got, want)
	}
	h.waitFor(t, 20*time.Second, "uses restarted", func() bool {
		st := h.status("uses")
		return st.State == Ready && st.PID != uses.PID
	})
	if st := h.status("other"); st.PID != other.PID {
		t.Error("a model without the env file was restarted")
	}
}

// TestReloadFileRejectsBadFiles: every kind of bad file leaves the running
// configuration and models as they were, and says what is wrong.
func TestReloadFileRejectsBadFiles(t *testing.T) {
	h := newHarness(t, modelSpec{Name: "a"}, modelSpec{Name: "b"}).start(Options{})
	a := h.waitState("a", Ready, 20*time.Second)
	before := h.sup.Config()
	good := h.site.YAML
	cases := []struct {
		name, yaml, want string
	}{
		{"bad YAML", good + "models: [\n", "parse config: yaml"},
		{"unknown key", h.site.Edit(t, supervisortest.Set("bogus", 1)), "bogus: unknown key"},
		{"duplicate port", h.site.Edit(t, supervisortest.Set("models.b.port", h.cfg.Models[0].Port)), "already used by models.a"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if err := os.WriteFile(h.site.Path, []byte(tc.yaml), 0o644); err != nil {
				t.Fatal(err)
			}
			_, err := h.sup.ReloadFile(context.Background(), h.site.Path, nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "nothing changed") {
				t.Errorf("got %v, want it to say %q and nothing changed", err, tc.want)
			}
			if h.sup.reloadOK.Load() || h.sup.Config() != before {
				t.Error("a rejected reload changed the configuration or its status")
			}
		})
	}
	if err := os.WriteFile(h.site.Path, []byte(good), 0o644); err != nil {
		t.Fatal(err)
	}
	changes, err := h.sup.ReloadFile(context.Background(), h.site.Path, nil)
	if err != nil || !h.sup.reloadOK.Load() {
		t.Fatalf("no-op reload: %v", err)
	}
	for _, c := range changes {
		if c.Kind != config.Unchanged {
			t.Errorf("no-op reload changed %s: %s", c.Name, c.Kind)
		}
	}
	if st := h.status("a"); st.PID != a.PID {
		t.Error("a restarted across rejected and no-op reloads")
	}
}

// TestReloadKeepsTheDaemonsOwnPorts: listen binds once; a reload that
// moves it and gives its old port to a model is refused, saying why.
func TestReloadKeepsTheDaemonsOwnPorts(t *testing.T) {
	h := newHarness(t, modelSpec{Name: "a"})
	old := 40000 + h.cfg.Models[0].Port%1000
	h.cfg.Listen = "127.0.0.1:" + strconv.Itoa(old)
	h.start(Options{})
	h.waitState("a", Ready, 20*time.Second)
	// Nothing listens on either: the Supervisor serves no HTTP, and the
	// reload is refused.
	moved := h.site.Edit(t, supervisortest.Set("models.a.port", old), supervisortest.Set("listen", "127.0.0.1:1"))
	if err := os.WriteFile(h.site.Path, []byte(moved), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := h.sup.ReloadFile(context.Background(), h.site.Path, nil)
	want := "models.a.port: " + strconv.Itoa(old) + " is still the daemon's own listen"
	if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "nothing changed") {
		t.Errorf("got %v, want %q", err, want)
	}
}
