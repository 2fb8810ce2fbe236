package config

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"reflect"
	"sort"
)

// ChangeKind says what a reload must do to one model.
type ChangeKind int

const (
	// Unchanged: leave the model alone (same process).
	Unchanged ChangeKind = iota
	// Added: a new model; start it.
	Added
	// Removed: the model is gone from the file; stop it and forget it.
	Removed
	// Respawn: something the child sees changed (argv, environment, GPU
	// pins, port …); restart it.
	Respawn
	// Update: only the supervisor's behaviour toward the model changed
	// (probe timings, restart policy, stop_timeout, priority); apply it
	// without touching the process.
	Update
)

func (k ChangeKind) String() string {
	return [...]string{"unchanged", "added", "removed", "respawn", "update"}[k]
}

// Change is the reload action for one model.
type Change struct {
	Name   string
	Kind   ChangeKind
	Fields []string // the koanf keys that differ, for the log
}

// Diff compares two configurations model by model. The result holds one
// Change per model in either, sorted by name. Env file contents are not
// compared here: the reload reads them and compares their digests.
func Diff(old, new *Config) []Change {
	var out []Change
	for _, n := range new.Models {
		o, ok := old.Model(n.Name)
		if !ok {
			out = append(out, Change{Name: n.Name, Kind: Added})
			continue
		}
		out = append(out, diffModel(o, n))
	}
	for _, o := range old.Models {
		if _, ok := new.Model(o.Name); !ok {
			out = append(out, Change{Name: o.Name, Kind: Removed})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// policyKeys are the model keys that change only the supervisor's
// behaviour: a reload that changes nothing else keeps the process.
var policyKeys = map[string]bool{
	"stop_timeout": true, "restart": true, "probe": true, "priority": true,
	"idle_after": true, "min_awake": true, "wake_timeout": true,
	"max_concurrency": true, // the gateway's cap; the process never sees it
	// sleep_level is read at each sleep: 1 and 2 are the same process. A
	// change to or from 0 changes the child's flags (--enable-sleep-mode)
	// and so applies from the model's next start; the running process
	// keeps what it was started with (stopped rather than put to sleep
	// when it has no sleep mode).
	"sleep_level": true,
}

// digestKeys are the policy keys a SpawnDigest still covers: sleep_level
// did decide the child's flags, and records written by earlier versions
// hash it; a reload that changes it re-digests the running instance.
var digestKeys = map[string]bool{"sleep_level": true}

func diffModel(o, n Model) Change {
	c := Change{Name: n.Name, Kind: Unchanged}
	ov, nv := reflect.ValueOf(o), reflect.ValueOf(n)
	t := ov.Type()
	for i := range t.NumField() {
		tag := t.Field(i).Tag.Get("koanf")
		if tag == "" || tag == "-" || equalField(ov.Field(i), nv.Field(i)) {
			continue
		}
		c.Fields = append(c.Fields, tag)
		if !policyKeys[tag] {
			c.Kind = Respawn
		} else if c.Kind == Unchanged {
			c.Kind = Update
		}
	}
	return c
}

// equalField treats nil and empty lists and maps as equal.
func equalField(a, b reflect.Value) bool {
	if (a.Kind() == reflect.Slice || a.Kind() == reflect.Map) && a.Len() == 0 && b.Len() == 0 {
		return true
	}
	return reflect.DeepEqual(a.Interface(), b.Interface())
}

// RestartOnly lists the top-level keys that differ between old and new.
// They are read once at start-up (the listeners bind once, the GPU backend
// opens once), so a reload cannot apply them; the operator must be told.
func RestartOnly(old, new *Config) []string {
	var out []string
	if old.Listen != new.Listen {
		out = append(out, "listen")
	}
	if old.ControlSocket != new.ControlSocket {
		out = append(out, "control_socket")
	}
	if old.ControlGroup != new.ControlGroup {
		out = append(out, "control_socket_group")
	}
	if old.ControlReadGroup != new.ControlReadGroup {
		out = append(out, "control_socket_read_group")
	}
	if !reflect.DeepEqual(old.Log, new.Log) {
		out = append(out, "log")
	}
	if !reflect.DeepEqual(old.GPU, new.GPU) {
		out = append(out, "gpu")
	}
	if old.Gateway.Listen != new.Gateway.Listen {
		out = append(out, "gateway.listen") // the gateway binds once, like listen
	}
	if old.Gateway.MaxConnections != new.Gateway.MaxConnections {
		out = append(out, "gateway.max_connections")
	}
	if old.Gateway.MaxConnectionsPerAddress != new.Gateway.MaxConnectionsPerAddress {
		out = append(out, "gateway.max_connections_per_address")
	}
	return out
}

// SpawnDigest fingerprints what m's process sees of its configuration:
// every key but the policy keys, which a running process never sees. A
// process started under one digest can be kept by a configuration with the
// same digest (a daemon that adopts its predecessor's models after an
// upgrade or a crash compares them); a different digest means Respawn.
func (m Model) SpawnDigest() string {
	v := reflect.ValueOf(m)
	t := v.Type()
	h := sha256.New()
	for i := range t.NumField() {
		tag := t.Field(i).Tag.Get("koanf")
		if tag == "" || tag == "-" || (policyKeys[tag] && !digestKeys[tag]) {
			continue
		}
		f := v.Field(i)
		if tag == "vllm_port" && m.VLLMPort == 0 {
			// Derived: hashed as the value builds before the derivation
			// looked at the host derived, which they hashed. The digest
			// says "derived" either way, and a model they started is
			// adopted, not restarted, after an upgrade (docs/vllm.md).
			fmt.Fprintf(h, "%s=%d\n", tag, legacyVLLMPort(m.Port))
			continue
		}
		if (f.Kind() == reflect.Slice || f.Kind() == reflect.Map) && f.Len() == 0 {
			fmt.Fprintf(h, "%s=empty\n", tag) // nil and empty are the same, as in Diff
			continue
		}
		b, err := json.Marshal(f.Interface())
		if err != nil {
			b = fmt.Appendf(nil, "%#v", f.Interface())
		}
		fmt.Fprintf(h, "%s=%s\n", tag, b)
	}
	return hex.EncodeToString(h.Sum(nil))[:32]
}
