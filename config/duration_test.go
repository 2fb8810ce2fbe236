package config

import (
	"testing"
	"time"
)

// TestRoundDuration: delays print as operators read them.
func TestRoundDuration(t *testing.T) {
	for d, want := range map[time.Duration]string{
		1995 * time.Millisecond:  "2s",
		9050 * time.Millisecond:  "9.1s",
		37400 * time.Millisecond: "37s",
		250 * time.Millisecond:   "250ms",
	} {
		if got := RoundDuration(d).String(); got != want {
			t.Errorf("%s: %s, want %s", d, got, want)
		}
	}
}
