package liverestore

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/netguard"
)

// Upgrade in place (docs/operations.md): `citadelctl upgrade` or SIGUSR2
// re-executes the binary from its path on disk, with the same PID. The
// models stay this process's children; the listeners, the control socket
// and the models' output pipes stay open across the exec; the supervisor's
// state is written to a memfd the new image reads (Env names it).
//
// Before the exec nothing is given up: the new binary is asked which
// handover it takes and whether the configuration is valid, then the
// listeners stop accepting (connections wait in the kernel's backlog for
// the new image), requests in flight drain within their bounds, and every
// model's runner is frozen between two events. Any failure up to the exec
// resumes the old image as it was, and says why.

// Bounds of an upgrade's steps, documented in docs/operations.md.
const (
	HTTPDrain    = 5 * time.Second  // a scrape in flight
	ControlDrain = 2 * time.Second  // citadelctl requests in flight; `logs -f` is cut
	FreezeBound  = 10 * time.Second // models between states (a stop, a wake) settle
	cutGrace     = 2 * time.Second  // cut requests write their last event or answer
)

// Freezer is the side that owns the models: the supervisor. Freeze writes
// every model down and holds each between two events until thaw is called
// (the exec failed) or the process image is replaced; files are the
// models' output pipes by "<model>/stdout" and "<model>/stderr". A model
// that cannot be written down now (a spawn, stop, sleep or wake in flight)
// makes it retry until ctx ends, then fail having thawed what it froze.
type Freezer interface {
	Freeze(ctx context.Context) (h *Handover, files map[string]*os.File, thaw func(), err error)
}

// Notifier tells the service manager (systemd's notify socket) that the
// daemon is reloading (the exec is near) or ready again (it failed).
type Notifier interface {
	Ready()
	Reloading()
}

// ExecFunc replaces the process image: syscall.Exec. It returns only on
// failure; an injected one (a test) that returns nil stands for a
// successful exec, after which the old image does nothing more.
type ExecFunc func(path string, argv, env []string) error

// Server is a listener an upgrade pauses: it stops accepting, turns
// keep-alives off and waits for its connections to close.
type Server struct {
	Name  string // gateway, http or control: its key in Payload.Listeners
	Guard *netguard.Listener
	HTTP  *http.Server
	Bound time.Duration
	// Cut, when set, ends the requests still running at the bound, each
	// with an answer that says why (the gateway's Cut).
	Cut func()
	// BoundOf, when set, gives the bound at each upgrade (a setting a
	// reload may change).
	BoundOf func() time.Duration
}

// Upgrader carries out upgrades in place, one at a time. Set its fields
// before Serve; Models, Starter and Notify before the first upgrade.
type Upgrader struct {
	Log      *zap.Logger
	Notify   Notifier
	Exe      string   // the binary's path on disk, as it was started
	Args     []string // its arguments, kept
	Environ  []string // the environment it was started with
	Config   string   // the configuration file the new binary checks
	Version  string   // this image's version
	Started  time.Time
	Upgrades int // upgrades in place before this image
	Starter  Starter
	Models   Freezer
	// Stopping reports that the daemon is stopping: no new image is
	// executed then.
	Stopping func() bool
	// Exec replaces the image; nil is syscall.Exec.
	Exec ExecFunc

	gateway, http, control *Server
	keep                   func() // keeps the control socket's file when it closes

	mu       sync.Mutex // held from Prepare to a failed commit, or to the exec
	errMu    sync.Mutex
	lastErr  string
	failures int
}

// Serve registers a server to drain at an upgrade; keep, for the control
// socket, keeps its file in place when it closes at the exec.
func (u *Upgrader) Serve(s *Server, keep func()) {
	u.mu.Lock()
	defer u.mu.Unlock()
	switch s.Name {
	case "gateway":
		u.gateway = s
	case "http":
		u.http = s
	case "control":
		u.control, u.keep = s, keep
	}
}

// servers lists the servers to drain, the control socket last.
func (u *Upgrader) servers() []Server {
	var out []Server
	for _, s := range []*Server{u.gateway, u.http, u.control} {
		if s != nil {
			out = append(out, *s)
		}
	}
	return out
}

// Daemon fills the upgrade fields of the daemon's description.
func (u *Upgrader) Daemon(d *api.Daemon) {
	d.Version, d.PID, d.ImageStarted, d.Upgrades = u.Version, os.Getpid(), u.Started, u.Upgrades
	u.errMu.Lock()
	d.LastUpgradeError, d.UpgradeFailures = u.lastErr, u.failures
	u.errMu.Unlock()
}

func (u *Upgrader) failed(err error) error {
	u.errMu.Lock()
	u.lastErr = err.Error()
	u.failures++
	u.errMu.Unlock()
	u.Log.Error("upgrade in place failed; this image keeps running", zap.Error(err))
	return err
}

// Signal is SIGUSR2's upgrade.
func (u *Upgrader) Signal(ctx context.Context) {
	if _, commit, err := u.Prepare(ctx, false); err == nil {
		commit()
	}
}

// Prepare does everything short of the exec: preflight, drain, freeze.
// On success commit executes the new image and returns only if that
// failed, having thawed the models and resumed the listeners. viaControl:
// the request is a control connection, which stays open until its answer
// is written.
func (u *Upgrader) Prepare(ctx context.Context, viaControl bool) (res api.UpgradeResponse, commit func(), err error) {
	if !u.mu.TryLock() {
		return res, nil, errors.New("an upgrade is already in progress")
	}
	unlock := true
	defer func() {
		if unlock {
			u.mu.Unlock()
		}
	}()
	u.Log.Info("upgrade in place: checking the new binary", zap.String("binary", u.Exe))
	to, err := Preflight(ctx, u.Starter, u.Exe, u.Config)
	if err != nil {
		return res, nil, u.failed(fmt.Errorf("upgrade refused: %w; the running daemon (version %s) keeps running", err, u.Version))
	}
	if u.control == nil {
		return res, nil, errors.New("not ready for an upgrade yet: the control socket is not up")
	}
	// Every model between two states before anything pauses: a model in
	// a long stop or wake refuses the upgrade while the daemon serves
	// (status, the gateway) throughout. It is checked again once frozen.
	sctx, cancel := context.WithTimeout(ctx, FreezeBound)
	_, _, thaw, err := u.Models.Freeze(sctx)
	cancel()
	if err != nil {
		return res, nil, u.failed(fmt.Errorf("upgrade refused: %w; the running daemon (version %s) keeps running", err, u.Version))
	}
	thaw()
	servers := u.servers()
	resume := func() {
		for _, s := range servers {
			s.HTTP.SetKeepAlivesEnabled(true)
			s.Guard.Resume()
		}
	}
	// The gateway drains first and alone: its bound is the long one, and
	// meanwhile citadelctl and scrapes are still answered. Then the
	// metrics port and the control socket drain together.
	var first, rest []Server
	for _, s := range servers {
		if s.Name == "gateway" {
			first = append(first, s)
		} else {
			rest = append(rest, s)
		}
	}
	for _, group := range [][]Server{first, rest} {
		for _, s := range group {
			s.Guard.Pause()
			s.HTTP.SetKeepAlivesEnabled(false)
		}
		var wg sync.WaitGroup
		for _, s := range group {
			allow := 0
			if viaControl && s.Name == "control" {
				allow = 1 // the upgrade's own request
			}
			wg.Go(func() { u.drain(ctx, s, allow) })
		}
		wg.Wait()
	}
	fctx, cancel := context.WithTimeout(ctx, FreezeBound)
	h, files, thaw, err := u.Models.Freeze(fctx)
	cancel()
	if err != nil {
		resume()
		return res, nil, u.failed(fmt.Errorf("upgrade refused: %w; the running daemon (version %s) keeps running", err, u.Version))
	}
	res = api.UpgradeResponse{Binary: u.Exe, From: u.Version, To: to, Models: len(h.Models)}
	for _, m := range h.Models {
		if m.Instance != nil {
			res.Running++
		}
	}
	unlock = false
	commit = func() {
		if viaControl {
			// The answer is written and the connection closed (keep-alives
			// are off) before the exec cuts it.
			qctx, cancel := context.WithTimeout(context.Background(), ControlDrain)
			_ = u.control.Guard.Quiet(qctx, 0)
			cancel()
		}
		var err error
		if u.Stopping != nil && u.Stopping() {
			err = errors.New("the daemon is stopping")
		} else {
			err = u.exec(servers, h, files)
			if err == nil {
				return // replaced (an injected exec): this image is gone
			}
		}
		u.failed(fmt.Errorf("exec %s: %w", u.Exe, err))
		thaw()
		resume()
		u.Notify.Ready()
		u.mu.Unlock()
	}
	return res, commit, nil
}

// drain waits for s's connections to close within its bound. Past it, a
// server that can cut its requests (the gateway: streams end with an SSE
// error event, waiting requests get 503) does, and gets cutGrace for its
// handlers to write that; what is still open then is cut at the exec.
func (u *Upgrader) drain(ctx context.Context, s Server, allow int) {
	if s.BoundOf != nil {
		s.Bound = s.BoundOf()
	}
	dctx, cancel := context.WithTimeout(ctx, s.Bound)
	err := s.Guard.Quiet(dctx, allow)
	cancel()
	if err == nil {
		return
	}
	if s.Cut != nil {
		u.Log.Warn("upgrade in place: requests still running after the drain bound are ended with an error event",
			zap.String("listener", s.Name), zap.Duration("bound", s.Bound), zap.Int("connections", s.Guard.Open()))
		s.Cut()
		cctx, cancel := context.WithTimeout(ctx, cutGrace)
		err = s.Guard.Quiet(cctx, allow)
		cancel()
		if err == nil {
			return
		}
	}
	u.Log.Warn("upgrade in place: connections still open after the drain bound are cut at the exec",
		zap.String("listener", s.Name), zap.Duration("bound", s.Bound), zap.Error(err))
}

// exec hands everything over and replaces this image; it returns only on
// failure (or nil from an injected exec that took the image's place).
func (u *Upgrader) exec(servers []Server, h *Handover, files map[string]*os.File) error {
	var opened []int
	replaced := false
	defer func() {
		if replaced {
			return // the descriptors are the next image's now
		}
		for _, fd := range opened {
			unix.Close(fd)
		}
	}()
	p := Payload{Version: HandoverVersion, From: u.Version, Upgrades: u.Upgrades, Listeners: map[string]int{}, Supervisor: *h}
	for _, s := range servers {
		fd, err := s.Guard.Dup()
		if err != nil {
			return fmt.Errorf("%s listener: %w", s.Name, err)
		}
		opened = append(opened, fd)
		p.Listeners[s.Name] = fd
	}
	for i := range p.Supervisor.Models {
		is := p.Supervisor.Models[i].Instance
		if is == nil {
			continue
		}
		for stream, dst := range map[string]*int{"stdout": &is.StdoutFD, "stderr": &is.StderrFD} {
			f := files[is.Model+"/"+stream]
			if f == nil {
				continue
			}
			fd, err := netguard.DupForExec(f)
			if err != nil {
				return fmt.Errorf("%s %s: %w", is.Model, stream, err)
			}
			opened = append(opened, fd)
			*dst = fd
		}
	}
	mfd, err := p.memfd()
	if err != nil {
		return err
	}
	opened = append(opened, mfd)
	env := make([]string, 0, len(u.Environ)+1)
	for _, kv := range u.Environ {
		k, _, _ := strings.Cut(kv, "=")
		if k == Env || strings.HasPrefix(k, "LISTEN_") {
			continue
		}
		env = append(env, kv)
	}
	env = append(env, Env+"="+strconv.Itoa(mfd))
	if u.keep != nil {
		u.keep()
	}
	u.Notify.Reloading()
	u.Log.Info("upgrade in place: executing the new image", zap.String("binary", u.Exe),
		zap.Int("models", len(h.Models)), zap.Int("descriptors", len(opened)))
	_ = u.Log.Sync()
	execve := u.Exec
	if execve == nil {
		execve = syscall.Exec
	}
	err = execve(u.Exe, u.Args, env)
	replaced = err == nil
	return err
}
