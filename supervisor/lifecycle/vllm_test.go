package lifecycle

import (
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/schedule"
	"citadel-supervisor/vllm"
)

// TestMachineLearnsVersionBeforeFirstSpawn: the checks lead to a lookup of
// the model's vLLM version, its answer to the want; a lookup that fails
// takes the newest known version; one for a command since changed counts
// for nothing.
func TestMachineLearnsVersionBeforeFirstSpawn(t *testing.T) {
	t.Run("learned", func(t *testing.T) {
		mt := newMTest(t)
		mt.m.vllm = VLLM{}
		mt.m.Begin()
		mt.expect(EvChecked{}, "learn(1)")
		mt.state(Pending)
		if !strings.Contains(mt.m.reason, "learning its vLLM version") {
			t.Errorf("reason %q", mt.m.reason)
		}
		// A second check meanwhile (a tick) starts no second lookup.
		mt.expect(EvChecked{}, "")
		mt.expect(EvLearned{Seq: 1, Version: vllm.MustParse("0.10.1")}, "want(1)")
		if st := mt.m.Status(); st.VLLMVersion != "0.10.1" || st.VLLMVersionSource != VersionFromPackage {
			t.Errorf("status version %q from %q", st.VLLMVersion, st.VLLMVersionSource)
		}
	})
	t.Run("not learnable: the newest known, until /version answers", func(t *testing.T) {
		mt := newMTest(t)
		mt.m.vllm = VLLM{}
		mt.m.Begin()
		mt.expect(EvChecked{}, "learn(1)")
		mt.expect(EvLearned{Seq: 1, Err: errors.New("cannot tell which Python interpreter the command runs")}, "want(1)")
		if st := mt.m.Status(); st.VLLMVersion != vllm.Newest.String() || st.VLLMVersionSource != VersionAssumed {
			t.Errorf("status version %q from %q", st.VLLMVersion, st.VLLMVersionSource)
		}
		if !mt.m.AskVersion() {
			t.Error("an assumed version must be confirmed by GET /version")
		}
		mt.step(EvPlaced{schedule.Placement{Seq: mt.m.wantSeq, GPUs: []string{"GPU-a"}}})
		mt.step(EvSpawned{Inst: mt.newInst()})
		mt.step(EvTimer{Tick})
		mt.step(EvProbed{Inst: mt.m.inst, Version: "0.6.3"})
		mt.state(Ready)
		if st := mt.m.Status(); st.VLLMVersion != "0.6.3" || st.VLLMVersionSource != VersionFromServer || mt.m.AskVersion() {
			t.Errorf("after /version: %q from %q, ask again %v", st.VLLMVersion, st.VLLMVersionSource, mt.m.AskVersion())
		}
	})
	t.Run("a lookup for a command changed since is ignored", func(t *testing.T) {
		mt := newMTest(t)
		mt.m.vllm = VLLM{}
		mt.m.Begin()
		mt.expect(EvChecked{}, "learn(1)")
		c := mt.m.cfg
		c.Command = []string{"/opt/other-env/bin/python", "-m", "vllm.entrypoints.openai.api_server"}
		mt.step(EvConfig{Config: c, Kind: config.Respawn})
		mt.expect(EvLearned{Seq: 1, Version: vllm.MustParse("0.6.3")}, "")
		if mt.m.vllm.Known() {
			t.Errorf("kept %s from a lookup of the old command", mt.m.vllm.Version)
		}
	})
}

// TestMachineSleepLevelFollowsVersion: sleep_level 2 → 1 → 0 by what the
// model's vLLM has, and the model says why.
func TestMachineSleepLevelFollowsVersion(t *testing.T) {
	for _, tc := range []struct {
		version string
		want    string // effects of the idle check, once its GPUs are quiet
		reason  string
	}{
		{"0.33.0", "disarm(deadline) disarm(tick) disarm(idle) sleep(2,idle)", "going to sleep"},
		{"0.10.2", "disarm(deadline) disarm(tick) disarm(idle) sleep(2,idle)", "going to sleep"},
		{"0.10.1", "disarm(deadline) disarm(tick) disarm(idle) sleep(1,idle)", "going to sleep"},
		{"0.7.3", "disarm(deadline) disarm(tick) disarm(idle) sleep(1,idle)", "going to sleep"},
		{"0.7.2", "disarm(deadline) disarm(tick) disarm(deadline) disarm(idle) stop(term) slept(0,idle)", "stopping"},
		{"0.6.3", "disarm(deadline) disarm(tick) disarm(deadline) disarm(idle) stop(term) slept(0,idle)", "stopping"},
	} {
		t.Run(tc.version, func(t *testing.T) {
			mt := newODTest(t)
			mt.m.cfg.SleepLevel = 2
			mt.m.vllm = VLLM{Version: vllm.MustParse(tc.version), Source: VersionFromServer}
			mt.toODReady()
			mt.now = mt.now.Add(11 * mt.m.cfg.IdleAfter)
			mt.quiet(EvIdle{}, tc.want) // a sleep waits for quiet GPUs
			if !strings.Contains(mt.m.reason, tc.reason) {
				t.Errorf("reason %q, want %q", mt.m.reason, tc.reason)
			}
			note := mt.m.Status().VLLMNote
			if lvl, _ := mt.m.vllm.Version.SleepLevel(2); (lvl < 2) != (note != "") {
				t.Errorf("vllm_note %q for level %d", note, lvl)
			}
			if strings.HasPrefix(tc.version, "0.10.1") {
				mt.expect(EvSlept{}, "slept(1,idle)")
				if !strings.Contains(mt.m.reason, "sleep_level 2 needs vLLM 0.10.2") {
					t.Errorf("asleep reason %q does not say why level 1", mt.m.reason)
				}
			}
			if tc.version == "0.6.3" {
				mt.expect(EvStopped{Inst: mt.m.inst}, "release")
				if !strings.Contains(mt.m.reason, "has no sleep mode") {
					t.Errorf("stopped reason %q does not say why", mt.m.reason)
				}
			}
		})
	}
}

// TestMachineSpawnConfigDropsSleepModeFlag: a vLLM without sleep mode is not
// started with --enable-sleep-mode (it would exit on the unknown flag).
func TestMachineSpawnConfigDropsSleepModeFlag(t *testing.T) {
	mt := newODTest(t)
	for version, flag := range map[string]bool{"0.6.3": false, "0.7.2": false, "0.7.3": true, "0.10.1": true} {
		mt.m.vllm = VLLM{Version: vllm.MustParse(version), Source: VersionFromPackage}
		argv := strings.Join(mt.m.SpawnConfig().Argv(), " ")
		if strings.Contains(argv, "--enable-sleep-mode") != flag {
			t.Errorf("vLLM %s: argv %q, --enable-sleep-mode wanted: %v", version, argv, flag)
		}
	}
}

// TestSpawnConfigShutdownTimeout: from vLLM 0.18 a spawn passes
// --shutdown-timeout, the SIGTERM grace of stop_timeout less a second, as a
// second line of defence behind the drain; never to an older, unknown or
// merely assumed vLLM (it would exit at start on the unknown flag, again
// and again), and never over the operator's own.
func TestSpawnConfigShutdownTimeout(t *testing.T) {
	for _, tc := range []struct {
		version string
		stop    time.Duration
		args    []string
		want    []string
	}{
		{"0.18.0", 30 * time.Second, nil, []string{"--shutdown-timeout", "4"}},
		{"0.33.0", 4 * time.Second, []string{"--trust-remote-code"}, []string{"--trust-remote-code", "--shutdown-timeout", "1"}},
		{"0.17.1", 30 * time.Second, nil, nil},
		{"", 30 * time.Second, nil, nil},
		{"0.20.1", 30 * time.Second, []string{"--shutdown-timeout=60"}, []string{"--shutdown-timeout=60"}},
		{"assumed", 30 * time.Second, nil, nil},
	} {
		mt := newMTest(t)
		mt.m.cfg.StopTimeout, mt.m.cfg.Args = tc.stop, tc.args
		switch tc.version {
		case "":
			mt.m.vllm = VLLM{} // not learned yet
		case "assumed":
			// The lookup could not tell: the newest, until GET /version.
			mt.m.vllm = VLLM{Version: vllm.Newest, Source: VersionAssumed}
		default:
			mt.m.vllm = VLLM{Version: vllm.MustParse(tc.version), Source: VersionFromPackage}
		}
		if got := mt.m.SpawnConfig().Args; !slices.Equal(got, tc.want) {
			t.Errorf("%q, stop_timeout %s, args %q: spawn args %q, want %q", tc.version, tc.stop, tc.args, got, tc.want)
		}
		if !slices.Equal(mt.m.cfg.Args, tc.args) {
			t.Errorf("%q: the configuration's args changed to %q", tc.version, mt.m.cfg.Args)
		}
	}
}
