package supervisor

import (
	"errors"
	"io/fs"

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

// liveMarker reports whether v is the marker of a live instance: one whose
// stop has not begun. A process with the marker of a stopped instance
// (a link of a chain that forked past its stop) is a stray.
func (s *Supervisor) liveMarker(v string) bool {
	if h := s.handedOver.Load(); h != nil && (*h)[v] {
		return true
	}
	for _, r := range s.withLeaving() {
		if m := r.marker.Load(); m != nil && *m == v {
			return true
		}
	}
	return false
}

// accounts reports whether some model accounts for pid, an orphan the
// daemon inherited as subreaper: a known member of a model's tree, a
// process in one of the models' cgroup leaves, or a carrier of the marker
// of a live instance (a worker that no refresh has seen yet).
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
		return ok && s.liveMarker(v)
	case errors.Is(err, fs.ErrPermission), errors.Is(err, proc.ErrGone):
		// A child that hides its environment from its own supervisor
		// (PR_SET_DUMPABLE 0) is nobody's.
		return false
	default:
		return true // cannot tell (EMFILE, ENOMEM): never kill on doubt
	}
}
