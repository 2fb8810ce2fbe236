package config

import "time"

// RoundDuration prints a duration as an operator reads it in a status
// line or a log: 2s, not 1.995s; 12s, not 12.4s; 35ms, not 35.2ms.
func RoundDuration(d time.Duration) time.Duration {
	switch {
	case d >= 10*time.Second:
		return d.Round(time.Second)
	case d >= time.Second:
		return d.Round(100 * time.Millisecond)
	}
	return d.Round(time.Millisecond)
}
