package supervisor

import (
	"errors"
	"io/fs"
	"strings"

	"citadel-supervisor/supervisor/proc"
)

// Ownership modes, as citadel_ownership_mode, the log and `citadelctl
// status` name them.
const (
	OwnershipCgroup = "cgroup" // every instance in a cgroup v2 leaf of its own
	OwnershipMarker = "marker" // the marker variable, parent links and the subreaper
)

// OwnershipModes lists the modes, for the metric's zero series.
var OwnershipModes = []string{OwnershipCgroup, OwnershipMarker}

// Ownership is the mode in force.
func (s *Supervisor) Ownership() string {
	if s.d.cgroups != nil {
		return OwnershipCgroup
	}
	return OwnershipMarker
}

func (s *Supervisor) cgroupRoot() string {
	if s.d.cgroups != nil {
		return s.d.cgroups.Root
	}
	return ""
}

// CgroupRoot is the directory holding the models' cgroup leaves, "" in
// marker mode.
func (s *Supervisor) CgroupRoot() string { return s.cgroupRoot() }

// accounts reports whether some model accounts for pid, an orphan the
// daemon inherited as subreaper: a known member of a model's tree, a
// process in one of the models' cgroup leaves, or a carrier of this
// supervisor's marker (a live model's worker that no refresh has seen
// yet; a stop's sweep finds it).
func (s *Supervisor) accounts(pid int) bool {
	if _, ok := s.owners()[pid]; ok {
		return true
	}
	if s.d.cgroups != nil && s.d.cgroups.Holds(pid) {
		return true
	}
	v, ok, err := proc.LookupEnviron(pid, proc.MarkerEnv)
	switch {
	case err == nil:
		return ok && strings.HasPrefix(v, s.d.id+"/")
	case errors.Is(err, fs.ErrPermission), errors.Is(err, proc.ErrGone):
		// A child that hides its environment from its own supervisor
		// (PR_SET_DUMPABLE 0) is nobody's.
		return false
	default:
		return true // cannot tell (EMFILE, ENOMEM): never kill on doubt
	}
}
