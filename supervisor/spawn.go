package supervisor

import (
	"maps"
	"slices"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/proc"
)

// childEnv is the child's environment: config.Model.ChildEnv (SPEC §2, with
// the variables the supervisor owns) plus this instance's marker, by which
// package proc finds every process the instance starts. The marker is an
// EnvPrefix variable, so no model's env can set it nor inherit the daemon's.
func childEnv(base []string, m config.Model, secrets map[string]string, gpus []string, marker string) []string {
	return m.ChildEnv(base, secrets, gpus, map[string]string{proc.MarkerEnv: marker})
}

func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}
