package systemd

import (
	"os"
	"slices"
	"sync"

	"github.com/coreos/go-systemd/v22/activation"
	"golang.org/x/sys/unix"

	"citadel-supervisor/supervisor/liverestore"
)

// FDStore is systemd's file descriptor store (FileDescriptorStoreMax= in
// the unit): descriptors sent with FDSTORE=1 are kept by systemd while the
// daemon is gone (a crash, the watchdog) and handed back to the next one
// (LISTEN_FDS, named by LISTEN_FDNAMES). The daemon keeps its models'
// output pipes there, so a model outlives its daemon without losing its
// output or dying of SIGPIPE.
type FDStore struct {
	socket string
	mu     sync.Mutex
	given  map[string]*os.File // handed back at start, not yet taken
}

var _ liverestore.FDStore = (*FDStore)(nil)

// OpenFDStore returns the store when the daemon runs under systemd
// (NOTIFY_SOCKET set), taking the descriptors systemd handed back at start
// (and removing LISTEN_* from the environment). Without systemd, nil.
func OpenFDStore() *FDStore {
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock == "" {
		return nil
	}
	s := &FDStore{socket: sock, given: map[string]*os.File{}}
	for _, f := range activation.Files(true) {
		s.given[f.Name()] = f
	}
	return s
}

// Store sends f to systemd under name.
func (s *FDStore) Store(name string, f *os.File) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = s.send("FDSTORE=1\nFDNAME="+name, int(fd))
	}); err != nil {
		return err
	}
	return serr
}

// Remove makes systemd close its copy of name.
func (s *FDStore) Remove(name string) error {
	return s.send("FDSTOREREMOVE=1\nFDNAME=" + name)
}

// Take returns the descriptor handed back under name, once.
func (s *FDStore) Take(name string) *os.File {
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.given[name]
	delete(s.given, name)
	return f
}

// Rest lists the names handed back and not taken.
func (s *FDStore) Rest() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for name := range s.given {
		out = append(out, name)
	}
	slices.Sort(out)
	return out
}

// send is sd_pid_notify_with_fds: one datagram, the descriptors as
// SCM_RIGHTS (go-systemd's SdNotify sends no descriptors).
func (s *FDStore) send(state string, fds ...int) error {
	sock, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(sock)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	// A leading '@' names an abstract socket; x/sys/unix maps it.
	return unix.Sendmsg(sock, []byte(state), oob, &unix.SockaddrUnix{Name: s.socket}, 0)
}
