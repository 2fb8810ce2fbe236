package liverestore

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// FDStore keeps descriptors past the daemon's death: systemd's file
// descriptor store (FDSTORE=1). The daemon puts each model's output pipes
// there, so a model whose daemon died keeps writing into a pipe someone
// holds (no SIGPIPE, nothing lost up to the pipe's buffer), and the next
// daemon is handed the pipe back and reads on.
type FDStore interface {
	// Store keeps f under name (letters, digits, '@', '.', '-', '_').
	Store(name string, f *os.File) error
	// Remove forgets name.
	Remove(name string) error
	// Take returns the descriptor handed back under name at start, once.
	Take(name string) *os.File
	// Rest returns the names of the descriptors handed back and never
	// taken.
	Rest() []string
}

// Records keeps one file per live instance (InstanceState) in Dir, next
// to the control socket: what a successor needs to tell a predecessor's
// process from a stranger's, and whether its configuration is still the
// same. An empty Dir keeps none.
type Records struct{ Dir string }

// RecordsFor is the records' directory of a daemon whose control socket
// is socket.
func RecordsFor(socket string) Records {
	return Records{Dir: filepath.Join(filepath.Dir(socket), "instances")}
}

func (rs Records) path(key string) string { return filepath.Join(rs.Dir, key+".json") }

// InstanceKey is an instance's record, leaf and descriptor-store name:
// <model>@<token>, the token being the marker's random part.
func InstanceKey(marker string) string {
	parts := strings.Split(marker, "/")
	if len(parts) != 3 {
		return strings.ReplaceAll(marker, "/", "@")
	}
	return parts[1] + "@" + parts[2]
}

// Write replaces is's record.
func (rs Records) Write(is InstanceState) error {
	if rs.Dir == "" {
		return nil
	}
	if err := os.MkdirAll(rs.Dir, 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(is)
	if err != nil {
		return err
	}
	// A temporary file of its own: two writers of one record (the runner,
	// a sleep about to begin) never rename each other's file away.
	p := rs.path(InstanceKey(is.Marker))
	f, err := os.CreateTemp(rs.Dir, filepath.Base(p)+".*.tmp")
	if err != nil {
		return err
	}
	_, err = f.Write(b)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), p)
	}
	if err != nil {
		_ = os.Remove(f.Name())
	}
	return err
}

// Remove forgets the record of the instance with marker.
func (rs Records) Remove(marker string) {
	if rs.Dir != "" {
		_ = os.Remove(rs.path(InstanceKey(marker)))
	}
}

// All reads every record, by key.
func (rs Records) All() (map[string]InstanceState, error) {
	out := map[string]InstanceState{}
	if rs.Dir == "" {
		return out, nil
	}
	ents, err := os.ReadDir(rs.Dir)
	if errors.Is(err, os.ErrNotExist) {
		return out, nil
	}
	if err != nil {
		return out, err
	}
	var errs []error
	for _, e := range ents {
		key, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok {
			_ = os.Remove(filepath.Join(rs.Dir, e.Name())) // a write cut short
			continue
		}
		b, err := os.ReadFile(filepath.Join(rs.Dir, e.Name()))
		var is InstanceState
		if err == nil {
			err = json.Unmarshal(b, &is)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("instance record %s: %w", e.Name(), err))
			continue
		}
		out[key] = is
	}
	return out, errors.Join(errs...)
}

// ErrAlreadyRunning means another supervisor holds this identity's lock.
var ErrAlreadyRunning = errors.New("another citadel-supervisor is running with this control_socket")

// LockIdentity takes an exclusive lock next to the control socket, so two
// supervisors never share an identity: each would take the other's children
// for leftovers. The lock dies with the process, also on SIGKILL, and is
// not inherited across an upgrade's exec (the next image takes it again).
func LockIdentity(socket string) (func(), error) {
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
