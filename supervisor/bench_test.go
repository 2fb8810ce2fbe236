package supervisor

import (
	"syscall"
	"testing"
	"time"
)

// BenchmarkKillRespawn measures kill -9 of a ready model → its replacement
// spawned (restart.delay 0), and → the replacement ready. Real processes.
func BenchmarkKillRespawn(b *testing.B) {
	h := newHarness(b, modelSpec{Name: "m", YAML: "restart: {delay: 0s, max_delay: 0s, burst: 1000000, interval: 1h}"}).start(Options{})
	waitReady := func(notPID int) Status {
		var st Status
		waitFor(b, 20*time.Second, "a ready replacement", func() bool {
			st = h.status("m")
			return st.State == Ready && st.PID != notPID
		})
		return st
	}
	cur := waitReady(0)
	var respawn, ready time.Duration
	b.ResetTimer()
	for range b.N {
		killed := time.Now()
		if err := syscall.Kill(cur.PID, syscall.SIGKILL); err != nil {
			b.Fatal(err)
		}
		next := waitReady(cur.PID)
		respawn += next.StartedAt.Sub(killed)
		ready += next.ReadyAt.Sub(killed)
		cur = next
	}
	b.ReportMetric(float64(respawn.Microseconds())/float64(b.N)/1000, "ms-to-respawn")
	b.ReportMetric(float64(ready.Microseconds())/float64(b.N)/1000, "ms-to-ready")
}
