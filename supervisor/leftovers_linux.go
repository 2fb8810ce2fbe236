package supervisor

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/proc"
)

// ErrAlreadyRunning means another supervisor holds this identity's lock.
var ErrAlreadyRunning = errors.New("another citadel-supervisor is running with this control_socket")

// lockIdentity takes an exclusive lock next to the control socket, so two
// supervisors never share an identity: each would take the other's children
// for leftovers. The lock dies with the process, also on SIGKILL.
func lockIdentity(socket string) (func(), error) {
	path := socket + ".lock"
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("lock: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		b, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w (pid %s holds %s)", ErrAlreadyRunning, strings.TrimSpace(string(b)), path)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	_ = f.Truncate(0)
	_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	return func() { f.Close() }, nil
}

// stopLeftovers stops every process a previous supervisor of this identity
// left behind (it was SIGKILLed, or crashed) before any model starts.
//
// They are stopped, not adopted: their stdout and stderr were pipes to the
// dead supervisor, so their output is lost and the next write may fail;
// they are not our children, so their exit cannot be waited for; and a
// fresh start is the state an operator can reason about. Each model's
// processes get its stop_timeout, in parallel, so GPU memory is freed
// cleanly before placement begins.
//
// In cgroup mode they are found by cgroup first: every leaf under the
// daemon's cgroup root is an instance of a predecessor, whatever its
// processes did to their environment (a main process without the marker,
// a scrubbed grandchild). The marker scan still runs, for instances a
// predecessor in marker mode left.
func (s *Supervisor) stopLeftovers(cfg *config.Config) {
	type leftover struct {
		model string
		tree  *proc.Tree
	}
	var groups []leftover
	if s.d.cgroups != nil {
		leaves, err := s.d.cgroups.Leaves()
		if err != nil {
			s.d.log.Error("scan for leftover model cgroups", zap.Error(err))
		}
		for _, leaf := range leaves {
			// Leaves are named <model>@<token> ('@' is in no model name
			// and no cgroup interface file).
			base := filepath.Base(leaf.Path)
			model := base
			if i := strings.LastIndexByte(base, '@'); i > 0 {
				model = base[:i]
			}
			groups = append(groups, leftover{model, proc.NewCgroupTree(s.d.id+"/"+model+"/", 0, leaf)})
		}
	}
	marked, err := proc.Marked(s.d.id + "/")
	if err != nil {
		s.d.log.Error("scan for leftover model processes", zap.Error(err))
	}
	for marker, t := range marked {
		groups = append(groups, leftover{strings.Split(marker, "/")[1], t})
	}
	var wg sync.WaitGroup
	for _, g := range groups {
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
}
