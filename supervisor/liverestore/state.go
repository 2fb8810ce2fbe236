package liverestore

import (
	"time"

	"citadel-supervisor/probe"
	"citadel-supervisor/supervisor/control/api"
)

// HandoverVersion is the version of the state one image hands the next.
// An image refuses a handover of another version, and the old image asks
// the new binary which version it takes before it execs it.
const HandoverVersion = 1

// Handover is what an image hands the next across an upgrade.
type Handover struct {
	Version int          `json:"version"`
	Models  []ModelState `json:"models"`
}

// Markers are the markers of the instances handed over.
func (h *Handover) Markers() map[string]bool {
	out := map[string]bool{}
	for _, m := range h.Models {
		if is := m.Instance; is != nil {
			out[is.Marker] = true
		}
	}
	return out
}

// Children are the PIDs of the handed-over instances that are this
// process's children: all but those a predecessor adopted after a crash
// (re-parented, they are not).
func (h *Handover) Children() []int {
	var out []int
	for _, m := range h.Models {
		if is := m.Instance; is != nil && !is.Adopted {
			out = append(out, is.PID)
		}
	}
	return out
}

// ModelState is one model's lifecycle, written down between two events.
type ModelState struct {
	Name        string         `json:"name"`
	State       api.State      `json:"state"`
	Reason      string         `json:"reason"`
	Since       time.Time      `json:"since"`
	Hold        bool           `json:"hold,omitempty"`
	HoldReason  string         `json:"hold_reason,omitempty"`
	Restarts    map[string]int `json:"restarts,omitempty"`
	Starts      []time.Time    `json:"starts,omitempty"` // the start limit's window
	Failures    int            `json:"failures,omitempty"`
	LastExit    *ExitState     `json:"last_exit,omitempty"`
	LastOutput  []string       `json:"last_output,omitempty"` // kept when it failed
	Output      []string       `json:"output,omitempty"`      // the output ring
	TimerAt     time.Time      `json:"timer_at,omitzero"`     // when a backoff or a failed retry ends
	LastRequest time.Time      `json:"last_request,omitzero"`
	// WakeTimes are its engine's recent wakes by level, from which
	// wake_timeout 0 derives the bound of the next.
	WakeTimes map[int][]time.Duration `json:"wake_times,omitempty"`
	// Instance is the live process, nil when none runs.
	Instance *InstanceState `json:"instance,omitempty"`
}

// ExitState is a process's last exit.
type ExitState struct {
	Code int    `json:"code"`
	Desc string `json:"desc"`
}

// InstanceState is one spawned process tree. Written at spawn as the
// instance record (Records), so a successor can tell a predecessor's
// process from a stranger's; carried whole across an upgrade.
type InstanceState struct {
	Model     string    `json:"model"`
	PID       int       `json:"pid"`
	Start     uint64    `json:"start"` // /proc start time: with PID, the process's identity
	Marker    string    `json:"marker"`
	Cgroup    string    `json:"cgroup,omitempty"` // its leaf; "" in marker mode
	Started   time.Time `json:"started"`
	GPUs      []string  `json:"gpus"`
	Digest    string    `json:"digest"` // config.Model.SpawnDigest it was started with
	EnvDigest string    `json:"env_digest,omitempty"`
	// What the runner knew of it; zero in a record (a crash).
	ReadyAt    time.Time     `json:"ready_at,omitzero"`
	Startup    time.Duration `json:"startup,omitempty"`
	AwakeAt    time.Time     `json:"awake_at,omitzero"`
	SleepLevel int           `json:"sleep_level,omitempty"` // > 0: asleep at this level
	SleepCause string        `json:"sleep_cause,omitempty"`
	// SleepBegan: the daemon was putting it to sleep (the record is
	// written just before /sleep): a successor takes it for asleep, even
	// if the engine still says awake (it does until /sleep returns).
	SleepBegan time.Time `json:"sleep_began,omitzero"`
	// WakeBegan: the daemon was waking it (wake_up sent, not proven yet):
	// a successor takes it for asleep at SleepLevel, its memory changing
	// for a while.
	WakeBegan time.Time `json:"wake_began,omitzero"`
	// SleepMode: it was started with vLLM's sleep mode (false: its vLLM
	// had none then, or it does not sleep), so no sleep is asked of it
	// without. Absent in records of earlier versions: then as its
	// configuration says (the digest covered sleep_level).
	SleepMode *bool  `json:"sleep_mode,omitempty"`
	HostHeld  uint64 `json:"host_held,omitempty"`
	// Known is the canary's answer recorded after the process started,
	// which its wakes must give again; KnownNote says why there is none.
	Known     *probe.Answer `json:"known,omitempty"`
	KnownNote string        `json:"known_note,omitempty"`
	// Held is what it held on each GPU before it last slept: its wake
	// asks for that much again.
	Held map[string]uint64 `json:"held,omitempty"`
	// Adopted: the process is not the daemon's child (a successor adopted
	// it after its parent daemon died): an upgrade hands it on as such,
	// and the next image watches it through a pidfd, not wait4.
	Adopted bool `json:"adopted,omitempty"`
	// Its vLLM, as known when the state was written ("" unknown: learned
	// again).
	VLLMVersion string `json:"vllm_version,omitempty"`
	VLLMSource  string `json:"vllm_source,omitempty"`
	// Its output pipes' read ends: descriptor numbers in the next image
	// (an upgrade), or names in systemd's descriptor store (a crash).
	StdoutFD int `json:"stdout_fd,omitempty"`
	StderrFD int `json:"stderr_fd,omitempty"`
}
