package supervisor

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sync/singleflight"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor/lifecycle"
	"citadel-supervisor/vllm"
)

// Each model's vLLM version is learned before its first spawn from the
// package metadata of the interpreter its command runs (vllm.Snippet, with
// the model's own environment: its PYTHONPATH or virtualenv decide which
// vllm that interpreter imports), and confirmed by GET /version once it
// serves. The lookup starts a process, so it is a job: the runner goes on
// answering while it runs, and its answer comes back as an event.

// Where a model's version comes from.
const (
	VersionFromPackage = lifecycle.VersionFromPackage
	VersionFromServer  = lifecycle.VersionFromServer
	VersionAssumed     = lifecycle.VersionAssumed
)

// learnTimeout bounds one lookup: an interpreter on a slow or hung mount
// must not keep a model pending for ever (it is then assumed newest).
const learnTimeout = 60 * time.Second

// versionCache remembers what each (command, environment) runs, so seven
// models sharing one virtualenv start one interpreter between them, and
// lookups of the same key at the same moment share one process.
type versionCache struct {
	mu     sync.Mutex
	known  map[string]vllm.Version
	flight singleflight.Group
}

// versionKey names a model's interpreter and the environment it would run
// with; a digest, so no value of the environment is kept.
func versionKey(m config.Model, environ []string) string {
	h := sha256.New()
	for _, a := range m.Command {
		h.Write([]byte(a))
		h.Write([]byte{0})
	}
	h.Write([]byte{1})
	for _, kv := range lookupEnv(m, environ) {
		h.Write([]byte(kv))
		h.Write([]byte{0})
	}
	return hex.EncodeToString(h.Sum(nil))[:32]
}

// lookupEnv is the environment the lookup runs with: the daemon's, less
// what no child inherits, plus the model's env. Not its env_files: the
// secrets there are the model's own, and what decides the interpreter's
// packages (PYTHONPATH, VIRTUAL_ENV, PYTHONHOME) is configuration.
func lookupEnv(m config.Model, environ []string) []string {
	env := m.ChildEnv(environ, nil, nil, nil)
	// The variables the supervisor sets per model (its VLLM_PORT block, its
	// cache) say nothing of the packages; leaving them out lets models
	// that share an interpreter share its lookup.
	return slices.DeleteFunc(env, func(kv string) bool {
		k, _, _ := strings.Cut(kv, "=")
		return k == "VLLM_PORT" || k == config.CacheRootVar
	})
}

// learn returns the version m's interpreter has, from the cache or by
// running it (start starts the process: the daemon's reaper, so the exit
// status is not taken from os/exec).
func (c *versionCache) learn(ctx context.Context, m config.Model, environ []string, start func(*exec.Cmd) error) (vllm.Version, error) {
	key := versionKey(m, environ)
	c.mu.Lock()
	v, ok := c.known[key]
	c.mu.Unlock()
	if ok {
		return v, nil
	}
	res, err, _ := c.flight.Do(key, func() (any, error) {
		v, err := LearnVersion(ctx, m, environ, start)
		if err == nil {
			c.set(key, v)
		}
		return v, err
	})
	if err != nil {
		return vllm.Version{}, err
	}
	return res.(vllm.Version), nil
}

// set records v for key: a lookup, or a model's GET /version, which knows
// better (the virtualenv was upgraded since the lookup).
func (c *versionCache) set(key string, v vllm.Version) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.known == nil {
		c.known = map[string]vllm.Version{}
	}
	c.known[key] = v
}

// LearnVersion runs m's interpreter once to read the installed vLLM's
// version (vllm.Snippet), with the model's environment and a deadline; on
// the deadline the interpreter's whole process group is killed. start nil
// means exec.Cmd.Start.
func LearnVersion(ctx context.Context, m config.Model, environ []string, start func(*exec.Cmd) error) (vllm.Version, error) {
	env := lookupEnv(m, environ)
	interp, err := vllm.Interpreter(m.Command, config.Getenv(env, "PATH", "/usr/local/bin:/usr/bin:/bin"))
	if err != nil {
		return vllm.Version{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, learnTimeout)
	defer cancel()
	cmd := exec.Command(interp, "-c", vllm.Snippet)
	cmd.Env = env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var out limitedBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = time.Second
	if start == nil {
		start = (*exec.Cmd).Start
	}
	if err := start(cmd); err != nil {
		return vllm.Version{}, fmt.Errorf("%s: %s", interp, errText(err))
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-ctx.Done():
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		return vllm.Version{}, fmt.Errorf("%s: no answer within %s", interp, learnTimeout)
	}
	if err != nil {
		// Its own words: "No package metadata was found for vllm" says
		// the interpreter has no vLLM at all.
		last := strings.TrimSpace(out.String())
		if i := strings.LastIndexByte(last, '\n'); i >= 0 {
			last = last[i+1:]
		}
		return vllm.Version{}, fmt.Errorf("%s: %w: %s", interp, err, last)
	}
	return vllm.ParseOutput(out.Bytes())
}

// limitedBuffer keeps the first 4 KiB an interpreter prints.
type limitedBuffer struct{ bytes.Buffer }

func (b *limitedBuffer) Write(p []byte) (int, error) {
	if room := 4096 - b.Len(); room > 0 {
		b.Buffer.Write(p[:min(len(p), room)])
	}
	return len(p), nil
}

// Versions learns models' vLLM versions as a daemon does before a start,
// cached per command and environment. For `citadel-supervisor --check`.
type Versions struct {
	cache   versionCache
	environ []string
}

// NewVersions returns a Versions for a daemon whose environment is environ.
func NewVersions(environ []string) *Versions { return &Versions{environ: environ} }

// Learn returns the vLLM version m's interpreter has.
func (v *Versions) Learn(ctx context.Context, m config.Model) (vllm.Version, error) {
	return v.cache.learn(ctx, m, v.environ, nil)
}
