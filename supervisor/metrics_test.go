package supervisor

import (
	"os"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"

	"citadel-supervisor/config"
)

// TestModelCollectorGolden checks the exposition of a snapshot: every state
// one-hot, restarts for every reason (0 included, so rate() works from the
// first restart), and the per-process figures only while a process runs.
func TestModelCollectorGolden(t *testing.T) {
	s := &Supervisor{d: &deps{}}
	s.reloadOK.Store(false)
	s.reloadAt.Store(1795000000)
	exit := 137
	ok := true
	ready := newRunner(config.Model{Name: "mixtral", Enabled: true}, &deps{now: time.Now, log: zap.NewNop()})
	ready.status.Store(&Status{
		Name: "mixtral", State: Ready, PID: 4411, StartedAt: time.Unix(1795000100, 500_000_000),
		StartupDuration: 95 * time.Second, RestartsByReason: map[string]int{"exit": 2, "manual": 1},
		LastExitCode: &exit, ProbeSuccess: &ok,
	})
	pending := newRunner(config.Model{Name: "phi3", Enabled: true}, &deps{now: time.Now, log: zap.NewNop()})
	pending.status.Store(&Status{Name: "phi3", State: Pending, Reason: "storage: /m: no such file or directory", PendingCause: CauseStorage})
	runners := []*runner{ready, pending}
	s.runners.Store(&runners)

	want := `
# HELP citadel_config_last_reload_success_timestamp_seconds Unix time of the last successful configuration load.
# TYPE citadel_config_last_reload_success_timestamp_seconds gauge
citadel_config_last_reload_success_timestamp_seconds 1.795e+09
# HELP citadel_config_last_reload_successful 1 if the last configuration load succeeded, 0 if it was rejected (the previous one stays in force).
# TYPE citadel_config_last_reload_successful gauge
citadel_config_last_reload_successful 0
# HELP citadel_model_last_exit_code Exit code of the model's last process (128+signal when killed).
# TYPE citadel_model_last_exit_code gauge
citadel_model_last_exit_code{model="mixtral"} 137
# HELP citadel_model_pending_cause For a pending model, 1 for what it waits for (gpu is normal when models outnumber memory; storage, port and env_files need an operator; daemon: the daemon itself was short of descriptors or memory to spawn it, and retries), 0 for the other causes.
# TYPE citadel_model_pending_cause gauge
citadel_model_pending_cause{cause="checking",model="phi3"} 0
citadel_model_pending_cause{cause="daemon",model="phi3"} 0
citadel_model_pending_cause{cause="env_files",model="phi3"} 0
citadel_model_pending_cause{cause="gpu",model="phi3"} 0
citadel_model_pending_cause{cause="port",model="phi3"} 0
citadel_model_pending_cause{cause="storage",model="phi3"} 1
# HELP citadel_model_restarts_total Restarts of the model, by reason (exit, probe, startup, manual, reload, wake).
# TYPE citadel_model_restarts_total counter
citadel_model_restarts_total{model="mixtral",reason="exit"} 2
citadel_model_restarts_total{model="mixtral",reason="manual"} 1
citadel_model_restarts_total{model="mixtral",reason="probe"} 0
citadel_model_restarts_total{model="mixtral",reason="reload"} 0
citadel_model_restarts_total{model="mixtral",reason="startup"} 0
citadel_model_restarts_total{model="mixtral",reason="wake"} 0
citadel_model_restarts_total{model="phi3",reason="exit"} 0
citadel_model_restarts_total{model="phi3",reason="manual"} 0
citadel_model_restarts_total{model="phi3",reason="probe"} 0
citadel_model_restarts_total{model="phi3",reason="reload"} 0
citadel_model_restarts_total{model="phi3",reason="startup"} 0
citadel_model_restarts_total{model="phi3",reason="wake"} 0
# HELP citadel_model_start_time_seconds Unix time the model's current process was spawned.
# TYPE citadel_model_start_time_seconds gauge
citadel_model_start_time_seconds{model="mixtral"} 1.7950001005e+09
# HELP citadel_model_startup_duration_seconds Spawn to first healthy answer, of the model's last start.
# TYPE citadel_model_startup_duration_seconds gauge
citadel_model_startup_duration_seconds{model="mixtral"} 95
# HELP citadel_model_state 1 for the model's current state, 0 for the others.
# TYPE citadel_model_state gauge
citadel_model_state{model="mixtral",state="backoff"} 0
citadel_model_state{model="mixtral",state="failed"} 0
citadel_model_state{model="mixtral",state="pending"} 0
citadel_model_state{model="mixtral",state="ready"} 1
citadel_model_state{model="mixtral",state="starting"} 0
citadel_model_state{model="mixtral",state="stopped"} 0
citadel_model_state{model="mixtral",state="sleeping"} 0
citadel_model_state{model="mixtral",state="waking"} 0
citadel_model_state{model="mixtral",state="stopping"} 0
citadel_model_state{model="mixtral",state="unhealthy"} 0
citadel_model_state{model="phi3",state="backoff"} 0
citadel_model_state{model="phi3",state="failed"} 0
citadel_model_state{model="phi3",state="pending"} 1
citadel_model_state{model="phi3",state="ready"} 0
citadel_model_state{model="phi3",state="starting"} 0
citadel_model_state{model="phi3",state="stopped"} 0
citadel_model_state{model="phi3",state="sleeping"} 0
citadel_model_state{model="phi3",state="waking"} 0
citadel_model_state{model="phi3",state="stopping"} 0
citadel_model_state{model="phi3",state="unhealthy"} 0
# HELP citadel_model_up 1 when the model is ready (answering its health probe), else 0.
# TYPE citadel_model_up gauge
citadel_model_up{model="mixtral"} 1
citadel_model_up{model="phi3"} 0
# HELP citadel_ownership_mode 1 for how the daemon owns the models' processes (cgroup: a cgroup v2 leaf per instance; marker: marker variable, parent links and subreaper), 0 for the other.
# TYPE citadel_ownership_mode gauge
citadel_ownership_mode{mode="cgroup"} 0
citadel_ownership_mode{mode="marker"} 1
# HELP citadel_probe_success 1 if the model's last health probe succeeded, else 0.
# TYPE citadel_probe_success gauge
citadel_probe_success{model="mixtral"} 1
`
	c := newModelCollector(s)
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}

	// Label pairs are built once per model and kept: a later scrape reads
	// the new snapshot's values under them.
	ready.status.Store(&Status{Name: "mixtral", State: Failed, RestartsByReason: map[string]int{"exit": 3}})
	wantLater := `
# HELP citadel_model_state 1 for the model's current state, 0 for the others.
# TYPE citadel_model_state gauge
citadel_model_state{model="mixtral",state="backoff"} 0
citadel_model_state{model="mixtral",state="failed"} 1
citadel_model_state{model="mixtral",state="pending"} 0
citadel_model_state{model="mixtral",state="ready"} 0
citadel_model_state{model="mixtral",state="starting"} 0
citadel_model_state{model="mixtral",state="stopped"} 0
citadel_model_state{model="mixtral",state="sleeping"} 0
citadel_model_state{model="mixtral",state="waking"} 0
citadel_model_state{model="mixtral",state="stopping"} 0
citadel_model_state{model="mixtral",state="unhealthy"} 0
citadel_model_state{model="phi3",state="backoff"} 0
citadel_model_state{model="phi3",state="failed"} 0
citadel_model_state{model="phi3",state="pending"} 1
citadel_model_state{model="phi3",state="ready"} 0
citadel_model_state{model="phi3",state="starting"} 0
citadel_model_state{model="phi3",state="stopped"} 0
citadel_model_state{model="phi3",state="sleeping"} 0
citadel_model_state{model="phi3",state="waking"} 0
citadel_model_state{model="phi3",state="stopping"} 0
citadel_model_state{model="phi3",state="unhealthy"} 0
# HELP citadel_model_up 1 when the model is ready (answering its health probe), else 0.
# TYPE citadel_model_up gauge
citadel_model_up{model="mixtral"} 0
citadel_model_up{model="phi3"} 0
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(wantLater), "citadel_model_state", "citadel_model_up"); err != nil {
		t.Errorf("a later scrape: %v", err)
	}

	// The per-process figures come from the model's live processes.
	pids := []int{os.Getpid()} // a live process to read
	ready.pids.Store(&pids)
	if n := testutil.CollectAndCount(c, "citadel_model_resident_memory_bytes", "citadel_model_cpu_seconds_total"); n != 2 {
		t.Errorf("%d tree series, want rss and cpu for mixtral", n)
	}
}
