package control

import (
	"bufio"
	"context"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Peer is who is on the other end of a control connection, from the kernel
// (SO_PEERCRED), not from anything the client says.
type Peer struct {
	PID    int32
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary groups, from /proc/PID/status
}

type peerKey struct{}

// withPeer stores the connection's peer credentials, read when it was
// admitted (admit.go), and its place in its context.
func withPeer(ctx context.Context, c net.Conn) context.Context {
	ac, ok := c.(*admittedConn)
	if !ok {
		if p, ok := peerCred(c); ok {
			return context.WithValue(ctx, peerKey{}, p)
		}
		return ctx
	}
	ctx = context.WithValue(ctx, admittedKey{}, ac.adm)
	if ac.adm.known {
		ctx = context.WithValue(ctx, peerKey{}, ac.adm.peer)
	}
	return ctx
}

// peerCred reads the peer of a Unix connection from the kernel.
func peerCred(c net.Conn) (Peer, bool) {
	for {
		w, ok := c.(interface{ NetConn() net.Conn })
		if !ok {
			break
		}
		c = w.NetConn() // the connection cap's wrappers
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Peer{}, false
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Peer{}, false
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil || credErr != nil {
		return Peer{}, false
	}
	return Peer{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid, Groups: groupsOf(cred.Pid, cred.Uid)}, true
}

// groupsOf reads a process's supplementary groups, as the kernel holds
// them for that process now (what it also used to let the peer open the
// socket file), rather than what the group database says of the user:
// those differ until the user logs in again, and a database lookup may go
// over the network. If the process is gone, or its PID now belongs to a
// process of another effective user, it has none: the peer is then judged
// on its uid and primary gid alone, which can only refuse more.
func groupsOf(pid int32, uid uint32) []uint32 {
	f, err := os.Open("/proc/" + strconv.Itoa(int(pid)) + "/status")
	if err != nil {
		return nil
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "Uid:"); ok {
			f := strings.Fields(rest) // real, effective, saved, fs
			if len(f) < 2 || f[1] != strconv.FormatUint(uint64(uid), 10) {
				return nil
			}
			continue
		}
		rest, ok := strings.CutPrefix(sc.Text(), "Groups:")
		if !ok {
			continue
		}
		var out []uint32
		for _, g := range strings.Fields(rest) {
			if n, err := strconv.ParseUint(g, 10, 32); err == nil {
				out = append(out, uint32(n))
			}
		}
		return out
	}
	return nil
}

func umask(m int) int { return unix.Umask(m) }
