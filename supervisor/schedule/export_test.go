package schedule

// Sync returns once s has decided on everything sent to it before.
func Sync(s *Scheduler) {
	done := make(chan struct{})
	s.send(func() { close(done) })
	<-done
}
