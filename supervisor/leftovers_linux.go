package supervisor

import (
	"context"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/probe"
	"citadel-supervisor/supervisor/liverestore"
)

// ErrAlreadyRunning means another supervisor holds this identity's lock.
var ErrAlreadyRunning = liverestore.ErrAlreadyRunning

// takeOver finds what a predecessor of this identity left, before any
// model starts, and stops what is not to be taken over
// (liverestore.Successor.TakeOver): the previous image's handover is
// consumed here.
func (s *Supervisor) takeOver(cfg *config.Config) map[string]*liverestore.Takeover {
	h := s.handover
	s.handover = nil
	return liverestore.Successor{ID: s.d.id, Keep: s.d.keep(), Cgroups: s.d.cgroups, Reaper: s.d.reaper}.TakeOver(cfg, h)
}

// StopLeftovers stops every model process a dead daemon of cfg's identity
// left running (liverestore.StopLeftovers): `systemctl stop`'s last word.
func StopLeftovers(cfg *config.Config, log *zap.Logger) error {
	return liverestore.StopLeftovers(cfg, Identity(cfg.ControlSocket), log)
}

// adopt takes t's instance over for r, a runner of m: nil when it is
// gone, which the machine counts as an exit while no daemon watched.
func (s *Supervisor) adopt(r *runner, t *liverestore.Takeover, m config.Model) *restored {
	from := &restored{st: t.State}
	is := t.State.Instance
	if is == nil {
		return from
	}
	inst, err := r.adoptInstance(*is, t.Child, t.Tree, t.Out, t.Err)
	if err != nil {
		r.log.Warn("the process to take over is gone", zap.Int("pid", is.PID), zap.Error(err))
		if t.Out != nil {
			t.Out.Close()
		}
		if t.Err != nil {
			t.Err.Close()
		}
		s.d.forgetInstance(is.Marker)
		return from
	}
	from.inst = inst
	if !t.Child && m.OnDemand() && m.SleepLevel > 0 && is.SleepLevel == 0 && s.d.prober != nil {
		// After a crash the record may be a step behind the engine: the
		// daemon died as it went to sleep by itself. The engine knows; a
		// request must never go to an engine believed awake. The other
		// way round (the record says asleep, or that a sleep began, and
		// the engine says awake: it died mid-sleep or mid-wake) the record
		// is kept: asleep until a wake proves it awake.
		secrets, _ := loadEnvFiles(m.EnvFiles)
		ctx, cancel := context.WithTimeout(probe.WithKey(context.Background(), m.APIKey(secrets)), m.Probe.Timeout)
		asleep, err := s.d.prober.IsSleeping(ctx, baseURL(m))
		cancel()
		if err == nil && asleep {
			c := *is
			c.SleepLevel, c.SleepCause = m.SleepLevel, "found asleep"
			r.log.Info("adopted: the engine sleeps although its record says awake; the engine's word is taken", zap.Int("recorded_level", is.SleepLevel))
			from.st.Instance = &c
		}
	}
	return from
}
