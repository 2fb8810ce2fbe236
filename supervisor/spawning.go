package supervisor

import (
	"sync"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/lifecycle"
)

// A spawn (the checks once more, the cgroup leaf, fork and exec, the
// output pipes) is a job of its own, like a probe or a stop: the runner
// goes on taking operations, reloads and the shutdown while it runs, and
// its outcome comes back as EvSpawned. What is asked meanwhile (a stop, a
// restart, a reload that changes the model, the shutdown) is applied once
// it returns: a process it started is stopped first, never lost.

// spawnWait is how long a spawn may take before the model's reason says
// what it hangs on. fork and exec take milliseconds; a spawn that takes
// seconds waits on something that may never answer (a hung mount under
// the command or the cgroup file system).
const spawnWait = 2 * time.Second

// spawnRun is the spawn in flight: what it does now, for the reason a
// spawn that hangs shows.
type spawnRun struct {
	mu   sync.Mutex
	what string
}

func (s *spawnRun) doing(what string) {
	s.mu.Lock()
	s.what = what
	s.mu.Unlock()
}

func (s *spawnRun) now() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.what
}

// startSpawn runs the spawn on gpus as a job; its outcome comes back on
// l.spawned. A result the runner no longer takes (it ended at the
// shutdown, the spawn having hung past its bound) is the job's to stop.
func (l *loop) startSpawn(gpus []string) {
	r := l.r
	cfg, eff, v := l.m.Config(), l.m.SpawnConfig(), l.m.VLLM()
	job := &spawnRun{what: "the checks before its spawn"}
	l.spawnJob = job
	l.spawnSlow = r.d.after(spawnWait)
	go func() {
		out := r.spawnChecked(cfg, eff, v, gpus, job.doing)
		select {
		case l.spawned <- out:
		case <-l.gone:
			if inst := out.inst; inst != nil {
				r.log.Warn("its spawn returned after the runner ended: stopping the process", zap.Int("pid", inst.PID))
				_ = r.stopInstance(inst, 0, true)
				r.d.forgetInstance(inst.marker)
			}
		}
	}()
}

// spawnOutcome is a spawn's outcome: the event for the machine and, when
// it started one, the process, whose handles the runner keeps (the event
// names it once the runner holds it).
type spawnOutcome struct {
	ev   lifecycle.EvSpawned
	inst *instance
}

// spawnChecked checks again (the GPUs may have taken a while) and starts
// the model: m as configured, eff as its vLLM v can have it. It runs off
// the runner's goroutine and touches none of the runner's state but its
// atomics.
func (r *runner) spawnChecked(m, eff config.Model, v lifecycle.VLLM, gpus []string, doing func(string)) spawnOutcome {
	// The env_files the checks read are what the child gets.
	secrets, cause, reason := checkStart(m)
	if cause != "" {
		return spawnOutcome{ev: lifecycle.EvSpawned{Cause: cause, Reason: reason}}
	}
	visible, note := r.d.visibleDevices(gpus, v)
	if note != "" {
		r.log.Warn(note)
	}
	inst, err := r.spawn(m, eff, secrets, gpus, visible, doing)
	if err != nil {
		if daemonShort(err) {
			// Out of descriptors (pipe2, pidfd_open), memory or processes:
			// the daemon's own trouble, often a flood on its listeners. The
			// model is tried again like any pending model, without counting
			// a start nor failing it.
			r.log.Warn("spawn not made: the daemon is short of resources", zap.Error(err))
			return spawnOutcome{ev: lifecycle.EvSpawned{Cause: CauseDaemon, Reason: "the daemon is short of resources to start it: " + errText(err) + "; retrying"}}
		}
		return spawnOutcome{ev: lifecycle.EvSpawned{Err: err}}
	}
	key := m.APIKey(secrets)
	r.apiKey.Store(&key)
	r.publishPIDs(inst.tree)
	// Its record is written as the machine takes the instance (EfRecord
	// from EvSpawned, on the runner's goroutine): one builder. A digest of
	// the env_files, not the values: a reload compares it with the files'
	// contents then, to restart a model whose secret was rotated.
	return spawnOutcome{ev: lifecycle.EvSpawned{EnvDigest: envDigest(secrets)}, inst: inst}
}
