// Package control is the supervisor's control API: HTTP with JSON bodies on
// a Unix socket, the only interface that changes state. The server checks
// each peer's credentials (SO_PEERCRED). The wire types are in package api
// and the client, what citadelctl uses, in package client: neither links
// the daemon.
package control

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/user"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/netguard"
	"citadel-supervisor/supervisor/schedule"
)

// Backend is what the server needs of the supervisor.
type Backend interface {
	Status(names ...string) ([]supervisor.Status, error)
	Do(ctx context.Context, op api.Op, names ...string) (map[string]error, error)
	Output(name string, n int) ([]string, error)
	Follow(name string) (<-chan string, func(), error)
	GPUs(ctx context.Context) ([]schedule.GPUView, error)
}

var _ Backend = (*supervisor.Supervisor)(nil)

// Options configure a Server. Path, Logger and Backend are required.
type Options struct {
	Path  string
	Group string // may change state besides root and the daemon's user; "" = the daemon's group
	// ReadGroup, when set, owns the socket file instead of Group: its
	// members can open the socket and read, but not change state.
	ReadGroup string
	Logger    *zap.Logger
	Backend   Backend
	// Reload loads and applies the configuration file, as SIGHUP does.
	Reload func(context.Context) ([]config.Change, error)
	// Daemon describes the daemon (PathDaemon); nil answers an empty one.
	Daemon func() api.Daemon
	// Upgrade prepares an upgrade in place (PathUpgrade): on success the
	// answer is written, and commit runs once the handler has returned
	// (it executes the new image).
	Upgrade func(ctx context.Context) (api.UpgradeResponse, func(), error)
	// Usage reports the gateway's usage (PathUsage); nil: no gateway.
	Usage func() api.Usage
	// Listener, when set, is the socket to serve: inherited from the
	// previous image at an upgrade, so it is neither created nor
	// re-permissioned.
	Listener *net.UnixListener
	// MaxConns caps concurrent connections for requests; 0 means 64.
	MaxConns int
	// Limits, when set, replace DefaultLimits(MaxConns) (admit.go).
	Limits *Limits
	// PeerOf reads a connection's peer; nil reads SO_PEERCRED. Tests
	// inject peers of other users.
	PeerOf func(net.Conn) (Peer, bool)
}

// Server serves the control API on a Unix socket.
type Server struct {
	o       Options
	ln      *netguard.Listener
	admit   *admitListener
	unix    *net.UnixListener
	gid     uint32 // the group allowed to change state
	fileGID uint32 // the socket file's group: gid, or ReadGroup's
	uid     uint32 // the daemon's user
	srv     *http.Server
}

// maxBody bounds a request body; the largest legitimate one names every model.
const maxBody = 1 << 20

// Read bounds: a request's headers, then its body, must arrive within
// these; a client that sends half a request is cut, not waited for.
const (
	headerTimeout = 5 * time.Second
	bodyTimeout   = 5 * time.Second
	// followWrite: a `logs -f` follower that reads nothing for this long
	// is cut (its lines would only pile up).
	followWrite = 10 * time.Second
)

// Listen creates the socket with mode 0660 and the configured group: the
// read group when one is set, else the group that may change state. A stale
// socket file (nothing answers on it) is replaced; a live one, or a path
// that is not a socket, is an error: nothing else's file is ever removed.
func Listen(o Options) (*Server, error) {
	s := &Server{o: o, uid: uint32(os.Geteuid()), gid: uint32(os.Getegid())}
	if o.Group != "" {
		g, err := user.LookupGroup(o.Group)
		if err != nil {
			return nil, fmt.Errorf("control_socket_group: %w", err)
		}
		gid, _ := strconv.ParseUint(g.Gid, 10, 32)
		s.gid = uint32(gid)
	}
	s.fileGID = s.gid
	if o.ReadGroup != "" {
		g, err := user.LookupGroup(o.ReadGroup)
		if err != nil {
			return nil, fmt.Errorf("control_socket_read_group: %w", err)
		}
		gid, _ := strconv.ParseUint(g.Gid, 10, 32)
		s.fileGID = uint32(gid)
	}
	ln := o.Listener
	if ln == nil {
		var err error
		if ln, err = create(o.Path, s.fileGID); err != nil {
			return nil, err
		}
	}
	s.unix = ln
	ln.SetUnlinkOnClose(true)
	// Capped, so clients cannot take the descriptors the daemon needs, and
	// admitted by peer (admit.go), so no user can take every connection.
	// No WriteTimeout nor ReadTimeout: either would cut `citadelctl logs
	// -f` (an expired read deadline cancels the request); the body has its
	// own read bound (readBody), a request's own work is bounded by the
	// supervisor, and idle connections go after IdleTimeout.
	lim := DefaultLimits(cmp.Or(o.MaxConns, 64))
	if o.Limits != nil {
		lim = *o.Limits
	}
	s.ln = netguard.Limit(ln, lim.Total(), o.Logger)
	peerOf := o.PeerOf
	if peerOf == nil {
		peerOf = peerCred
	}
	s.admit = &admitListener{Listener: s.ln, a: newAdmitter(lim), peerOf: peerOf, privilege: func(p Peer) bool { return s.authorize(p) == nil }}
	s.srv = &http.Server{
		Handler:           readBody(s.routes()),
		ReadHeaderTimeout: headerTimeout,
		IdleTimeout:       30 * time.Second,
		ConnContext:       withPeer,
		ErrorLog:          zap.NewStdLog(o.Logger),
	}
	return s, nil
}

// readBody reads a request's body whole within bodyTimeout (and maxBody)
// before the handler runs, then clears the read deadline: a half-sent
// request is answered 408 instead of holding its connection, and the
// deadline never lingers to cancel a long answer such as `logs -f`.
func readBody(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body == nil || r.Body == http.NoBody {
			h.ServeHTTP(w, r)
			return
		}
		rc := http.NewResponseController(w)
		_ = rc.SetReadDeadline(time.Now().Add(bodyTimeout))
		b, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
		if err != nil {
			_ = rc.SetReadDeadline(time.Unix(1, 0)) // the rest is not read
			w.Header().Set("Connection", "close")
			writeError(w, http.StatusRequestTimeout, fmt.Sprintf("the request did not arrive whole within %s", bodyTimeout))
			return
		}
		_ = rc.SetReadDeadline(time.Time{})
		if len(b) > maxBody {
			writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body over %d bytes", maxBody))
			return
		}
		r.Body = io.NopCloser(bytes.NewReader(b))
		h.ServeHTTP(w, r)
	})
}

// create makes the socket with mode 0660 and group gid.
func create(path string, gid uint32) (*net.UnixListener, error) {
	if err := removeStale(path); err != nil {
		return nil, err
	}
	// Create it unreachable, then open it up: no window in which a
	// client could connect with a umask-derived mode.
	old := umask(0o177)
	ln, err := net.Listen("unix", path)
	umask(old)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	ul := ln.(*net.UnixListener)
	ul.SetUnlinkOnClose(true)
	if err := os.Chown(path, -1, int(gid)); err != nil {
		ul.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o660); err != nil {
		ul.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return ul, nil
}

// Guard is the capped listener: an upgrade pauses it and hands its socket
// to the next image.
func (s *Server) Guard() *netguard.Listener { return s.ln }

// HTTP is the server, whose keep-alives an upgrade turns off.
func (s *Server) HTTP() *http.Server { return s.srv }

// KeepSocket leaves the socket file in place when the server stops: the
// next image serves it.
func (s *Server) KeepSocket() { s.unix.SetUnlinkOnClose(false) }

func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("control socket: %s exists and is not a socket; remove it or choose another control_socket", path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("control socket: %s is in use by a running process", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("control socket: remove stale %s: %w", path, err)
	}
	return nil
}

// Run serves until ctx ends, then closes the socket (removing its file).
func (s *Server) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.srv.Serve(s.admit) }()
	select {
	case err := <-errc:
		return fmt.Errorf("control socket: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := s.srv.Shutdown(sctx); err != nil {
		s.srv.Close() // followers of logs -f do not end by themselves
	}
	<-errc
	// Serve may not have taken the listener yet when Shutdown ran; closing
	// it here removes the socket file in every case.
	s.ln.Close() //nolint:errcheck // already closed is fine
	return nil
}

func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+api.PathStatus, s.status)
	mux.HandleFunc("POST "+api.PathOp+"{op}", s.opGate)
	mux.HandleFunc("POST "+api.PathReload, s.mutating(s.reload))
	mux.HandleFunc("POST "+api.PathUpgrade, s.mutating(s.upgrade))
	mux.HandleFunc("GET "+api.PathLogs, s.logs)
	mux.HandleFunc("GET "+api.PathHealth, s.health)
	mux.HandleFunc("GET "+api.PathGPUs, s.gpus)
	mux.HandleFunc("GET "+api.PathDaemon, s.daemon)
	mux.HandleFunc("GET "+api.PathUsage, s.usage)
	return mux
}

// daemon describes the daemon: how it owns the models' processes.
func (s *Server) daemon(w http.ResponseWriter, _ *http.Request) {
	var d api.Daemon
	if s.o.Daemon != nil {
		d = s.o.Daemon()
	}
	writeJSON(w, http.StatusOK, d)
}

func (s *Server) usage(w http.ResponseWriter, _ *http.Request) {
	u := api.Usage{Rows: []api.UsageRow{}}
	if s.o.Usage != nil {
		u = s.o.Usage()
	}
	writeJSON(w, http.StatusOK, u)
}

// mutating admits only root, the daemon's user and its control group.
func (s *Server) mutating(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		p, ok := r.Context().Value(peerKey{}).(Peer)
		if !ok {
			writeError(w, http.StatusForbidden, "permission denied: peer credentials unknown")
			return
		}
		if err := s.authorize(p); err != nil {
			s.o.Logger.Warn("control request refused", zap.String("path", r.URL.Path), zap.Uint32("uid", p.UID), zap.Int32("pid", p.PID))
			writeError(w, http.StatusForbidden, err.Error())
			return
		}
		s.o.Logger.Info("control request", zap.String("path", r.URL.Path), zap.Uint32("uid", p.UID), zap.Int32("pid", p.PID))
		h(w, r)
	}
}

// opGate checks the peer's right to change state for every operation that
// does (api.Op.Mutates, unknown ones included), then runs it.
func (s *Server) opGate(w http.ResponseWriter, r *http.Request) {
	if api.Op(r.PathValue("op")).Mutates() {
		s.mutating(s.op)(w, r)
		return
	}
	s.op(w, r)
}

// authorize says whether peer may change state.
func (s *Server) authorize(p Peer) error {
	if p.UID == 0 || p.UID == s.uid || p.GID == s.gid || slices.Contains(p.Groups, s.gid) {
		return nil
	}
	return fmt.Errorf("permission denied: uid %d is not root, the supervisor's user (uid %d) or in its control group (gid %d): you may read but not change state", p.UID, s.uid, s.gid)
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	st, err := s.o.Backend.Status(r.URL.Query()["model"]...)
	if err != nil {
		writeBackendError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, st)
}

func (s *Server) op(w http.ResponseWriter, r *http.Request) {
	op := api.Op(r.PathValue("op"))
	if !op.Valid() {
		names := make([]string, len(api.Ops))
		for i, o := range api.Ops {
			names[i] = string(o)
		}
		writeError(w, http.StatusNotFound, fmt.Sprintf("unknown operation %s: use %s", clientText(string(op)), strings.Join(names, ", ")))
		return
	}
	var req api.OpRequest
	if err := decode(r, &req); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if len(req.Models) == 0 {
		writeError(w, http.StatusBadRequest, "name at least one model, or all")
		return
	}
	ctx := r.Context()
	if p, ok := ctx.Value(peerKey{}).(Peer); ok {
		ctx = supervisor.WithActor(ctx, fmt.Sprintf("uid %d (pid %d)", p.UID, p.PID))
	}
	res, err := s.o.Backend.Do(ctx, op, req.Models...)
	if err != nil {
		writeBackendError(w, err)
		return
	}
	out := api.OpResponse{Results: make([]api.OpResult, 0, len(res))}
	for name, err := range res {
		r := api.OpResult{Model: name}
		if err != nil {
			r.Error = err.Error()
		}
		out.Results = append(out.Results, r)
	}
	slices.SortFunc(out.Results, func(a, b api.OpResult) int { return strings.Compare(a.Model, b.Model) })
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) reload(w http.ResponseWriter, r *http.Request) {
	if s.o.Reload == nil {
		writeError(w, http.StatusNotImplemented, "reload is not available")
		return
	}
	changes, err := s.o.Reload(r.Context())
	if err != nil {
		writeError(w, http.StatusUnprocessableEntity, err.Error())
		return
	}
	out := api.ReloadResponse{Changes: []api.ReloadChange{}}
	for _, c := range changes {
		out.Changes = append(out.Changes, api.ReloadChange{Model: c.Name, Change: c.Kind.String(), Fields: c.Fields})
	}
	writeJSON(w, http.StatusOK, out)
}

// upgrade prepares the upgrade, answers, and then lets it exec.
func (s *Server) upgrade(w http.ResponseWriter, r *http.Request) {
	if s.o.Upgrade == nil {
		writeError(w, http.StatusNotImplemented, "upgrade in place is not available")
		return
	}
	res, commit, err := s.o.Upgrade(r.Context())
	if err != nil {
		writeError(w, http.StatusConflict, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, res)
	defer func() { go commit() }()
}

func (s *Server) logs(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	name := q.Get("model")
	n := supervisor.OutputLines
	if v := q.Get("n"); v != "" {
		var err error
		if n, err = strconv.Atoi(v); err != nil || n < 0 {
			writeError(w, http.StatusBadRequest, fmt.Sprintf("n=%s: want a whole number", clientText(v)))
			return
		}
	}
	// Subscribe before reading the backlog, so no line falls between.
	var follow <-chan string
	if q.Get("follow") == "1" {
		if adm := admittedOf(r.Context()); adm != nil {
			if why := adm.follow(); why != "" {
				writeError(w, http.StatusTooManyRequests, "too many connections: "+why)
				return
			}
		}
		ch, cancel, err := s.o.Backend.Follow(name)
		if err != nil {
			writeBackendError(w, err)
			return
		}
		defer cancel()
		follow = ch
	}
	lines, err := s.o.Backend.Output(name, n)
	if err != nil {
		writeBackendError(w, err)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	for _, l := range lines {
		io.WriteString(w, l+"\n") //nolint:errcheck // the client went away
	}
	if follow == nil {
		return
	}
	flush := http.NewResponseController(w)
	_ = flush.SetWriteDeadline(time.Now().Add(followWrite))
	if flush.Flush() != nil {
		return
	}
	for {
		select {
		case <-r.Context().Done():
			return
		case l := <-follow:
			_ = flush.SetWriteDeadline(time.Now().Add(followWrite))
			if _, err := io.WriteString(w, l+"\n"); err != nil {
				return
			}
			if flush.Flush() != nil {
				return // a follower that reads nothing is cut
			}
		}
	}
}

func (s *Server) health(w http.ResponseWriter, _ *http.Request) {
	st, err := s.o.Backend.Status()
	if err != nil {
		writeBackendError(w, err)
		return
	}
	out := api.HealthOf(st)
	code := http.StatusOK
	if !out.Healthy {
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, out)
}

func (s *Server) gpus(w http.ResponseWriter, r *http.Request) {
	devs, err := s.o.Backend.GPUs(r.Context())
	if err != nil {
		writeJSON(w, http.StatusOK, api.GPUsResponse{GPUs: []api.GPU{}, Reason: err.Error()})
		return
	}
	out := api.GPUsResponse{GPUs: make([]api.GPU, 0, len(devs))}
	for _, d := range devs {
		out.GPUs = append(out.GPUs, wireGPU(d))
	}
	writeJSON(w, http.StatusOK, out)
}

// wireGPU copies the supervisor's view of a GPU into the wire type;
// TestWireGPU keeps their JSON the same.
func wireGPU(v schedule.GPUView) api.GPU {
	g := api.GPU{
		Index: v.Index, UUID: v.UUID, Name: v.Name, PCIBusID: v.PCIBusID,
		MemoryTotal: v.MemoryTotal, MemoryUsed: v.MemoryUsed, MemoryFree: v.MemoryFree,
		Utilization: v.Utilization, Temperature: v.Temperature, PowerWatts: v.PowerWatts,
		Up: v.Up, Err: v.Err,
		Models: v.Models, Claimed: v.Claimed, Busy: v.Busy, Note: v.Note,
	}
	if v.Processes != nil {
		g.Processes = make([]api.GPUProcess, len(v.Processes))
		for i, p := range v.Processes {
			g.Processes[i] = api.GPUProcess{PID: p.PID, UsedMemory: p.UsedMemory}
		}
	}
	return g
}

func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		// A decoding error may quote the client's input (an unknown
		// field's name): at most a bounded prefix of it.
		msg := err.Error()
		if len(msg) > 2*maxQuoted {
			msg = msg[:2*maxQuoted] + "…"
		}
		return fmt.Errorf("bad request body: %s", msg)
	}
	return nil
}

// maxQuoted bounds what an answer quotes of the client's own input.
const maxQuoted = 80

// clientText quotes s, at most maxQuoted bytes of it, saying its length
// when it is cut.
func clientText(s string) string {
	if len(s) <= maxQuoted {
		return strconv.Quote(s)
	}
	return strconv.Quote(strings.ToValidUTF8(s[:maxQuoted], "")) + fmt.Sprintf("… (%d bytes)", len(s))
}

func writeBackendError(w http.ResponseWriter, err error) {
	if errors.Is(err, supervisor.ErrUnknownModel) {
		writeError(w, http.StatusNotFound, err.Error())
		return
	}
	writeError(w, http.StatusInternalServerError, err.Error())
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, api.ErrorResponse{Error: msg})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(v) //nolint:errcheck // the client went away
}
