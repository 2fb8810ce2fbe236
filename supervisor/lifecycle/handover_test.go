package lifecycle

import (
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/liverestore"
)

// TestMachineRestore: what a machine becomes when it takes over a
// predecessor's state (an upgrade) or process (a crash), by case.
func TestMachineRestore(t *testing.T) {
	cfg := testModelCfg()
	digest := cfg.SpawnDigest()
	inst := func(mod func(*liverestore.InstanceState)) *liverestore.InstanceState {
		is := &liverestore.InstanceState{Model: "m", PID: 100, Started: t0.Add(-time.Minute), GPUs: []string{"GPU-0"}, Digest: digest}
		if mod != nil {
			mod(is)
		}
		return is
	}
	onDemand := func(c *config.Model) { c.Activation = "on_demand"; c.SleepLevel = 1; c.IdleAfter = time.Hour }
	for _, tc := range []struct {
		name       string
		cfg        func(*config.Model)
		st         liverestore.ModelState
		running    bool // the process is still there
		envChanged bool // its env_files contents differ now
		state      State
		effects    string // a prefix of the effects, as describe writes them
		reason     string // a part of the reason
	}{
		{name: "ready, upgraded", st: liverestore.ModelState{State: Ready, Instance: inst(nil)}, running: true,
			state: Ready, effects: "adopt(running) arm(tick,1s)"},
		{name: "unhealthy, upgraded: probed again from zero", st: liverestore.ModelState{State: Unhealthy, Instance: inst(nil)}, running: true,
			state: Ready, effects: "adopt(running) arm(tick,1s)"},
		{name: "starting, upgraded: the rest of its startup_timeout", st: liverestore.ModelState{State: Starting, Reason: "loading", Instance: inst(nil)}, running: true,
			state: Starting, effects: "adopt(starting) arm(deadline,19m0s) arm(tick,0s)", reason: "loading"},
		{name: "found after a crash: probed at once", st: liverestore.ModelState{Instance: inst(nil)}, running: true,
			state: Starting, effects: "adopt(starting) arm(deadline,20m0s) arm(tick,0s)", reason: "adopted"},
		{name: "configuration changed meanwhile: restarted once its GPUs are quiet", st: liverestore.ModelState{State: Ready, Instance: inst(func(is *liverestore.InstanceState) { is.Digest = "other" })}, running: true,
			state: Ready, effects: "adopt(running) quiet(1) arm(deadline,20m0s)", reason: "before it stops: configuration changed while the daemon was away"},
		{name: "env_files rotated meanwhile: restarted once its GPUs are quiet", st: liverestore.ModelState{State: Ready, Instance: inst(nil)}, running: true, envChanged: true,
			state: Ready, effects: "adopt(running) quiet(1) arm(deadline,20m0s)", reason: "before it stops: env_files contents changed while the daemon was away"},
		{name: "found after a crash, its record says ready: probed as ready", st: liverestore.ModelState{Instance: inst(func(is *liverestore.InstanceState) { is.ReadyAt = t0.Add(-30 * time.Second) })}, running: true,
			state: Ready, effects: "adopt(running) arm(tick,1s)"},
		{name: "held meanwhile (disabled): stopped once its GPUs are quiet", cfg: func(c *config.Model) { c.Enabled = false }, st: liverestore.ModelState{State: Ready, Instance: inst(nil)}, running: true,
			state: Ready, effects: "adopt(running) quiet(1) arm(deadline,20m0s)", reason: "before it stops: enabled: false"},
		{name: "held meanwhile, asleep: stopped as a sleeper once its GPUs are quiet", cfg: func(c *config.Model) { c.Enabled = false; onDemand(c) },
			st: liverestore.ModelState{State: Sleeping, Instance: inst(func(is *liverestore.InstanceState) { is.SleepLevel = 2 })}, running: true,
			state: Sleeping, effects: "adopt(asleep) quiet(1) arm(deadline,20m0s)", reason: "before it stops: enabled: false"},
		{name: "held meanwhile, loading: stopped at once", cfg: func(c *config.Model) { c.Enabled = false }, st: liverestore.ModelState{State: Starting, Instance: inst(nil)}, running: true,
			state: Stopping, effects: "adopt(starting) disarm(tick) disarm(deadline) disarm(idle) stop(term)", reason: "enabled: false"},
		{name: "asleep, on demand", cfg: onDemand, st: liverestore.ModelState{State: Sleeping, Instance: inst(func(is *liverestore.InstanceState) { is.SleepLevel = 1; is.SleepCause = "idle" })}, running: true,
			state: Sleeping, effects: "adopt(asleep)", reason: "asleep (level 1, idle)"},
		{name: "gone during the exec: a failure, backed off", st: liverestore.ModelState{State: Ready, Instance: inst(nil)},
			state: Backoff, effects: "arm(tick,", reason: "exited while the daemon was away"},
		{name: "in backoff: the rest of its delay", st: liverestore.ModelState{State: Backoff, Reason: "exited (exit code 1); restarting in 10s", TimerAt: t0.Add(4 * time.Second)},
			state: Backoff, effects: "arm(tick,4s)", reason: "restarting in 10s"},
		{name: "failed: retried when retry_failed_after ends", st: liverestore.ModelState{State: Failed, Reason: "start limit", TimerAt: t0.Add(time.Minute)},
			state: Failed, effects: "arm(tick,1m0s)", reason: "start limit"},
		{name: "held stopped", st: liverestore.ModelState{State: Stopped, Hold: true, HoldReason: "held stopped by operator"},
			state: Stopped, effects: "", reason: "held stopped by operator"},
		{name: "pending: checks again", st: liverestore.ModelState{State: Pending},
			state: Pending, effects: "disarm(tick) check"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := testModelCfg()
			if tc.cfg != nil {
				tc.cfg(&c)
			}
			m := New(c, func() time.Time { return t0 }, func() float64 { return 0.5 }, zap.NewNop())
			if is := tc.st.Instance; is != nil && is.Digest == digest {
				is.Digest = c.SpawnDigest() // started under the configuration it is restored with
			}
			var in *Instance
			if tc.running {
				in = &Instance{PID: 100, Started: tc.st.Instance.Started, GPUs: tc.st.Instance.GPUs}
			}
			got := describe(m.Restore(tc.st, in, c.SpawnDigest(), tc.envChanged))
			if !strings.HasPrefix(got, tc.effects) || (tc.effects == "" && got != "") {
				t.Errorf("effects %q, want %q…", got, tc.effects)
			}
			if m.state != tc.state || !strings.Contains(m.reason, tc.reason) {
				t.Errorf("state %s %q, want %s with %q", m.state, m.reason, tc.state, tc.reason)
			}
		})
	}
}

// TestMachineSnapshotRoundTrip: a machine written down and restored is the
// machine it was, as far as the operator sees (status).
func TestMachineSnapshotRoundTrip(t *testing.T) {
	mt := newMTest(t).toReady()
	mt.m.restarts[ReasonExit] = 2
	st := mt.m.Snapshot()
	before := mt.m.Status()
	m := New(testModelCfg(), func() time.Time { return mt.now }, func() float64 { return 0.5 }, zap.NewNop())
	st.Instance.Digest = testModelCfg().SpawnDigest()
	m.Restore(st, mt.m.inst, testModelCfg().SpawnDigest(), false)
	after := m.Status()
	if after.State != before.State || after.PID != before.PID || after.Restarts != before.Restarts || !after.ReadyAt.Equal(before.ReadyAt) {
		t.Errorf("before %+v\nafter  %+v", before, after)
	}
}
