package supervisor

import (
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/vllm"
)

// The machine's part of knowing the model's vLLM (versions.go): a feature
// its version lacks is not used, and the model keeps serving, saying why.

// onLearned takes the lookup's answer. One that failed makes the model the
// newest vLLM known, with a warning, until its GET /version answers.
func (m *machine) onLearned(ev evLearned) []effect {
	if ev.seq != m.learnSeq || !m.learning {
		return nil // for a command no longer in force
	}
	m.learning = false
	if ev.err != nil {
		m.vllm = vllmInfo{version: vllm.Newest, source: VersionAssumed}
		m.log.Warn("cannot learn the model's vLLM version before it starts; taking it for the newest known until its GET /version answers",
			zap.String("assumed", vllm.Newest.String()), zap.Error(ev.err))
	} else {
		m.vllm = vllmInfo{version: ev.version, source: VersionFromPackage}
		m.log.Info("vLLM version", zap.String("version", ev.version.String()), zap.String("from", "package metadata"))
		if ev.version.Compare(vllm.Oldest) < 0 {
			m.log.Warn("this vLLM is older than any the supervisor is built for (docs/vllm.md)", zap.String("version", ev.version.String()), zap.String("oldest", vllm.Oldest.String()))
		}
	}
	if m.state == Pending && m.flight != flightWant && m.cause == CauseChecking {
		return m.wantGPUs()
	}
	return nil
}

// confirmVersion takes what the running model's GET /version said.
func (m *machine) confirmVersion(s string) {
	v, err := vllm.Parse(s)
	if err != nil {
		m.log.Warn("GET /version answered something else than a version", zap.String("answer", s))
		m.vllm.source = VersionFromServer // asked; do not ask again
		return
	}
	if m.vllm.known() && m.vllm.version.Compare(v) != 0 {
		m.log.Warn("the running vLLM's version differs from what was learned before its start; its own is taken",
			zap.String("before", m.vllm.version.String()), zap.String("from", m.vllm.source), zap.String("server", v.String()))
	}
	m.vllm = vllmInfo{version: v, source: VersionFromServer}
}

// askVersion reports whether the next probe should ask GET /version.
func (m *machine) askVersion() bool { return m.vllm.source != VersionFromServer }

// effectiveLevel is the level the model sleeps at: its sleep_level, less
// when its vLLM lacks what that level needs, or than its process was
// started for (no --enable-sleep-mode: level 0). why says why it is less.
func (m *machine) effectiveLevel() (int, string) {
	want := m.cfg.SleepLevel
	if !m.cfg.OnDemand() || want == 0 {
		return 0, ""
	}
	level, why := want, ""
	if m.vllm.known() {
		level, why = m.vllm.version.SleepLevel(want)
	}
	if m.inst != nil && !m.inst.sleepMode && level > 0 {
		level = 0
		if why == "" {
			why = "its process was started without sleep mode; it sleeps from its next start"
		}
	}
	return level, why
}

// spawnConfig is the configuration a spawn builds the child's command line
// and environment from: its sleep_level as its vLLM can have it (an older
// vLLM exits at start on --enable-sleep-mode), and, where its vLLM has it
// (0.18), --shutdown-timeout: a second line of defence behind the drain
// before a planned stop, so a request still in flight at SIGTERM finishes
// within the grace rather than being aborted. Neither is in the spawn
// digest: a running model is never restarted for them.
func (m *machine) spawnConfig() config.Model {
	c := m.cfg
	if !m.vllm.known() {
		return c
	}
	if c.OnDemand() && c.SleepLevel > 0 {
		c.SleepLevel, _ = m.vllm.version.SleepLevel(c.SleepLevel)
	}
	// Only on a version learned, never one assumed (the newest, while the
	// lookup could not tell): an older vLLM would exit at start on the
	// flag and go on doing so until the start limit failed it. The first
	// GET /version settles it for the next spawn.
	if m.vllm.source != VersionAssumed && m.vllm.version.Has(vllm.ShutdownTimeout) && !hasFlag(c.Args, "--shutdown-timeout") {
		secs := max(int((sigtermGrace(c.StopTimeout)-time.Second)/time.Second), 1)
		c.Args = append(slices.Clip(c.Args), "--shutdown-timeout", strconv.Itoa(secs))
	}
	return c
}

// hasFlag reports whether args sets flag (as "--flag value" or
// "--flag=value"): an operator's own value is kept.
func hasFlag(args []string, flag string) bool {
	return slices.ContainsFunc(args, func(a string) bool { return a == flag || strings.HasPrefix(a, flag+"=") })
}

// learnIfUnknown looks up the version of a running model the machine does
// not know (taken over from a daemon that did not write it down).
func (m *machine) learnIfUnknown() []effect {
	if m.vllm.known() || m.learning || m.inst == nil {
		return nil
	}
	m.learning = true
	m.learnSeq++
	return []effect{efLearn{seq: m.learnSeq}}
}

// hasIsSleeping reports whether its vLLM answers GET /is_sleeping (0.8.0,
// vllm#14312); on 0.7.3-0.7.x a sleep or wake is taken at its word.
func (m *machine) hasIsSleeping() bool {
	return !m.vllm.known() || m.vllm.version.Has(vllm.IsSleeping)
}

// deepestLevel is the deepest sleep its vLLM and command line allow,
// whatever sleep_level says: the host memory budget may deepen a level-1
// sleep to 2, where there is a level 2 to go to.
func (m *machine) deepestLevel() int {
	switch {
	case m.inst != nil && !m.inst.sleepMode:
		return 0
	case !m.vllm.known():
		return 2
	}
	return m.vllm.version.MaxSleepLevel()
}
