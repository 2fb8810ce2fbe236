package liverestore

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/proc"
)

// Keep is what a daemon keeps for its successor while a model runs: the
// instance's record, and its output pipes in systemd's descriptor store.
type Keep struct {
	Records Records
	FDStore FDStore // nil without systemd's descriptor store
	Log     *zap.Logger
}

// StoreOutput puts an instance's output pipes in the descriptor store.
func (k Keep) StoreOutput(marker string, out, errp *os.File) {
	if k.FDStore == nil {
		return
	}
	key := InstanceKey(marker)
	for suffix, f := range map[string]*os.File{".out": out, ".err": errp} {
		if err := k.FDStore.Store(key+suffix, f); err != nil {
			k.Log.Warn("cannot keep a model's output pipe in systemd's descriptor store: after a daemon crash its output is lost until it restarts",
				zap.String("instance", key), zap.Error(err))
			return
		}
	}
}

// Forget drops what outlived an instance: its record and its pipes in the
// descriptor store.
func (k Keep) Forget(marker string) {
	k.Records.Remove(marker)
	if k.FDStore != nil {
		key := InstanceKey(marker)
		_ = k.FDStore.Remove(key + ".out")
		_ = k.FDStore.Remove(key + ".err")
	}
}

// Takeover is a predecessor's model instance this daemon takes over: from
// the previous image at an upgrade (Child: it is this process's child,
// with its output pipes open here), or found running after a crash.
type Takeover struct {
	State    ModelState // a crash's: only the Instance, from its record
	Child    bool
	Tree     *proc.Tree
	Out, Err *os.File // its output pipes; nil when lost
}

// Successor finds what a predecessor of its identity left.
type Successor struct {
	ID      string // the supervisor's identity: its markers' prefix
	Keep    Keep
	Cgroups *proc.Cgroups // nil in marker mode
	// Reaper forgets a handed-over child that is stopped here instead of
	// being taken over: the reaper reaps it once stopped.
	Reaper interface{ Done(pid int) }
}

// TakeOver finds what a predecessor of this identity left, before any
// model starts, and decides for each instance:
//
//   - handed over by the previous image (h, an upgrade): taken over with
//     its whole state;
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
func (s Successor) TakeOver(cfg *config.Config, h *Handover) map[string]*Takeover {
	return s.takeOrStop(cfg, h, true)
}

// StopLeftovers stops every model process a dead daemon of cfg's identity
// left running, and forgets their records and cgroup leaves: the last word
// of `systemctl stop` (ExecStopPost) when the daemon could not stop its
// models itself (it hung and was killed). It refuses while a daemon of
// that identity runs. id is the identity (the markers' prefix).
func StopLeftovers(cfg *config.Config, id string, log *zap.Logger) error {
	unlock, err := LockIdentity(cfg.ControlSocket)
	if err != nil {
		return err
	}
	defer unlock()
	s := Successor{ID: id, Keep: Keep{Records: RecordsFor(cfg.ControlSocket), Log: log}}
	if cg, ok := proc.FindCgroups(id); ok {
		s.Cgroups = cg
	}
	s.takeOrStop(cfg, nil, false)
	if s.Cgroups != nil {
		return s.Cgroups.Close()
	}
	return nil
}

func (s Successor) takeOrStop(cfg *config.Config, h *Handover, adopt bool) map[string]*Takeover {
	log := s.Keep.Log
	out := map[string]*Takeover{}
	handled := map[string]bool{} // instance keys
	type leftover struct {
		model string
		tree  *proc.Tree
	}
	var stop []leftover
	recs, err := s.Keep.Records.All()
	if err != nil {
		log.Warn("instance records", zap.Error(err))
	}
	if h != nil {
		for _, st := range h.Models {
			t := &Takeover{State: st, Child: true}
			if is := st.Instance; is != nil {
				// One a predecessor adopted after a crash was re-parented:
				// it is not this process's child.
				t.Child = !is.Adopted
				handled[InstanceKey(is.Marker)] = true
				t.Tree = TreeOf(*is)
				t.Out, t.Err = Inherited(is.StdoutFD, is.Model+" stdout"), Inherited(is.StderrFD, is.Model+" stderr")
				if _, ok := cfg.Model(st.Name); !ok {
					// Removed from the file meanwhile: it goes.
					_ = t.Out.Close()
					_ = t.Err.Close()
					if s.Reaper != nil {
						s.Reaper.Done(is.PID) // the reaper reaps it once stopped
					}
					s.Keep.Forget(is.Marker)
					stop = append(stop, leftover{st.Name, t.Tree})
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
	if s.Cgroups != nil {
		leaves, err := s.Cgroups.Leaves()
		if err != nil {
			log.Error("scan for leftover model cgroups", zap.Error(err))
		}
		for _, leaf := range leaves {
			// Leaves are named <model>@<token> ('@' is in no model name
			// and no cgroup interface file).
			key := filepath.Base(leaf.Path)
			model := key
			if i := strings.LastIndexByte(key, '@'); i > 0 {
				model = key[:i]
			}
			groups = append(groups, found{key, model, proc.NewCgroupTree(s.ID+"/"+model+"/", 0, leaf)})
		}
	}
	marked, err := proc.Marked(s.ID + "/")
	if err != nil {
		log.Error("scan for leftover model processes", zap.Error(err))
	}
	for marker, t := range marked {
		groups = append(groups, found{InstanceKey(marker), strings.Split(marker, "/")[1], t})
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
			log.Warn("stopping processes left by a previous supervisor: no instance record", zap.String("model", g.model), zap.Ints("pids", g.tree.PIDs()))
		case !configured:
			log.Warn("stopping processes left by a previous supervisor: the model is no longer configured", zap.String("model", g.model), zap.Ints("pids", g.tree.PIDs()))
		case out[g.model] != nil:
			log.Warn("stopping processes left by a previous supervisor: a second instance of the model", zap.String("model", g.model), zap.Ints("pids", g.tree.PIDs()))
		case proc.Check(rec.PID, rec.Start) != nil:
			log.Warn("stopping processes left by a previous supervisor: its main process is gone", zap.String("model", g.model), zap.Int("main_pid", rec.PID), zap.Ints("pids", g.tree.PIDs()))
		default:
			t := &Takeover{State: ModelState{Name: g.model, Instance: &rec}, Tree: TreeOf(rec)}
			if s.Keep.FDStore != nil {
				t.Out, t.Err = s.Keep.FDStore.Take(g.key+".out"), s.Keep.FDStore.Take(g.key+".err")
			}
			if t.Out == nil {
				log.Warn("adopting a model whose output pipes are lost (no systemd descriptor store): its output is not captured until it restarts, and it may die writing to the closed pipe", zap.String("model", g.model))
			}
			log.Info("adopting a model left running by a previous supervisor", zap.String("model", g.model), zap.Int("pid", rec.PID))
			out[g.model] = t
			continue
		}
		stop = append(stop, leftover{g.model, g.tree})
	}
	// What no instance needs any more: records of the gone, and pipes in
	// the descriptor store nobody took.
	for key, rec := range recs {
		if t := out[rec.Model]; t == nil || t.State.Instance == nil || InstanceKey(t.State.Instance.Marker) != key {
			s.Keep.Records.Remove(rec.Marker)
		}
	}
	if s.Keep.FDStore != nil {
		for _, name := range s.Keep.FDStore.Rest() {
			if f := s.Keep.FDStore.Take(name); f != nil {
				f.Close()
			}
			_ = s.Keep.FDStore.Remove(name)
		}
	}
	var wg sync.WaitGroup
	for _, g := range stop {
		model, t := g.model, g.tree
		grace := cfg.LongestStopTimeout()
		if m, ok := cfg.Model(model); ok {
			grace = m.StopTimeout
		}
		log.Warn("stopping processes left by a previous supervisor",
			zap.String("model", model), zap.Ints("pids", t.PIDs()), zap.Duration("grace", grace))
		wg.Go(func() {
			if err := t.Stop(context.Background(), grace, false); err != nil {
				log.Error("leftover processes survive", zap.String("model", model), zap.Error(err))
			}
		})
	}
	wg.Wait()
	return out
}

// TreeOf is the process tree of a predecessor's instance: its cgroup leaf
// when it has one, else its marker and main process.
func TreeOf(is InstanceState) *proc.Tree {
	if is.Cgroup != "" {
		return proc.NewCgroupTree(is.Marker, is.PID, &proc.Cgroup{Path: is.Cgroup})
	}
	return proc.NewTree(is.Marker, is.PID)
}
