package supervisor

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/probe"
	"citadel-supervisor/supervisor/liverestore"
	"citadel-supervisor/supervisor/proc"
)

// ErrAlreadyRunning means another supervisor holds this identity's lock.
var ErrAlreadyRunning = liverestore.ErrAlreadyRunning

// takeover is a predecessor's model instance this daemon takes over: from
// the previous image at an upgrade (child: it is this process's child,
// with its output pipes open here), or found running after a crash.
type takeover struct {
	st       ModelState
	child    bool
	tree     processTree
	out, err *os.File // its output pipes; nil when lost
}

// takeOver finds what a predecessor of this identity left, before any
// model starts, and decides for each instance:
//
//   - handed over by the previous image (an upgrade): taken over with its
//     whole state;
//   - left running by a daemon that died: adopted when its instance record
//     says it is the process it started, for a model still configured (a
//     changed configuration restarts it once adopted, deliberately);
//   - anything else (no record, a model since removed, a second instance of
//     one model): stopped, each within its model's stop_timeout, in
//     parallel, so GPU memory is freed cleanly before placement begins.
//
// In cgroup mode instances are found by cgroup first: every leaf under the
// daemon's cgroup root is an instance of a predecessor, whatever its
// processes did to their environment. The marker scan still runs, for
// instances a predecessor in marker mode left.
func (s *Supervisor) takeOver(cfg *config.Config) map[string]*takeover {
	return s.takeOrStop(cfg, true)
}

// StopLeftovers stops every model process a dead daemon of cfg's identity
// left running, and forgets their records and cgroup leaves: the last word
// of `systemctl stop` (ExecStopPost) when the daemon could not stop its
// models itself (it hung and was killed). It refuses while a daemon of
// that identity runs.
func StopLeftovers(cfg *config.Config, log *zap.Logger) error {
	unlock, err := liverestore.LockIdentity(cfg.ControlSocket)
	if err != nil {
		return err
	}
	defer unlock()
	id := Identity(cfg.ControlSocket)
	s := &Supervisor{d: &deps{id: id, log: log, records: records{liverestore.RecordsFor(cfg.ControlSocket)}}}
	if cg, ok := proc.FindCgroups(id); ok {
		s.d.cgroups = cg
	}
	s.takeOrStop(cfg, false)
	if s.d.cgroups != nil {
		return s.d.cgroups.Close()
	}
	return nil
}

func (s *Supervisor) takeOrStop(cfg *config.Config, adopt bool) map[string]*takeover {
	out := map[string]*takeover{}
	handled := map[string]bool{} // instance keys
	type leftover struct {
		model string
		tree  *proc.Tree
	}
	var stop []leftover
	recs, err := s.d.records.All()
	if err != nil {
		s.d.log.Warn("instance records", zap.Error(err))
	}
	if h := s.handover; h != nil {
		s.handover = nil
		for _, st := range h.Models {
			t := &takeover{st: st, child: true}
			if is := st.Instance; is != nil {
				// One a predecessor adopted after a crash was re-parented:
				// it is not this process's child.
				t.child = !is.Adopted
				handled[instanceKey(is.Marker)] = true
				t.tree = s.treeOf(*is)
				t.out, t.err = liverestore.Inherited(is.StdoutFD, is.Model+" stdout"), liverestore.Inherited(is.StderrFD, is.Model+" stderr")
				if _, ok := cfg.Model(st.Name); !ok {
					// Removed from the file meanwhile: it goes.
					_ = t.out.Close()
					_ = t.err.Close()
					s.d.reaper.Done(is.PID) // the reaper reaps it once stopped
					s.d.forgetInstance(is.Marker)
					stop = append(stop, leftover{st.Name, t.tree.(*proc.Tree)})
					continue
				}
			}
			out[st.Name] = t
		}
	}
	type found struct {
		key, model string
		tree       *proc.Tree
	}
	var groups []found
	if s.d.cgroups != nil {
		leaves, err := s.d.cgroups.Leaves()
		if err != nil {
			s.d.log.Error("scan for leftover model cgroups", zap.Error(err))
		}
		for _, leaf := range leaves {
			// Leaves are named <model>@<token> ('@' is in no model name
			// and no cgroup interface file).
			key := filepath.Base(leaf.Path)
			model := key
			if i := strings.LastIndexByte(key, '@'); i > 0 {
				model = key[:i]
			}
			groups = append(groups, found{key, model, proc.NewCgroupTree(s.d.id+"/"+model+"/", 0, leaf)})
		}
	}
	marked, err := proc.Marked(s.d.id + "/")
	if err != nil {
		s.d.log.Error("scan for leftover model processes", zap.Error(err))
	}
	for marker, t := range marked {
		groups = append(groups, found{instanceKey(marker), strings.Split(marker, "/")[1], t})
	}
	for _, g := range groups {
		if handled[g.key] {
			continue // handed over, or already decided through its leaf
		}
		handled[g.key] = true
		rec, ok := recs[g.key]
		_, configured := cfg.Model(g.model)
		switch {
		case !adopt:
		case !ok:
			s.d.log.Warn("stopping processes left by a previous supervisor: no instance record", zap.String("model", g.model), zap.Ints("pids", g.tree.PIDs()))
		case !configured:
			s.d.log.Warn("stopping processes left by a previous supervisor: the model is no longer configured", zap.String("model", g.model), zap.Ints("pids", g.tree.PIDs()))
		case out[g.model] != nil:
			s.d.log.Warn("stopping processes left by a previous supervisor: a second instance of the model", zap.String("model", g.model), zap.Ints("pids", g.tree.PIDs()))
		case proc.Check(rec.PID, rec.Start) != nil:
			s.d.log.Warn("stopping processes left by a previous supervisor: its main process is gone", zap.String("model", g.model), zap.Int("main_pid", rec.PID), zap.Ints("pids", g.tree.PIDs()))
		default:
			t := &takeover{st: ModelState{Name: g.model, Instance: &rec}, tree: s.treeOf(rec)}
			if s.d.fdstore != nil {
				t.out, t.err = s.d.fdstore.Take(g.key+".out"), s.d.fdstore.Take(g.key+".err")
			}
			if t.out == nil {
				s.d.log.Warn("adopting a model whose output pipes are lost (no systemd descriptor store): its output is not captured until it restarts, and it may die writing to the closed pipe", zap.String("model", g.model))
			}
			s.d.log.Info("adopting a model left running by a previous supervisor", zap.String("model", g.model), zap.Int("pid", rec.PID))
			out[g.model] = t
			continue
		}
		stop = append(stop, leftover{g.model, g.tree})
	}
	// What no instance needs any more: records of the gone, and pipes in
	// the descriptor store nobody took.
	for key, rec := range recs {
		if t := out[rec.Model]; t == nil || t.st.Instance == nil || instanceKey(t.st.Instance.Marker) != key {
			s.d.records.Remove(rec.Marker)
		}
	}
	if s.d.fdstore != nil {
		for _, name := range s.d.fdstore.Rest() {
			if f := s.d.fdstore.Take(name); f != nil {
				f.Close()
			}
			_ = s.d.fdstore.Remove(name)
		}
	}
	var wg sync.WaitGroup
	for _, g := range stop {
		model, t := g.model, g.tree
		grace := cfg.LongestStopTimeout()
		if m, ok := cfg.Model(model); ok {
			grace = m.StopTimeout
		}
		s.d.log.Warn("stopping processes left by a previous supervisor",
			zap.String("model", model), zap.Ints("pids", t.PIDs()), zap.Duration("grace", grace))
		wg.Go(func() {
			if err := t.Stop(context.Background(), grace, false); err != nil {
				s.d.log.Error("leftover processes survive", zap.String("model", model), zap.Error(err))
			}
		})
	}
	wg.Wait()
	return out
}

// treeOf is the process tree of a predecessor's instance: its cgroup leaf
// when it has one, else its marker and main process.
func (s *Supervisor) treeOf(is InstanceState) processTree {
	if is.Cgroup != "" {
		return proc.NewCgroupTree(is.Marker, is.PID, &proc.Cgroup{Path: is.Cgroup})
	}
	return proc.NewTree(is.Marker, is.PID)
}

// adopt takes t's instance over for r, a runner of m: nil when it is
// gone, which the machine counts as an exit while no daemon watched.
func (s *Supervisor) adopt(r *runner, t *takeover, m config.Model) *restored {
	from := &restored{st: t.st}
	is := t.st.Instance
	if is == nil {
		return from
	}
	inst, err := r.adoptInstance(*is, t.child, t.tree, t.out, t.err)
	if err != nil {
		r.log.Warn("the process to take over is gone", zap.Int("pid", is.PID), zap.Error(err))
		if t.out != nil {
			t.out.Close()
		}
		if t.err != nil {
			t.err.Close()
		}
		s.d.forgetInstance(is.Marker)
		return from
	}
	from.inst = inst
	if !t.child && m.OnDemand() && m.SleepLevel > 0 && is.SleepLevel == 0 && s.d.prober != nil {
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
