package lifecycle

import (
	"fmt"
	"testing"
	"time"

	"citadel-supervisor/config"
)

var policy = config.Restart{
	Delay: 10 * time.Second, MaxDelay: 5 * time.Minute, ResetAfter: 10 * time.Minute,
	Burst: 5, Interval: 30 * time.Minute,
}

func TestBackoffDelay(t *testing.T) {
	cases := []struct {
		n      int
		jitter float64
		want   time.Duration
	}{
		{1, 0.5, 10 * time.Second},
		{2, 0.5, 20 * time.Second},
		{3, 0.5, 40 * time.Second},
		{5, 0.5, 160 * time.Second},
		{6, 0.5, 5 * time.Minute}, // 320 s capped
		{60, 0.5, 5 * time.Minute},
		{1, 0, 9 * time.Second},         // −10 %
		{1, 0.999999, 11 * time.Second}, // +10 %
		{3, 0, 36 * time.Second},
		// At the cap the jitter still spreads: models that crashed
		// together must not all come back at exactly max_delay.
		{6, 0, 270 * time.Second},         // 5m −10 %
		{60, 0, 270 * time.Second},        // 5m −10 %
		{60, 0.25, 285 * time.Second},     // 5m −5 %
		{60, 0.999999, 330 * time.Second}, // 5m +10 %
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("n=%d,jitter=%g", tc.n, tc.jitter), func(t *testing.T) {
			got := backoffDelay(policy, tc.n, tc.jitter).Round(time.Second)
			if got != tc.want {
				t.Errorf("got %s, want %s", got, tc.want)
			}
		})
	}
	// Two models at the cap with different jitter draws restart apart.
	if a, b := backoffDelay(policy, 20, 0.6), backoffDelay(policy, 20, 0.9); a == b {
		t.Errorf("capped delays with jitter 0.6 and 0.9 are both %s: lockstep", a)
	}
	if d := backoffDelay(config.Restart{MaxDelay: time.Minute}, 4, 0.9); d != 0 {
		t.Errorf("delay 0 must stay 0 (kill -9 → immediate respawn), got %s", d)
	}
}

// TestRestartTracker walks a model through failures on an injected clock.
func TestRestartTracker(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	type step struct {
		at         time.Duration // since t0
		readyFor   time.Duration
		wantDelay  time.Duration
		wantFailed bool
	}
	cases := []struct {
		name  string
		steps []step
	}{
		{"doubles while crashing", []step{
			{0, 0, 10 * time.Second, false},
			{time.Minute, 0, 20 * time.Second, false},
			{2 * time.Minute, 0, 40 * time.Second, false},
		}},
		{"ready for reset_after clears the backoff", []step{
			{0, 0, 10 * time.Second, false},
			{time.Minute, 0, 20 * time.Second, false},
			{15 * time.Minute, 11 * time.Minute, 10 * time.Second, false},
		}},
		{"burst starts within interval fail", []step{
			{0, 0, 10 * time.Second, false},
			{time.Minute, 0, 20 * time.Second, false},
			{2 * time.Minute, 0, 40 * time.Second, false},
			{3 * time.Minute, 0, 80 * time.Second, false},
			{4 * time.Minute, 0, 0, true},
		}},
		{"starts older than interval do not count", []step{
			{0, 0, 10 * time.Second, false},
			{10 * time.Minute, 0, 20 * time.Second, false},
			{20 * time.Minute, 0, 40 * time.Second, false},
			{30 * time.Minute, 0, 80 * time.Second, false},
			{40 * time.Minute, 0, 160 * time.Second, false}, // the first start aged out
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var tr restartTracker
			for i, s := range tc.steps {
				now := t0.Add(s.at)
				tr.started(now.Add(-time.Second))
				d, failed := tr.afterFailure(policy, now, s.readyFor, 0.5)
				if d.Round(time.Second) != s.wantDelay || failed != s.wantFailed {
					t.Errorf("step %d: got (%s, %v), want (%s, %v)", i, d, failed, s.wantDelay, s.wantFailed)
				}
			}
		})
	}
}
