package systemd

import (
	"fmt"
	"io"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coreos/go-systemd/v22/journal"
	"go.uber.org/zap"
	"gopkg.in/natefinch/lumberjack.v2"

	"citadel-supervisor/config"
)

// UnderJournald reports whether the daemon's stderr is the journal (systemd
// set JOURNAL_STREAM for it) and the journal socket is there.
func UnderJournald() bool {
	ok, err := journal.StderrIsJournalStream()
	return err == nil && ok && journal.Enabled()
}

// OutputFunc receives each line a model writes: the supervisor's
// Options.Output.
type OutputFunc = func(log *zap.Logger, model, stream, line string)

// JournalOutput sends each model line to the journal as its own entry with
// SYSLOG_IDENTIFIER=citadel-<model>, MODEL= and STREAM= (stderr lines at
// warning priority), so `journalctl -t citadel-phi3` shows one model as the
// per-model units did, while the daemon's own log stays under its unit.
func JournalOutput(fallback *zap.Logger) OutputFunc {
	return func(log *zap.Logger, model, stream, line string) {
		prio := journal.PriInfo
		if stream == "stderr" {
			prio = journal.PriWarning
		}
		err := journal.Send(line, prio, map[string]string{
			"SYSLOG_IDENTIFIER": "citadel-" + model,
			"MODEL":             model,
			"STREAM":            stream,
		})
		if err != nil {
			log.Info(line) // the journal went away: keep the line
		}
	}
}

// queueLines bounds how many lines of one model wait for its file: with
// lines cut at 8 KiB by the output readers, at most 4 MiB per model.
const queueLines = 512

// closeWait bounds how long Close waits for the writers to finish: a writer
// stuck on a hung disk must not keep the daemon from exiting.
const closeWait = 5 * time.Second

// ModelFiles writes each model's output to its own file, each model through
// its own bounded queue and writer goroutine. A slow disk for one model's
// file then delays only that file: before, one mutex around every write
// meant a single slow write blocked every model's output capture, then
// their pipes, then the models themselves.
type ModelFiles struct {
	open func(model string) io.Writer
	next OutputFunc

	queueLen int // queueLines; tests that must not drop raise it

	mu     sync.Mutex // guards files and closed; never held across I/O
	files  map[string]*modelFile
	closed bool
	wg     sync.WaitGroup
	quit   chan struct{}
}

type modelFile struct {
	queue   chan queued
	dropped atomic.Int64 // lines dropped since the queue was last accepting
}

type queued struct {
	log  *zap.Logger
	line string
}

// FileOutput writes each model's output to <dir>/<model>.log, rotated at
// model_max_size with model_keep old files; then passes the line on to
// next. Output never blocks on the file: a line that finds its model's
// queue full (the file is slower than the model) is dropped from the file
// only, and a write that fails (disk full) likewise; the ring buffer and
// next still get every line, and each kind of loss is logged once when it
// starts and once when it ends. Close ends the writers.
func FileOutput(c config.Log, next OutputFunc) *ModelFiles {
	return newModelFiles(func(model string) io.Writer {
		return &lumberjack.Logger{
			Filename:   filepath.Join(c.ModelDir, model+".log"),
			MaxSize:    max(1, int(c.ModelMaxSize/config.MiB)),
			MaxBackups: c.ModelKeep,
		}
	}, next)
}

func newModelFiles(open func(model string) io.Writer, next OutputFunc) *ModelFiles {
	return &ModelFiles{open: open, next: next, queueLen: queueLines, files: map[string]*modelFile{}, quit: make(chan struct{})}
}

// Output is an OutputFunc.
func (m *ModelFiles) Output(log *zap.Logger, model, stream, line string) {
	if f := m.file(model); f != nil {
		// Once dropping, keep dropping until the writer has drained half
		// the queue: a file that stays slow then costs a pair of log lines
		// per half a queue written, not a pair per line.
		dropping := f.dropped.Load() > 0 && len(f.queue) > cap(f.queue)/2
		if !dropping {
			select {
			case f.queue <- queued{log, line}:
			default:
				dropping = true
			}
		}
		if dropping {
			if f.dropped.Add(1) == 1 {
				log.Warn("model log file: writing too slowly; dropping lines from the file until it catches up")
			}
		} else if n := f.dropped.Swap(0); n > 0 {
			log.Warn("model log file: caught up; lines were dropped from the file only (citadelctl logs and the journal still had them)",
				zap.Int64("dropped_lines", n))
		}
	}
	if m.next != nil {
		m.next(log, model, stream, line)
	}
}

// file returns model's file, starting its writer at the first line; nil
// once Close was called.
func (m *ModelFiles) file(model string) *modelFile {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return nil
	}
	f := m.files[model]
	if f == nil {
		f = &modelFile{queue: make(chan queued, m.queueLen)}
		m.files[model] = f
		m.wg.Go(func() { m.write(model, f) })
	}
	return f
}

// write is model's writer: it opens the file on its own goroutine (opening
// can be slow too) and writes queued lines until Close, then the lines
// still queued.
func (m *ModelFiles) write(model string, f *modelFile) {
	w := m.open(model)
	if c, ok := w.(io.Closer); ok {
		defer c.Close() //nolint:errcheck // nothing to do about it at exit
	}
	failing := false
	put := func(q queued) {
		_, err := w.Write([]byte(q.line + "\n"))
		switch {
		case err != nil && !failing:
			q.log.Error("model log file: write failed; dropping lines from the file until it works again", zap.Error(err))
		case err == nil && failing:
			q.log.Info("model log file: writing again")
		}
		failing = err != nil
	}
	for {
		select {
		case q := <-f.queue:
			put(q)
		case <-m.quit:
			for {
				select {
				case q := <-f.queue:
					put(q)
				default:
					return
				}
			}
		}
	}
}

// Close writes what is queued and closes every file; lines that arrive
// afterwards go to next only. It waits at most closeWait for writers stuck
// on a hung disk, and then says so.
func (m *ModelFiles) Close() error {
	m.mu.Lock()
	if !m.closed {
		m.closed = true
		close(m.quit)
	}
	m.mu.Unlock()
	done := make(chan struct{})
	go func() { m.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-time.After(closeWait):
		return fmt.Errorf("model log files: writers still blocked after %s", closeWait)
	}
}
