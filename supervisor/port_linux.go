package supervisor

import (
	"errors"
	"fmt"
	"net"
	"strconv"
	"syscall"

	"citadel-supervisor/supervisor/proc"
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
		pid, comm := proc.PortHolder(port)
		return &PortInUseError{Port: port, PID: pid, Comm: comm}
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		return fmt.Errorf("host %s is not an address of this machine", host)
	default:
		return fmt.Errorf("port %d: %w", port, err)
	}
}
