package systemd

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"citadel-supervisor/config"
)

// fullDisk fails every write while full is set.
type fullDisk struct{ full *atomic.Bool }

func (d fullDisk) Write(p []byte) (int, error) {
	if d.full.Load() {
		return 0, syscall.ENOSPC
	}
	return len(p), nil
}

func TestFileOutputSurvivesADiskFull(t *testing.T) {
	var full atomic.Bool
	full.Store(true)
	passed := 0
	out := fileOutput(func(string) io.Writer { return fullDisk{&full} }, func(*zap.Logger, string, string, string) { passed++ })
	core, logs := observer.New(zap.InfoLevel)
	log := zap.New(core)
	for range 1000 {
		out(log, "m", "stdout", "a line")
	}
	if passed != 1000 {
		t.Errorf("%d of 1000 lines reached the next output", passed)
	}
	if n := logs.FilterMessageSnippet("write failed").Len(); n != 1 {
		t.Errorf("disk full logged %d times for 1000 lines, want once", n)
	}
	full.Store(false)
	out(log, "m", "stdout", "a line")
	if logs.FilterMessageSnippet("writing again").Len() != 1 {
		t.Error("recovery not logged")
	}
}

func TestFileOutputWritesRotatedFiles(t *testing.T) {
	dir := t.TempDir()
	out := FileOutput(config.Log{ModelDir: dir, ModelMaxSize: config.MiB, ModelKeep: 2}, nil)
	line := strings.Repeat("x", 1023)
	for range 3 * 1024 { // 3 MiB: two rotations
		out(zap.NewNop(), "phi3", "stdout", line)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "phi3*.log"))
	if len(files) != 3 {
		t.Errorf("files %v: want the current one and model_keep 2 old ones", files)
	}
	fi, err := os.Stat(filepath.Join(dir, "phi3.log"))
	if err != nil || fi.Size() > int64(config.MiB) {
		t.Errorf("phi3.log: %v, %v", fi, err)
	}
}
