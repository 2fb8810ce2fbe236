package supervisor

import (
	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/liverestore"
)

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

// adopt takes t's instance over for r: nil when it is
// gone, which the machine counts as an exit while no daemon watched.
func (s *Supervisor) adopt(r *runner, t *liverestore.Takeover) *restored {
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
	// Whether its engine sleeps although its record says awake is asked
	// by its runner (EfAskSleeping), not here: this loop starts every
	// model, and an engine that does not answer must hold none of them.
	from.inst = inst
	return from
}
