package supervisor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"citadel-supervisor/supervisor/lifecycle"
	"citadel-supervisor/supervisor/liverestore"
)

// Live restore, the supervisor's side (docs/architecture.md, "Live
// restore"): the protocol is supervisor/liverestore's; the supervisor
// lends it what only it has.
//
//   - An upgrade re-executes the binary in place (same PID): each runner is
//     frozen between two events, its state written down (ModelState:
//     Freeze, the liverestore.Freezer), and the next image restores a
//     runner from it, with the same process, its output pipes and its GPU
//     claim.
//   - A daemon that died leaves its models running; the next one finds
//     them (liverestore.Successor) by cgroup leaf (or marker) and by the
//     instance record written at spawn (InstanceState), and adopts those
//     whose configuration is still the one they were started with.
//
// Both meet in lifecycle.Machine.Restore.
//
// The state one image hands the next, and the instance records a crashed
// daemon leaves, are the live-restore package's types (docs/architecture.md,
// "Live restore"); the machine writes and restores them
// (supervisor/lifecycle/handover.go), and the runner adds the process's
// handles, output and timers.

// freezeReq asks a runner to write its machine down and then do nothing
// until thaw is closed (the exec failed) or the process is replaced.
type freezeReq struct {
	reply chan<- frozen
	thaw  <-chan struct{}
}

// frozen is a runner's answer to a freeze.
type frozen struct {
	st    liverestore.ModelState
	files []*os.File // the instance's output pipes, for the next image
	err   error      // it cannot be written down now; it was not frozen
}

// freeze answers req from the runner goroutine and, when it could write
// the machine down, waits for thaw.
func (l *loop) freeze(req freezeReq) {
	if err := l.m.Restorable(); err != nil {
		req.reply <- frozen{err: err}
		return
	}
	st := l.m.Snapshot()
	st.Output = l.r.out.last(OutputLines)
	st.LastRequest = l.r.lastRequestTime()
	if l.timers[lifecycle.Tick] != nil {
		st.TimerAt = l.timerAt[lifecycle.Tick]
	}
	var files []*os.File
	if is := st.Instance; is != nil {
		inst := l.proc(l.m.Inst())
		l.fillRecord(is)
		for _, f := range []*os.File{inst.stdout, inst.stderr} {
			if f != nil {
				files = append(files, f)
			}
		}
	}
	req.reply <- frozen{st: st, files: files}
	// The daemon may be told to stop meanwhile: its stop goes first.
	select {
	case <-req.thaw:
	case <-l.ctx.Done():
	}
}

var _ liverestore.Freezer = (*Supervisor)(nil)

// Freeze writes every model down for an upgrade and holds every runner
// between two events until thaw is called (the exec failed) or the
// process image is replaced. A model in the middle of a spawn, stop, sleep
// or wake cannot be written down: Freeze retries until ctx ends, then
// thaws whatever it froze and says which model was busy.
func (s *Supervisor) Freeze(ctx context.Context) (h *liverestore.Handover, files map[string]*os.File, thaw func(), err error) {
	for {
		h, files, thaw, err = s.freezeOnce()
		if err == nil {
			return h, files, thaw, nil
		}
		select {
		case <-ctx.Done():
			return nil, nil, nil, fmt.Errorf("%w (it did not settle in time)", err)
		case <-time.After(100 * time.Millisecond): // a state change is an event away
		}
	}
}

func (s *Supervisor) freezeOnce() (*liverestore.Handover, map[string]*os.File, func(), error) {
	s.applyMu.Lock() // no reload adds or removes a runner meanwhile
	// A model a reload removed is no longer listed and cannot be handed
	// over: its stop ends first (the next image would find its processes
	// no model accounts for, and kill them beside memory being freed).
	if leaving := s.stillLeaving(); len(leaving) > 0 {
		s.applyMu.Unlock()
		return nil, nil, nil, fmt.Errorf("not now: %s (removed by a reload) still stopping", strings.Join(leaving, ", "))
	}
	runners := *s.runners.Load()
	thawCh := make(chan struct{})
	thawed := false
	thaw := func() {
		if !thawed {
			thawed = true
			close(thawCh)
			s.applyMu.Unlock()
		}
	}
	replies := make(chan frozen, len(runners))
	for _, r := range runners {
		r.mail.put(message{freeze: &freezeReq{reply: replies, thaw: thawCh}})
	}
	h := &liverestore.Handover{Version: liverestore.HandoverVersion}
	files := map[string]*os.File{}
	var busy []string
	deadline := time.NewTimer(5 * time.Second)
	defer deadline.Stop()
	for range runners {
		select {
		case f := <-replies:
			if f.err != nil {
				busy = append(busy, f.err.Error())
				continue
			}
			h.Models = append(h.Models, f.st)
			for i, file := range f.files {
				files[f.st.Name+"/"+[]string{"stdout", "stderr"}[i]] = file
			}
		case <-deadline.C:
			thaw()
			return nil, nil, nil, errors.New("a model's runner did not answer within 5s")
		}
	}
	if len(busy) > 0 {
		thaw()
		slices.Sort(busy)
		return nil, nil, nil, fmt.Errorf("not now: %s", strings.Join(busy, "; "))
	}
	slices.SortFunc(h.Models, func(a, b liverestore.ModelState) int { return strings.Compare(a.Name, b.Name) })
	return h, files, thaw, nil
}
