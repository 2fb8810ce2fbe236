package supervisortest

import (
	"os"
	"testing"
)

// TestExitWithoutDelay: the children's GORACE asks for no sleep at exit,
// and an option the caller set comes after it, so it still wins.
func TestExitWithoutDelay(t *testing.T) {
	for _, tc := range []struct{ name, before, want string }{
		{"unset", "", "atexit_sleep_ms=0"},
		{"the caller's options kept, after", "halt_on_error=1", "atexit_sleep_ms=0 halt_on_error=1"},
		{"the caller's own exit sleep wins", "atexit_sleep_ms=500", "atexit_sleep_ms=0 atexit_sleep_ms=500"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("GORACE", tc.before)
			ExitWithoutDelay()
			if got := os.Getenv("GORACE"); got != tc.want {
				t.Errorf("GORACE=%q, want %q", got, tc.want)
			}
		})
	}
}
