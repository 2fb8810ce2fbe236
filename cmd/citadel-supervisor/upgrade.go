package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"citadel-supervisor/supervisor"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/netguard"
	"citadel-supervisor/supervisor/systemd"
)

// Upgrade in place (docs/operations.md): `citadelctl upgrade` or SIGUSR2 re-executes
// the binary from its path on disk, with the same PID. The models stay
// this process's children; the listeners, the control socket and the
// models' output pipes stay open across the exec; the supervisor's state
// is written to a memfd the new image reads (handoverEnv names it).
//
// Before the exec nothing is given up: the new binary is asked which
// handover it takes and whether the configuration is valid, then the
// listeners stop accepting (connections wait in the kernel's backlog for
// the new image), requests in flight drain within their bounds, and every
// model's runner is frozen between two events. Any failure up to the exec
// resumes the old image as it was, and says why.

// handoverEnv names the descriptor holding the previous image's state.
const handoverEnv = "CITADEL_HANDOVER_FD"

// Bounds of an upgrade's steps, documented in docs/operations.md.
const (
	preflightTimeout = 20 * time.Second
	httpDrain        = 5 * time.Second  // a scrape in flight
	controlDrain     = 2 * time.Second  // citadelctl requests in flight; `logs -f` is cut
	freezeBound      = 10 * time.Second // models between states (a stop, a wake) settle
	cutGrace         = 2 * time.Second  // cut requests write their last event or answer
)

// handoverPayload is what one image writes for the next.
type handoverPayload struct {
	Version    int                 `json:"version"`
	From       string              `json:"from"`     // the handing image's version
	Upgrades   int                 `json:"upgrades"` // upgrades in place before this one
	Listeners  map[string]int      `json:"listeners"`
	Supervisor supervisor.Handover `json:"supervisor"`
}

// readHandover reads the previous image's state, when there is one, and
// removes handoverEnv from the environment (the models must not see it).
func readHandover(environ []string) (*handoverPayload, []string, error) {
	v := ""
	kept := environ[:0:0]
	for _, kv := range environ {
		if k, val, _ := strings.Cut(kv, "="); k == handoverEnv {
			v = val
			continue
		}
		kept = append(kept, kv)
	}
	os.Unsetenv(handoverEnv)
	if v == "" {
		return nil, kept, nil
	}
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, kept, fmt.Errorf("%s=%q: not a descriptor", handoverEnv, v)
	}
	f := os.NewFile(uintptr(fd), "handover")
	defer f.Close()
	var p handoverPayload
	if err := json.NewDecoder(f).Decode(&p); err != nil {
		return nil, kept, fmt.Errorf("read the handover: %w", err)
	}
	if p.Version != supervisor.HandoverVersion {
		return nil, kept, fmt.Errorf("handover version %d; this binary takes %d", p.Version, supervisor.HandoverVersion)
	}
	// None of them may reach a model this image spawns before it has taken
	// them up (a model that died across the exec restarts at once): a
	// listener held by a model outlives the daemon.
	for _, fd := range p.Listeners {
		unix.CloseOnExec(fd)
	}
	for _, m := range p.Supervisor.Models {
		if is := m.Instance; is != nil {
			for _, fd := range []int{is.StdoutFD, is.StderrFD} {
				if fd > 2 {
					unix.CloseOnExec(fd)
				}
			}
		}
	}
	return &p, kept, nil
}

// listener is the inherited listener name, or nil.
func (p *handoverPayload) listener(name string) (net.Listener, error) {
	if p == nil {
		return nil, nil
	}
	fd, ok := p.Listeners[name]
	if !ok {
		return nil, nil
	}
	// Close-on-exec already: readHandover marks every inherited descriptor.
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("inherited %s listener: %w", name, err)
	}
	return ln, nil
}

// drained is a server an upgrade pauses: it stops accepting, turns
// keep-alives off and waits for its connections to close.
type drained struct {
	name  string
	guard *netguard.Listener
	srv   *http.Server
	bound time.Duration
	// cut, when set, ends the requests still running at the bound, each
	// with an answer that says why (the gateway's Cut).
	cut func()
	// boundOf, when set, gives the bound at each upgrade (a setting a
	// reload may change).
	boundOf func() time.Duration
}

// upgrader carries out upgrades in place, one at a time.
type upgrader struct {
	log                    *zap.Logger
	notify                 *systemd.Notifier
	exe                    string   // the binary's path on disk, as it was started
	args                   []string // its arguments, kept
	environ                []string // the environment it was started with
	config                 string
	reaper                 *supervisor.Reaper // every child of the daemon's is started through it
	sup                    *supervisor.Supervisor
	gateway, http, control *drained
	keep                   func() // keeps the control socket's file when it closes
	stopping               func() bool

	started  time.Time
	upgrades int

	mu       sync.Mutex // held from prepare to a failed commit, or to the exec
	errMu    sync.Mutex
	lastErr  string
	failures int
}

// serve registers a server to drain at an upgrade.
func (u *upgrader) serve(d *drained, keep func()) {
	u.mu.Lock()
	defer u.mu.Unlock()
	switch d.name {
	case "gateway":
		u.gateway = d
	case "http":
		u.http = d
	case "control":
		u.control, u.keep = d, keep
	}
}

// servers lists the servers to drain, the control socket last.
func (u *upgrader) servers() []drained {
	var out []drained
	for _, d := range []*drained{u.gateway, u.http, u.control} {
		if d != nil {
			out = append(out, *d)
		}
	}
	return out
}

// daemon fills the upgrade fields of the daemon's description.
func (u *upgrader) daemon(d *api.Daemon) {
	d.Version, d.PID, d.ImageStarted, d.Upgrades = version, os.Getpid(), u.started, u.upgrades
	u.errMu.Lock()
	d.LastUpgradeError, d.UpgradeFailures = u.lastErr, u.failures
	u.errMu.Unlock()
}

func (u *upgrader) failed(err error) error {
	u.errMu.Lock()
	u.lastErr = err.Error()
	u.failures++
	u.errMu.Unlock()
	u.log.Error("upgrade in place failed; this image keeps running", zap.Error(err))
	return err
}

// signal is SIGUSR2's upgrade.
func (u *upgrader) signal(ctx context.Context) {
	if _, commit, err := u.prepare(ctx, false); err == nil {
		commit()
	}
}

// prepare does everything short of the exec. viaControl: the request is a
// control connection, which stays open until its answer is written.
func (u *upgrader) prepare(ctx context.Context, viaControl bool) (api.UpgradeResponse, func(), error) {
	var res api.UpgradeResponse
	if !u.mu.TryLock() {
		return res, nil, errors.New("an upgrade is already in progress")
	}
	unlock := true
	defer func() {
		if unlock {
			u.mu.Unlock()
		}
	}()
	u.log.Info("upgrade in place: checking the new binary", zap.String("binary", u.exe))
	to, err := preflight(ctx, u.reaper, u.exe, u.config)
	if err != nil {
		return res, nil, u.failed(fmt.Errorf("upgrade refused: %w; the running daemon (version %s) keeps running", err, version))
	}
	if u.control == nil {
		return res, nil, errors.New("not ready for an upgrade yet: the control socket is not up")
	}
	// Every model between two states before anything pauses: a model in
	// a long stop or wake refuses the upgrade while the daemon serves
	// (status, the gateway) throughout. It is checked again once frozen.
	sctx, cancel := context.WithTimeout(ctx, freezeBound)
	_, _, thaw, err := u.sup.Freeze(sctx)
	cancel()
	if err != nil {
		return res, nil, u.failed(fmt.Errorf("upgrade refused: %w; the running daemon (version %s) keeps running", err, version))
	}
	thaw()
	servers := u.servers()
	resume := func() {
		for _, s := range servers {
			s.srv.SetKeepAlivesEnabled(true)
			s.guard.Resume()
		}
	}
	// The gateway drains first and alone: its bound is the long one, and
	// meanwhile citadelctl and scrapes are still answered. Then the
	// metrics port and the control socket drain together.
	var first, rest []drained
	for _, s := range servers {
		if s.name == "gateway" {
			first = append(first, s)
		} else {
			rest = append(rest, s)
		}
	}
	for _, group := range [][]drained{first, rest} {
		for _, s := range group {
			s.guard.Pause()
			s.srv.SetKeepAlivesEnabled(false)
		}
		var wg sync.WaitGroup
		for _, s := range group {
			allow := 0
			if viaControl && s.name == "control" {
				allow = 1 // the upgrade's own request
			}
			wg.Go(func() { u.drain(ctx, s, allow) })
		}
		wg.Wait()
	}
	fctx, cancel := context.WithTimeout(ctx, freezeBound)
	h, files, thaw, err := u.sup.Freeze(fctx)
	cancel()
	if err != nil {
		resume()
		return res, nil, u.failed(fmt.Errorf("upgrade refused: %w; the running daemon (version %s) keeps running", err, version))
	}
	res = api.UpgradeResponse{Binary: u.exe, From: version, To: to, Models: len(h.Models)}
	for _, m := range h.Models {
		if m.Instance != nil {
			res.Running++
		}
	}
	unlock = false
	commit := func() {
		if viaControl {
			// The answer is written and the connection closed (keep-alives
			// are off) before the exec cuts it.
			qctx, cancel := context.WithTimeout(context.Background(), controlDrain)
			_ = u.control.guard.Quiet(qctx, 0)
			cancel()
		}
		var err error
		if u.stopping != nil && u.stopping() {
			err = errors.New("the daemon is stopping")
		} else {
			err = u.exec(servers, h, files)
		}
		u.failed(fmt.Errorf("exec %s: %w", u.exe, err))
		thaw()
		resume()
		u.notify.Ready()
		u.mu.Unlock()
	}
	return res, commit, nil
}

// drain waits for s's connections to close within its bound. Past it, a
// server that can cut its requests (the gateway: streams end with an SSE
// error event, waiting requests get 503) does, and gets cutGrace for its
// handlers to write that; what is still open then is cut at the exec.
func (u *upgrader) drain(ctx context.Context, s drained, allow int) {
	if s.boundOf != nil {
		s.bound = s.boundOf()
	}
	dctx, cancel := context.WithTimeout(ctx, s.bound)
	err := s.guard.Quiet(dctx, allow)
	cancel()
	if err == nil {
		return
	}
	if s.cut != nil {
		u.log.Warn("upgrade in place: requests still running after the drain bound are ended with an error event",
			zap.String("listener", s.name), zap.Duration("bound", s.bound), zap.Int("connections", s.guard.Open()))
		s.cut()
		cctx, cancel := context.WithTimeout(ctx, cutGrace)
		err = s.guard.Quiet(cctx, allow)
		cancel()
		if err == nil {
			return
		}
	}
	u.log.Warn("upgrade in place: connections still open after the drain bound are cut at the exec",
		zap.String("listener", s.name), zap.Duration("bound", s.bound), zap.Error(err))
}

// exec hands everything over and replaces this image; it returns only on
// failure.
func (u *upgrader) exec(servers []drained, h *supervisor.Handover, files map[string]*os.File) error {
	var opened []int
	defer func() {
		for _, fd := range opened {
			unix.Close(fd)
		}
	}()
	p := handoverPayload{Version: supervisor.HandoverVersion, From: version, Upgrades: u.upgrades, Listeners: map[string]int{}, Supervisor: *h}
	for _, s := range servers {
		fd, err := s.guard.Dup()
		if err != nil {
			return fmt.Errorf("%s listener: %w", s.name, err)
		}
		opened = append(opened, fd)
		p.Listeners[s.name] = fd
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
	b, err := json.Marshal(p)
	if err != nil {
		return err
	}
	mfd, err := unix.MemfdCreate("citadel-handover", 0)
	if err != nil {
		return fmt.Errorf("memfd: %w", err)
	}
	opened = append(opened, mfd)
	for rest := b; len(rest) > 0; {
		n, err := unix.Write(mfd, rest)
		if err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("write the handover: %w", err)
		}
		rest = rest[max(n, 0):]
	}
	if _, err := unix.Seek(mfd, 0, io.SeekStart); err != nil {
		return err
	}
	env := make([]string, 0, len(u.environ)+1)
	for _, kv := range u.environ {
		k, _, _ := strings.Cut(kv, "=")
		if k == handoverEnv || strings.HasPrefix(k, "LISTEN_") {
			continue
		}
		env = append(env, kv)
	}
	env = append(env, handoverEnv+"="+strconv.Itoa(mfd))
	u.keep()
	u.notify.Reloading()
	u.log.Info("upgrade in place: executing the new image", zap.String("binary", u.exe),
		zap.Int("models", len(h.Models)), zap.Int("descriptors", len(opened)))
	_ = u.log.Sync()
	return syscall.Exec(u.exe, u.args, env)
}

// preflight asks the new binary which handover it takes and whether it
// accepts the configuration: a binary that cannot run, or would refuse
// to start, is never executed in place of this one.
//
// Both run through the daemon's reaper (reaper.Exec): a child started
// behind its back is, to the reaper, a stray to kill after strayGrace and
// an exit status to take, so a --check of a few seconds was refused as
// "signal: killed".
func preflight(ctx context.Context, reaper *supervisor.Reaper, exe, config string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, preflightTimeout)
	defer cancel()
	ask := exec.CommandContext(ctx, exe, "--handover-version")
	var out, stderr bytes.Buffer
	ask.Stdout, ask.Stderr = &out, &stderr
	if err := reaper.Exec(ask); err != nil {
		if stderr.Len() > 0 {
			err = fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
		}
		return "", fmt.Errorf("%s --handover-version: %w (not a citadel-supervisor that can take over in place?)", exe, err)
	}
	n, to, _ := strings.Cut(strings.TrimSpace(out.String()), " ")
	if n != strconv.Itoa(supervisor.HandoverVersion) {
		return "", fmt.Errorf("%s takes handover version %q, this daemon hands over version %d: restart instead (systemctl restart citadel-supervisor restarts every model)", exe, n, supervisor.HandoverVersion)
	}
	check := exec.CommandContext(ctx, exe, "--check", "--config", config)
	var buf bytes.Buffer
	check.Stdout, check.Stderr = &buf, &buf
	if err := reaper.Exec(check); err != nil {
		var ee *exec.ExitError
		// 3 and 4: a model cannot start here, or warnings: the running
		// daemon has the same problem. 1: the new binary refuses the file.
		if !errors.As(err, &ee) || (ee.ExitCode() != 3 && ee.ExitCode() != 4) {
			lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
			if len(lines) > 10 {
				lines = append(lines[:10], "…")
			}
			return "", fmt.Errorf("%s --check --config %s: %w:\n%s", exe, config, err, strings.Join(lines, "\n"))
		}
	}
	return to, nil
}
