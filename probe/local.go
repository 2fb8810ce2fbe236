package probe

import (
	"errors"
	"syscall"
)

// Local reports whether err is the prober's own failure, not the model's:
// the daemon ran out of descriptors (EMFILE, ENFILE), memory (ENOMEM,
// ENOBUFS) or local ports (EADDRNOTAVAIL) while connecting. Such a probe
// says nothing about the model; counting it would restart healthy models
// whenever someone exhausts the daemon.
func Local(err error) bool {
	for _, e := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOMEM, syscall.ENOBUFS, syscall.EADDRNOTAVAIL} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
