package probe

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"
	"testing"
)

func TestLocal(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"emfile in a dial", &net.OpError{Op: "dial", Err: os.NewSyscallError("socket", syscall.EMFILE)}, true},
		{"enfile", fmt.Errorf("probe: %w", syscall.ENFILE), true},
		{"enomem", syscall.ENOMEM, true},
		{"no local port", &net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.EADDRNOTAVAIL)}, true},
		{"refused is the model's", ErrRefused, false},
		{"reset is the model's", syscall.ECONNRESET, false},
		{"http 503 is the model's", &StatusError{Code: 503}, false},
		{"timeout is the model's", context.DeadlineExceeded, false},
		{"nil", nil, false},
		{"other", errors.New("x"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Local(tc.err); got != tc.want {
				t.Errorf("Local(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
}
