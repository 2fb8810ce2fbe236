package config

import (
	"errors"
	"fmt"
	"io/fs"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
)

// Host is what Check asks about the machine the configuration would run on.
// The daemon makes the same checks before each start; Check makes them once,
// for `citadel-supervisor --check`.
type Host interface {
	// Stat is os.Stat: does the model's path exist.
	Stat(path string) (fs.FileInfo, error)
	// LookPath finds a program the way the daemon's spawn does
	// (exec.LookPath: a bare name is searched in PATH).
	LookPath(file string) (string, error)
	// EnvFile reads an env file the way the daemon does. Its error names
	// the file and line, never a value.
	EnvFile(path string) error
	// Port says who holds host:port, or nil when it is free or not checked.
	Port(host string, port int) error
	// GPUs lists the GPUs present by UUID, in index order; ok is false
	// when there are no readings (backend none, NVML unavailable).
	GPUs() (uuids []string, ok bool)
}

// Finding is one problem Check found on the host.
type Finding struct {
	Key string // the key path to fix, e.g. models.mixtral.tensor_parallel
	Msg string
	// Wait is true when a running daemon waits for it (the model stays
	// pending and starts once it is fixed): a warning. False means the
	// model cannot start as configured, whatever happens at run time.
	Wait bool
	// Note: something --check could not look at (a model directory
	// without config.json yet); neither an error nor a warning.
	Note bool
}

func (f Finding) String() string {
	level := "error"
	switch {
	case f.Note:
		level = "note"
	case f.Wait:
		level = "warning"
	}
	return level + ": " + f.Key + ": " + f.Msg
}

// Check reports what keeps c's enabled models from starting on this host:
// missing storage, env files or programs, ports held by other processes,
// more GPUs asked for than present, and a configuration without models. A
// problem that models inherit from defaults is reported once, under
// defaults. Findings are sorted by key, errors first within a key.
func (c *Config) Check(h Host) []Finding {
	var out []Finding
	add := func(key string, wait bool, format string, args ...any) {
		out = append(out, Finding{Key: key, Msg: fmt.Sprintf(format, args...), Wait: wait})
	}
	note := func(key, format string, args ...any) {
		out = append(out, Finding{Key: key, Msg: fmt.Sprintf(format, args...), Wait: true, Note: true})
	}
	if len(c.Models) == 0 {
		add("models", true, "no models: the daemon would run none until a reload adds some")
	}
	if c.Listen != "" {
		if host, p, err := splitHostPort(c.Listen); err == nil && p > 0 {
			if err := h.Port(host, p); err != nil {
				add("listen", false, "%s: the daemon cannot serve HTTP and would exit", err)
			}
		}
	}
	uuids, haveGPUs := h.GPUs()
	for _, m := range c.Models {
		if !m.Enabled {
			continue // it does not start: nothing on the host concerns it yet
		}
		key := "models." + m.Name
		if _, err := h.Stat(m.Path); err != nil {
			add(key+".model", true, "%s: %s; the model waits as pending (storage) until it exists", m.Path, errText(err))
		}
		if len(m.Command) > 0 {
			if _, err := h.LookPath(m.Command[0]); err != nil {
				add(key+".command[0]", false, "%s: %s; a model started with it fails (failed: spawn)", m.Command[0], programProblem(err))
			}
		}
		for i, f := range m.EnvFiles {
			if err := h.EnvFile(f); err != nil {
				add(fmt.Sprintf("%s.env_files[%d]", key, i), true, "%s; a model using it waits as pending (env_files) until it can be read", strings.TrimPrefix(err.Error(), "env_files: "))
			}
		}
		if err := h.Port(m.Host, m.Port); err != nil {
			add(key+".port", true, "%s; the model waits as pending (port) until it is free", err)
		}
		if haveGPUs {
			c.checkGPUs(key, m, uuids, add)
		}
		if vh, ok := h.(VLLMHost); ok {
			c.checkVLLM(vh, key, m, add, note)
		}
	}
	c.sharedCacheRoots(add)
	out = c.attributeFindings(out)
	slices.SortStableFunc(out, func(a, b Finding) int {
		if k := strings.Compare(a.Key, b.Key); k != 0 {
			return k
		}
		if a.Note != b.Note {
			if !a.Note {
				return -1
			}
			return 1
		}
		if a.Wait != b.Wait {
			if !a.Wait {
				return -1
			}
			return 1
		}
		return strings.Compare(a.Msg, b.Msg)
	})
	return out
}

func (c *Config) checkGPUs(key string, m Model, uuids []string, add func(string, bool, string, ...any)) {
	if m.TensorParallel > len(uuids) {
		add(key+".tensor_parallel", false, "%d GPUs needed, this host has %d (gpu.backend %s)", m.TensorParallel, len(uuids), c.GPU.Backend)
	}
	for i, g := range m.GPUs {
		k := fmt.Sprintf("%s.gpus[%d]", key, i)
		if idx, err := strconv.Atoi(string(g)); err == nil {
			if idx >= len(uuids) {
				add(k, false, "GPU %d does not exist: this host has %d", idx, len(uuids))
			}
		} else if !slices.Contains(uuids, string(g)) {
			add(k, false, "%s is not a GPU of this host", g)
		}
	}
}

// attributeFindings moves a finding a model inherits to its defaults key
// and reports identical findings once.
func (c *Config) attributeFindings(in []Finding) []Finding {
	seen := map[Finding]bool{}
	var out []Finding
	for _, f := range in {
		if sub, ok := c.inherited(f.Key); ok {
			f.Key = "defaults." + sub
			if !c.fileSets(f.Key) {
				f.Msg += " (a built-in default: set " + f.Key + ")"
			}
		}
		if !seen[f] {
			seen[f] = true
			out = append(out, f)
		}
	}
	return out
}

// programProblem says why a program cannot be run, in the operator's words.
func programProblem(err error) string {
	switch {
	case errors.Is(err, exec.ErrNotFound):
		return "not found in PATH"
	case errors.Is(err, fs.ErrNotExist):
		return "no such file"
	case errors.Is(err, syscall.EISDIR):
		return "is a directory"
	case errors.Is(err, fs.ErrPermission):
		return "not executable (or not reachable) by this user"
	}
	return errText(err)
}

// errText is an error's cause without the path it repeats.
func errText(err error) string {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}

func splitHostPort(addr string) (string, int, error) {
	i := strings.LastIndexByte(addr, ':')
	if i < 0 {
		return "", 0, fmt.Errorf("no port in %q", addr)
	}
	p, err := strconv.Atoi(addr[i+1:])
	return strings.Trim(addr[:i], "[]"), p, err
}

// Empty reports whether the file set nothing: empty, or only comments.
func (c *Config) Empty() bool { return len(c.file) == 0 }
