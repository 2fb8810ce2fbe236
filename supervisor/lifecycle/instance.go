package lifecycle

import (
	"errors"
	"os"
	"time"

	"citadel-supervisor/vllm"
)

// Instance is a spawned process tree of a model as the machine knows it:
// its identity and what it was started with, as plain data. The runner
// keeps the handles (pidfd, process tree, output pipes) beside it; the
// machine tells one instance from another by this pointer.
type Instance struct {
	PID     int
	Started time.Time
	GPUs    []string
	// SleepMode: it was started with vLLM's sleep mode
	// (--enable-sleep-mode): it can be put to sleep; without, it is
	// stopped instead.
	SleepMode bool
	// Adopted: not the daemon's child (taken over after its daemon died).
	Adopted bool
	// Exit is how its main process ended, once it was reaped.
	Exit Exit
}

// Exit is how a process ended.
type Exit struct {
	Code int // the exit code, or 128+signal
	Desc string
}

// VLLM is what a machine knows of its model's vLLM.
type VLLM struct {
	Version vllm.Version
	Source  string // VersionFrom*, or VersionAssumed
}

// Known reports whether the version is known.
func (v VLLM) Known() bool { return !v.Version.IsZero() }

// ErrNoVerdict marks a probe that failed for the daemon's own reason (out
// of descriptors, memory or local ports): the machine counts it neither
// for nor against the model.
var ErrNoVerdict = errors.New("probe not made")

// recheckInterval is how often a pending model re-checks what it waits for
// (storage, env files, port).
const recheckInterval = 2 * time.Second

// MaxStartupPoll bounds the probe interval while a model is starting, so a
// model is seen ready within a second of answering even with a 10 s period.
const MaxStartupPoll = time.Second

// SigtermGrace is the part of stop_timeout left between SIGTERM and
// SIGKILL after a planned stop's drain (half of it, at most 5 s), in which
// vLLM shuts its engine down and gives its GPU memory back.
func SigtermGrace(stopTimeout time.Duration) time.Duration {
	return min(stopTimeout/2, 5*time.Second)
}

// errText is an error's message without Go's "open "/"stat " prefixes for
// path errors, which read oddly in a status line.
func errText(err error) string {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}
