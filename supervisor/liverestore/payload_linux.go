package liverestore

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Env names the descriptor holding the previous image's state.
const Env = "CITADEL_HANDOVER_FD"

// Payload is what one image writes for the next: the one handover format.
// Its JSON is the wire between two builds (an upgrade from an earlier
// release reads and writes it), so its fields and their names stay;
// Version says which format it is, and an image refuses another.
type Payload struct {
	Version    int            `json:"version"`
	From       string         `json:"from"`     // the handing image's version
	Upgrades   int            `json:"upgrades"` // upgrades in place before this one
	Listeners  map[string]int `json:"listeners"`
	Supervisor Handover       `json:"supervisor"`
}

// Read reads the previous image's state, when there is one (nil when
// environ names none), and returns environ without Env: the models must
// not see it. Every descriptor the payload names is made close-on-exec at
// once. An error means this image cannot take the handover over: past the
// exec there is no way back, and a successor adopts the models as after a
// crash (docs/operations.md).
func Read(environ []string) (*Payload, []string, error) { return read(environ, HandoverVersion) }

// read is Read by an image that takes handover version takes.
func read(environ []string, takes int) (*Payload, []string, error) {
	v := ""
	kept := environ[:0:0]
	for _, kv := range environ {
		if k, val, _ := strings.Cut(kv, "="); k == Env {
			v = val
			continue
		}
		kept = append(kept, kv)
	}
	os.Unsetenv(Env)
	if v == "" {
		return nil, kept, nil
	}
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return nil, kept, fmt.Errorf("%s=%q: not a descriptor", Env, v)
	}
	f := os.NewFile(uintptr(fd), "handover")
	defer f.Close()
	var p Payload
	if err := json.NewDecoder(f).Decode(&p); err != nil {
		return nil, kept, fmt.Errorf("read the handover: %w", err)
	}
	if p.Version != takes {
		return nil, kept, fmt.Errorf("handover version %d; this binary takes %d", p.Version, takes)
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

// Listener is the inherited listener name, or nil (no payload, or none of
// that name).
func (p *Payload) Listener(name string) (net.Listener, error) {
	if p == nil {
		return nil, nil
	}
	fd, ok := p.Listeners[name]
	if !ok {
		return nil, nil
	}
	// Close-on-exec already: Read marks every inherited descriptor.
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("inherited %s listener: %w", name, err)
	}
	return ln, nil
}

// Inherited is a descriptor the previous image left open for this one (a
// model's output pipe), nil when there is none; it is not passed on to
// the models.
func Inherited(fd int, name string) *os.File {
	if fd <= 2 {
		return nil
	}
	unix.CloseOnExec(fd)
	return os.NewFile(uintptr(fd), name)
}

// memfd writes p into a new memfd, read from its start by the next image;
// the descriptor is inherited across the exec.
func (p *Payload) memfd() (int, error) {
	b, err := json.Marshal(p)
	if err != nil {
		return -1, err
	}
	mfd, err := unix.MemfdCreate("citadel-handover", 0)
	if err != nil {
		return -1, fmt.Errorf("memfd: %w", err)
	}
	for rest := b; len(rest) > 0; {
		n, err := unix.Write(mfd, rest)
		if err != nil && !errors.Is(err, unix.EINTR) {
			unix.Close(mfd)
			return -1, fmt.Errorf("write the handover: %w", err)
		}
		rest = rest[max(n, 0):]
	}
	if _, err := unix.Seek(mfd, 0, io.SeekStart); err != nil {
		unix.Close(mfd)
		return -1, err
	}
	return mfd, nil
}
