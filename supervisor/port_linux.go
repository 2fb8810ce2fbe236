package supervisor

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
)

// PortInUseError says who holds a model's port.
type PortInUseError struct {
	Port int
	PID  int    // 0 when the holder is not visible to this user
	Comm string // the holder's process name, for the operator; never matched on
}

func (e *PortInUseError) Error() string {
	if e.PID == 0 {
		return fmt.Sprintf("port %d in use (holder not visible to this user)", e.Port)
	}
	return fmt.Sprintf("port %d in use by pid %d (%s)", e.Port, e.PID, e.Comm)
}

// checkPort test-binds host:port. vLLM listens with SO_REUSEPORT, so a
// second vLLM could share a port silently; this bind sets no SO_REUSEPORT
// and so fails while anyone listens there, which is what must be known
// before spawning. Go sets SO_REUSEADDR, so TIME_WAIT sockets left by the
// previous instance do not block the check (vLLM sets it too).
func checkPort(host string, port int) error {
	ln, err := net.Listen("tcp", net.JoinHostPort(host, strconv.Itoa(port)))
	if err == nil {
		return ln.Close()
	}
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		pid, comm := portHolder(port)
		return &PortInUseError{Port: port, PID: pid, Comm: comm}
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return fmt.Errorf("host %s is not an address of this machine", host)
	default:
		return fmt.Errorf("port %d: %w", port, err)
	}
}

// portHolder finds the process listening on port: the socket's inode from
// /proc/net/tcp{,6}, then the process holding that inode open.
func portHolder(port int) (int, string) {
	inodes := map[string]bool{}
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		listeningInodes(f, port, inodes)
	}
	if len(inodes) == 0 {
		return 0, ""
	}
	pids, err := allPIDs()
	if err != nil {
		return 0, ""
	}
	for _, pid := range pids {
		fds, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/fd/*")
		for _, fd := range fds {
			link, err := os.Readlink(fd)
			if err != nil || !strings.HasPrefix(link, "socket:[") {
				continue
			}
			if inodes[strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")] {
				s, err := readStat(pid)
				if err != nil {
					continue
				}
				return pid, s.Comm
			}
		}
	}
	return 0, ""
}

// listeningInodes adds the inodes of sockets in LISTEN state on port.
func listeningInodes(path string, port int, out map[string]bool) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	want := fmt.Sprintf(":%04X", port)
	sc := bufio.NewScanner(f)
	sc.Scan() // header
	for sc.Scan() {
		// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
		fields := strings.Fields(sc.Text())
		if len(fields) < 10 || fields[3] != "0A" || !strings.HasSuffix(fields[1], want) {
			continue
		}
		out[fields[9]] = true
	}
}
