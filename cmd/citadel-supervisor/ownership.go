package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor"
	"citadel-supervisor/supervisor/proc"
)

// openOwnership picks the process ownership mode (docs/architecture.md):
// a cgroup v2 leaf per model where the daemon can make one (root, or a
// systemd unit with Delegate=yes), else the marker and parent links. An
// explicit "cgroup" that cannot be had is an error, not a silent downgrade.
func openOwnership(mode string, cfg *config.Config, environ []string, log *zap.Logger) (*proc.Cgroups, error) {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err == nil {
		// Go raised the soft limit to the hard one at start (models get
		// the original back); the connection caps are sized from it.
		log.Info("file descriptor limit", zap.Uint64("nofile", rl.Cur))
	}
	switch mode {
	case "marker":
		log.Warn("process ownership: marker (asked for): a process that scrubs its environment and double-forks can escape a stop; see docs/operations.md")
		return nil, nil
	case "auto", "cgroup":
	default:
		return nil, fmt.Errorf("--ownership %q: want auto, cgroup or marker", mode)
	}
	// Under systemd the unit's cgroup is the daemon's to manage only with
	// Delegate=yes; the daemon then moves itself into a leaf first. Only
	// as the unit's main process (started by PID 1): a daemon that a test
	// or a shell under some unit started must not move itself around in
	// that unit's cgroup.
	delegate := config.Getenv(environ, "INVOCATION_ID", "") != "" && os.Getppid() == 1
	cg, err := proc.OpenCgroups(supervisor.Identity(cfg.ControlSocket), delegate)
	if err != nil {
		if mode == "cgroup" {
			return nil, err
		}
		log.Warn("process ownership: marker (no usable cgroup v2 hierarchy: run as root, or under the shipped unit with Delegate=yes)", zap.Error(err))
		return nil, nil
	}
	log.Info("process ownership: cgroup", zap.String("root", cg.Root), zap.Bool("delegated", cg.Delegated))
	return cg, nil
}

// shutdownMargin is added to the longest stop bound before a SIGTERMed
// daemon gives up waiting for its stops.
const shutdownMargin = 5 * time.Second

// exitWithin makes SIGTERM always end the daemon: if the stops have not
// finished (exited not closed) within the longest stop_timeout plus the
// kill and reap bounds and a margin, it kills every model's cgroup leaf and
// exits. Every stop is bounded already; this is the guard against a bug
// that would otherwise leave systemd to SIGKILL a daemon that ignores it.
func exitWithin(ctx context.Context, exited <-chan struct{}, sup *supervisor.Supervisor, cg *proc.Cgroups, log *zap.Logger) {
	select {
	case <-ctx.Done():
	case <-exited:
		return
	}
	bound := sup.Config().LongestStopTimeout() + supervisor.StopOverhead + shutdownMargin
	t := time.NewTimer(bound)
	defer t.Stop()
	select {
	case <-exited:
		return
	case <-t.C:
	}
	log.Error("stopping took longer than its bound; killing what is left and exiting", zap.Duration("bound", bound))
	if cg != nil {
		leaves, _ := cg.Leaves()
		for _, l := range leaves {
			if err := l.Kill(); err != nil && !errors.Is(err, os.ErrNotExist) {
				log.Error("kill cgroup", zap.String("cgroup", l.Path), zap.Error(err))
			}
		}
	}
	_ = log.Sync()
	os.Exit(1)
}
