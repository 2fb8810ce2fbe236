// Package lifecycle is one model's lifecycle as a pure state machine: the
// states of docs/architecture.md, driven by typed events (EvSpawned,
// EvProbed, EvStopped, ...), answering with typed effects (EfSpawn,
// EfProbe, EfStop, ...). It does no I/O, starts no goroutine and reads no
// clock of its own: the supervisor's runner carries out the effects
// (spawning, stopping, probing, timers, GPU claims) and feeds their
// outcomes back as events, so the whole lifecycle is tested step by step
// without processes or sleeps; testdata/transitions.txt is its table of
// state × event.
//
// The runner drives a Machine only through its methods: New, Begin or
// Restore, Step, and the accessors and published Status it reads. The
// process a machine runs is known to it as an Instance, its identity as
// plain data; the handles (pidfd, process tree, pipes) stay the runner's.
//
// It imports nothing of package supervisor.
package lifecycle
