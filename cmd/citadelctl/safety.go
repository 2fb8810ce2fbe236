package main

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"syscall"
	"unicode/utf8"

	"golang.org/x/sys/unix"
)

// Set at build time by `make build`.
var (
	version  = "dev"
	revision = "unknown"
)

// visible renders a model's output line so that it cannot act on the
// operator's terminal: escape sequences (colours, cursor moves, title
// changes, OSC 52 clipboard writes), other control characters and bytes
// that are not UTF-8 are shown as \x1b-style text. Tabs stay.
func visible(line string) string {
	var b strings.Builder
	for i := 0; i < len(line); {
		r, size := utf8.DecodeRuneInString(line[i:])
		switch {
		case r == utf8.RuneError && size <= 1:
			fmt.Fprintf(&b, `\x%02x`, line[i])
		case r == '\t':
			b.WriteRune(r)
		case r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0):
			fmt.Fprintf(&b, `\x%02x`, r)
		default:
			b.WriteString(line[i : i+size])
		}
		i += size
	}
	return b.String()
}

// unreachable says why the daemon could not be reached at path, as what
// it is: nothing there, not a socket, no permission, or a socket nobody
// answers on (the daemon is not running). Only the last is exit 3.
func unreachable(path string, err error) (string, int) {
	fi, serr := os.Stat(path)
	switch {
	case errors.Is(serr, os.ErrNotExist):
		return fmt.Sprintf("no control socket at %s: is citadel-supervisor running? (systemctl status citadel-supervisor; or --socket / CITADEL_SOCKET)", path), exitUnreachable
	case errors.Is(serr, os.ErrPermission) || errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM):
		return fmt.Sprintf("permission denied on %s: this user may not use the control socket (it is for root, the daemon's user and the socket's group; see docs/cli.md)", path), exitFailed
	case serr == nil && fi.IsDir():
		return fmt.Sprintf("%s is a directory, not the control socket: name the socket itself with --socket", path), exitUsage
	case serr == nil && fi.Mode().Type() != os.ModeSocket:
		return fmt.Sprintf("%s is not a socket (%s): name the daemon's control_socket with --socket", path, fileKind(fi.Mode())), exitUsage
	}
	return fmt.Sprintf("daemon not reachable at %s: is citadel-supervisor running? (systemctl status citadel-supervisor)", path), exitUnreachable
}

func fileKind(m os.FileMode) string {
	switch {
	case m.IsRegular():
		return "a regular file"
	case m&os.ModeSymlink != 0:
		return "a symbolic link"
	case m&os.ModeNamedPipe != 0:
		return "a named pipe"
	case m&os.ModeDevice != 0:
		return "a device"
	}
	return "not a socket"
}

// terminalWidth reports, for an *os.File, whether it is a terminal and its
// width in columns (TIOCGWINSZ): the real width, not only $COLUMNS.
func terminalWidth(w any) (cols int, tty, isFile bool) {
	f, ok := w.(*os.File)
	if !ok {
		return 0, false, false
	}
	ws, err := unix.IoctlGetWinsize(int(f.Fd()), unix.TIOCGWINSZ)
	if err != nil {
		return 0, false, true
	}
	return int(ws.Col), true, true
}
