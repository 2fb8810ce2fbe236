package lifecycle

import (
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/vllm"
)

// The machine's part of knowing the model's vLLM (the lookup is the runner's, supervisor/versions.go): a feature
// its version lacks is not used, and the model keeps serving, saying why.

// onLearned takes the lookup's answer. One that failed makes the model the
// newest vLLM known, with a warning, until its GET /version answers.
func (m *Machine) onLearned(ev EvLearned) []Effect {
	if ev.Seq != m.learnSeq || !m.learning {
		return nil // for a command no longer in force
	}
	m.learning = false
	if ev.Err != nil {
		m.vllm = VLLM{Version: vllm.Newest, Source: VersionAssumed}
		m.log.Warn("cannot learn the model's vLLM version before it starts; taking it for the newest known until its GET /version answers",
			zap.String("assumed", vllm.Newest.String()), zap.Error(ev.Err))
	} else {
		m.vllm = VLLM{Version: ev.Version, Source: VersionFromPackage}
		m.log.Info("vLLM version", zap.String("version", ev.Version.String()), zap.String("from", "package metadata"))
		if ev.Version.Compare(vllm.Oldest) < 0 {
			m.log.Warn("this vLLM is older than any the supervisor is built for (docs/vllm.md)", zap.String("version", ev.Version.String()), zap.String("oldest", vllm.Oldest.String()))
		}
	}
	if m.state == Pending && m.flight != flightWant && m.cause == CauseChecking {
		return m.wantGPUs()
	}
	return nil
}

// confirmVersion takes what the running model's GET /version said.
func (m *Machine) confirmVersion(s string) {
	v, err := vllm.Parse(s)
	if err != nil {
		m.log.Warn("GET /version answered something else than a version", zap.String("answer", s))
		m.vllm.Source = VersionFromServer // asked; do not ask again
		return
	}
	if m.vllm.Known() && m.vllm.Version.Compare(v) != 0 {
		m.log.Warn("the running vLLM's version differs from what was learned before its start; its own is taken",
			zap.String("before", m.vllm.Version.String()), zap.String("from", m.vllm.Source), zap.String("server", v.String()))
	}
	m.vllm = VLLM{Version: v, Source: VersionFromServer}
}

// AskVersion reports whether the next probe should ask GET /version.
func (m *Machine) AskVersion() bool { return m.vllm.Source != VersionFromServer }

// effectiveLevel is the level the model sleeps at: its sleep_level, less
// when its vLLM lacks what that level needs, or than its process was
// started for (no --enable-sleep-mode: level 0). why says why it is less.
func (m *Machine) effectiveLevel() (int, string) {
	want := m.cfg.SleepLevel
	if !m.cfg.OnDemand() || want == 0 {
		return 0, ""
	}
	level, why := want, ""
	if m.vllm.Known() {
		level, why = m.vllm.Version.SleepLevel(want)
	}
	if m.inst != nil && !m.inst.SleepMode && level > 0 {
		level = 0
		if why == "" {
			why = "its process was started without sleep mode; it sleeps from its next start"
		}
	}
	return level, why
}

// SpawnConfig is the configuration a spawn builds the child's command line
// and environment from: its sleep_level as its vLLM can have it (an older
// vLLM exits at start on --enable-sleep-mode), and, where its vLLM has it
// (0.18), --shutdown-timeout: a second line of defence behind the drain
// before a planned stop, so a request still in flight at SIGTERM finishes
// within the grace rather than being aborted. Neither is in the spawn
// digest: a running model is never restarted for them.
func (m *Machine) SpawnConfig() config.Model {
	c := m.cfg
	if !m.vllm.Known() {
		return c
	}
	if c.OnDemand() && c.SleepLevel > 0 {
		c.SleepLevel, _ = m.vllm.Version.SleepLevel(c.SleepLevel)
	}
	// Only on a version learned, never one assumed (the newest, while the
	// lookup could not tell): an older vLLM would exit at start on the
	// flag and go on doing so until the start limit failed it. The first
	// GET /version settles it for the next spawn.
	if m.vllm.Source != VersionAssumed && m.vllm.Version.Has(vllm.ShutdownTimeout) && !hasFlag(c.Args, "--shutdown-timeout") {
		secs := max(int((SigtermGrace(c.StopTimeout)-time.Second)/time.Second), 1)
		c.Args = append(slices.Clip(c.Args), "--shutdown-timeout", strconv.Itoa(secs))
	}
	return c
}

// hasFlag reports whether args sets flag (as "--flag value" or
// "--flag=value"): an operator's own value is kept.
func hasFlag(args []string, flag string) bool {
	return slices.ContainsFunc(args, func(a string) bool { return a == flag || strings.HasPrefix(a, flag+"=") })
}

// LearnIfUnknown looks up the version of a running model the machine does
// not know (taken over from a daemon that did not write it down).
func (m *Machine) LearnIfUnknown() []Effect {
	if m.vllm.Known() || m.learning || m.inst == nil {
		return nil
	}
	m.learning = true
	m.learnSeq++
	return []Effect{EfLearn{Seq: m.learnSeq}}
}

// HasIsSleeping reports whether its vLLM answers GET /is_sleeping (0.8.0,
// vllm#14312); on 0.7.3-0.7.x a sleep or wake is taken at its word.
func (m *Machine) HasIsSleeping() bool {
	return !m.vllm.Known() || m.vllm.Version.Has(vllm.IsSleeping)
}

// deepestLevel is the deepest sleep its vLLM and command line allow,
// whatever sleep_level says: the host memory budget may deepen a level-1
// sleep to 2, where there is a level 2 to go to.
func (m *Machine) deepestLevel() int {
	switch {
	case m.inst != nil && !m.inst.SleepMode:
		return 0
	case !m.vllm.Known():
		return 2
	}
	return m.vllm.Version.MaxSleepLevel()
}
