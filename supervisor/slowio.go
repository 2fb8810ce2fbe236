package supervisor

import (
	"fmt"
	"maps"
	"os"
	"strings"
	"sync"
	"time"

	"citadel-supervisor/config"
)

// Reads of a model's files (its path, its env_files) can hang for good: a
// hard NFS mount whose server went away, a FUSE daemon that stopped
// answering. Such a read cannot be cancelled, and the goroutine that made it
// is lost until it returns; made by a runner, it would take the runner, the
// control socket waiting for its first status, reloads and shutdown with
// it. So they are made through blockingIO: off the caller's goroutine,
// awaited for at most ioWait, and not made again while one hangs.

// ioWait is how long a caller waits for a read of a model's files before
// it is told the read hangs. A local disk answers in microseconds; a
// healthy network mount in milliseconds.
const ioWait = 500 * time.Millisecond

// blockingIO runs reads that may never return. One read per key is in
// flight at a time: a caller that finds one in flight waits for it (never
// past ioWait from its start), so a hung mount holds one goroutine, not
// one per retry, and each later caller is told at once that it still hangs.
// A read that returns, late or not, is forgotten: the next caller reads
// afresh.
type blockingIO struct {
	wait time.Duration
	mu   sync.Mutex
	runs map[string]*ioRun
}

type ioRun struct {
	began time.Time
	done  chan struct{}
	val   any
	err   error
	mu    sync.Mutex
	what  string // what it is reading now
}

func (r *ioRun) doing(what string) {
	r.mu.Lock()
	r.what = what
	r.mu.Unlock()
}

// HungError is a read still not returned after the wait: what, and since
// when.
type HungError struct {
	What  string
	Since time.Time
}

func (e *HungError) Error() string {
	return fmt.Sprintf("%s has not returned for %s (a hung mount?); retried once it returns", e.What, config.RoundDuration(time.Since(e.Since)))
}

var slowIO = &blockingIO{wait: ioWait, runs: map[string]*ioRun{}}

// do runs fn under key, or joins the run in flight under key, and returns
// its result if it comes within the wait; else a *HungError naming what
// the run said it was doing last (fn tells it with doing).
func (b *blockingIO) do(key string, fn func(doing func(string)) (any, error)) (any, error) {
	b.mu.Lock()
	run := b.runs[key]
	if run == nil {
		run = &ioRun{began: time.Now(), done: make(chan struct{})}
		b.runs[key] = run
		go func() {
			run.val, run.err = fn(run.doing)
			b.mu.Lock()
			delete(b.runs, key)
			b.mu.Unlock()
			close(run.done)
		}()
	}
	b.mu.Unlock()
	left := b.wait - time.Since(run.began)
	if left > 0 {
		t := time.NewTimer(left)
		defer t.Stop()
		select {
		case <-run.done:
			return run.val, run.err
		case <-t.C:
		}
	}
	select {
	case <-run.done:
		return run.val, run.err
	default:
		run.mu.Lock()
		defer run.mu.Unlock()
		return nil, &HungError{What: run.what, Since: run.began}
	}
}

// statPath stats a model's path without waiting on a hung mount.
func statPath(path string) error {
	_, err := slowIO.do("stat\x00"+path, func(doing func(string)) (any, error) {
		doing("stat " + path)
		_, err := os.Stat(path)
		return nil, err
	})
	return err
}

// loadEnvFiles reads every file of a model's env_files into one map, later
// files overriding earlier ones, without waiting on a hung mount: a file
// whose read does not return is a *HungError naming it.
func loadEnvFiles(files []string) (map[string]string, error) {
	if len(files) == 0 {
		return map[string]string{}, nil
	}
	v, err := slowIO.do("env\x00"+strings.Join(files, "\x00"), func(doing func(string)) (any, error) {
		out := map[string]string{}
		for _, f := range files {
			doing("env_files: reading " + f)
			vars, err := readEnvFile(f)
			if err != nil {
				return nil, err
			}
			maps.Copy(out, vars)
		}
		return out, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(map[string]string), nil
}
