package fakevllm

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"syscall"
)

// boundSocket is a TCP socket bound to the model's port and not yet
// listening, as vLLM's create_server_socket leaves it while the weights
// load (bind, no listen: vllm#8204): the port is taken, and a connection
// to it is refused (the kernel answers RST).
type boundSocket struct{ fd int }

func bindOnly(o *options) (*boundSocket, error) {
	host := o.host
	if host == "" || host == "localhost" {
		host = "127.0.0.1"
	}
	addr, err := netip.ParseAddr(host)
	if err != nil {
		return nil, fmt.Errorf("--host %q: %w", o.host, err)
	}
	family := syscall.AF_INET
	if addr.Is6() && !addr.Is4In6() {
		family = syscall.AF_INET6
	}
	fd, err := syscall.Socket(family, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	// As vLLM: SO_REUSEADDR and SO_REUSEPORT.
	for _, opt := range []int{syscall.SO_REUSEADDR, 0xf /* SO_REUSEPORT */} {
		if err := syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, opt, 1); err != nil {
			syscall.Close(fd)
			return nil, err
		}
	}
	var sa syscall.Sockaddr
	if family == syscall.AF_INET {
		sa = &syscall.SockaddrInet4{Port: o.port, Addr: addr.Unmap().As4()}
	} else {
		sa = &syscall.SockaddrInet6{Port: o.port, Addr: addr.As16()}
	}
	if err := syscall.Bind(fd, sa); err != nil {
		syscall.Close(fd)
		return nil, err
	}
	return &boundSocket{fd: fd}, nil
}

// listen makes the bound socket a listener: loading is done.
func (b *boundSocket) listen() (net.Listener, error) {
	if err := syscall.Listen(b.fd, syscall.SOMAXCONN); err != nil {
		syscall.Close(b.fd)
		return nil, err
	}
	f := os.NewFile(uintptr(b.fd), "vllm:"+strconv.Itoa(b.fd))
	defer f.Close() // FileListener holds a dup
	return net.FileListener(f)
}
