package systemd

import (
	"io"
	"path/filepath"
	"sync"

	"github.com/coreos/go-systemd/v22/journal"
	"go.uber.org/zap"
	"gopkg.in/natefinch/lumberjack.v2"

	"citadel-supervisor/config"
	"citadel-supervisor/supervisor"
)

// UnderJournald reports whether the daemon's stderr is the journal (systemd
// set JOURNAL_STREAM for it) and the journal socket is there.
func UnderJournald() bool {
	ok, err := journal.StderrIsJournalStream()
	return err == nil && ok && journal.Enabled()
}

// JournalOutput sends each model line to the journal as its own entry with
// SYSLOG_IDENTIFIER=citadel-<model>, MODEL= and STREAM= (stderr lines at
// warning priority), so `journalctl -t citadel-phi3` shows one model as the
// per-model units did, while the daemon's own log stays under its unit.
func JournalOutput(fallback *zap.Logger) supervisor.OutputFunc {
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

// FileOutput writes each model's output to <dir>/<model>.log, rotated at
// model_max_size with model_keep old files; then passes the line on to
// next. A write that fails (disk full) drops the line from the file only:
// the model is never blocked, the ring buffer and next still get it, and
// the failure is logged once until writing works again.
func FileOutput(c config.Log, next supervisor.OutputFunc) supervisor.OutputFunc {
	return fileOutput(func(model string) io.Writer {
		return &lumberjack.Logger{
			Filename:   filepath.Join(c.ModelDir, model+".log"),
			MaxSize:    max(1, int(c.ModelMaxSize/config.MiB)),
			MaxBackups: c.ModelKeep,
		}
	}, next)
}

func fileOutput(open func(model string) io.Writer, next supervisor.OutputFunc) supervisor.OutputFunc {
	var mu sync.Mutex
	files := map[string]io.Writer{}
	failing := map[string]bool{}
	return func(log *zap.Logger, model, stream, line string) {
		mu.Lock()
		f := files[model]
		if f == nil {
			f = open(model)
			files[model] = f
		}
		_, err := f.Write([]byte(line + "\n"))
		report := err != nil && !failing[model]
		recovered := err == nil && failing[model]
		failing[model] = err != nil
		mu.Unlock()
		switch {
		case report:
			log.Error("model log file: write failed; dropping lines from the file until it works again", zap.Error(err))
		case recovered:
			log.Info("model log file: writing again")
		}
		if next != nil {
			next(log, model, stream, line)
		}
	}
}
