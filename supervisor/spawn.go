package supervisor

import (
	"errors"
	"maps"
	"slices"
	"syscall"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/proc"
)

// childEnv is the child's environment: config.Model.ChildEnv (docs/configuration.md, with
// the variables the supervisor owns) plus this instance's marker, by which
// package proc finds every process the instance starts. The marker is an
// EnvPrefix variable, so no model's env can set it nor inherit the daemon's.
func childEnv(base []string, m config.Model, secrets map[string]string, gpus []string, marker string) []string {
	return m.ChildEnv(base, secrets, gpus, map[string]string{proc.MarkerEnv: marker})
}

func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}

// daemonShort reports whether a spawn failed for want of the daemon's own
// resources: descriptors (EMFILE, ENFILE), memory (ENOMEM) or processes
// (EAGAIN from fork or clone). Such a failure says nothing about the model.
func daemonShort(err error) bool {
	for _, e := range []syscall.Errno{syscall.EMFILE, syscall.ENFILE, syscall.ENOMEM, syscall.EAGAIN} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}
