// Package liverestore owns live restore (docs/architecture.md, "Live
// restore"; docs/operations.md, "Upgrade"): how one daemon hands its
// running models to the next instead of stopping them.
//
// Two ways, one state:
//
//   - An upgrade in place: preflight (ask the new binary which handover it
//     takes and whether it accepts the configuration), drain the listeners,
//     freeze every model between two events, write the handover payload to a
//     memfd, and exec the binary with the same PID. The new image reads the
//     payload (Read), takes its listeners and the models' output pipes, and
//     restores each model from its ModelState.
//   - A crash: a daemon that died leaves its models running; its successor
//     finds them (cgroup leaves, markers), and adopts those whose instance
//     record (Records) still matches, with their output pipes from systemd's
//     descriptor store (FDStore).
//
// The supervisor owns the models; this package knows them only as the data
// it hands over (ModelState, InstanceState) and through the small
// interfaces it is given (Freezer, Starter, Notifier, FDStore). The exec
// itself is injected (Upgrader.Exec), so the whole sequence runs in one
// test process. It never imports the supervisor.
package liverestore
