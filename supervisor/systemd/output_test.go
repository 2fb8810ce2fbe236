package systemd

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"citadel-supervisor/config"
)

// fullDisk fails every write of a line that says "disk full".
type fullDisk struct{}

func (fullDisk) Write(p []byte) (int, error) {
	if strings.Contains(string(p), "disk full") {
		return 0, syscall.ENOSPC
	}
	return len(p), nil
}

func TestFileOutputSurvivesADiskFull(t *testing.T) {
	passed := 0
	out := newModelFiles(func(string) io.Writer { return fullDisk{} }, func(*zap.Logger, string, string, string) { passed++ })
	core, logs := observer.New(zap.InfoLevel)
	log := zap.New(core)
	n := queueLines - 1 // fewer than a queue: none is dropped for slowness
	for range n - 1 {
		out.Output(log, "m", "stdout", "a line (disk full)")
	}
	out.Output(log, "m", "stdout", "a line")
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
	if passed != n {
		t.Errorf("%d of %d lines reached the next output", passed, n)
	}
	if n := logs.FilterMessageSnippet("write failed").Len(); n != 1 {
		t.Errorf("disk full logged %d times, want once", n)
	}
	if logs.FilterMessageSnippet("writing again").Len() != 1 {
		t.Error("recovery not logged")
	}
}

func TestFileOutputWritesRotatedFiles(t *testing.T) {
	dir := t.TempDir()
	out := FileOutput(config.Log{ModelDir: dir, ModelMaxSize: config.MiB, ModelKeep: 2}, nil)
	out.queueLen = 4 * 1024 // every line reaches the file, however slow the disk
	line := strings.Repeat("x", 1023)
	for range 3 * 1024 { // 3 MiB: two rotations
		out.Output(zap.NewNop(), "phi3", "stdout", line)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
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

// stuckDisk is a file whose writes hang until release is closed, as on a
// slow (not full) disk; then each write is passed on to wrote.
type stuckDisk struct {
	entered chan struct{} // a write has started
	release chan struct{}
	wrote   chan string
}

func (d stuckDisk) Write(p []byte) (int, error) {
	select {
	case d.entered <- struct{}{}:
	default:
	}
	<-d.release
	d.wrote <- string(p)
	return len(p), nil
}

// lines is a file that passes each write on.
type lines chan string

func (l lines) Write(p []byte) (int, error) { l <- string(p); return len(p), nil }

// TestSlowFileBlocksOnlyItsModel: one model's file hanging on a slow disk
// neither blocks that model's output capture nor delays another model's
// file; the lines it cannot take are dropped from its file only and counted
// once it catches up.
func TestSlowFileBlocksOnlyItsModel(t *testing.T) {
	const deadline = 10 * time.Second
	slow := stuckDisk{entered: make(chan struct{}, 1), release: make(chan struct{}), wrote: make(chan string, 2*queueLines)}
	fast := make(lines, 16)
	passed := make(chan string, 4*queueLines)
	out := newModelFiles(func(model string) io.Writer {
		if model == "slow" {
			return slow
		}
		return fast
	}, func(_ *zap.Logger, model, _, line string) { passed <- model + " " + line })
	core, logs := observer.New(zap.InfoLevel)
	log := zap.New(core)
	defer func() {
		select {
		case <-slow.release:
		default:
			close(slow.release) // the writer must end even when the test fails
		}
		out.Close() //nolint:errcheck // checked below on the way that passes
	}()

	out.Output(log, "slow", "stdout", "s0")
	select {
	case <-slow.entered:
	case <-time.After(deadline):
		t.Fatal("the slow model's writer never started writing")
	}
	// The writer hangs in its write of s0; the model keeps writing a queue
	// and 100 lines more. Its caller must never block.
	const extra = 100
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range queueLines + extra {
			out.Output(log, "slow", "stdout", "s"+strings.Repeat("x", i%7))
		}
	}()
	select {
	case <-done:
	case <-time.After(deadline):
		t.Fatal("a model's output capture blocked on its slow file")
	}
	out.Output(log, "fast", "stdout", "f1")
	select {
	case l := <-fast:
		if l != "f1\n" {
			t.Errorf("fast model's file got %q", l)
		}
	case <-time.After(deadline):
		t.Fatal("another model's line did not reach its file while one file hangs")
	}
	if n := len(passed); n != 1+queueLines+extra+1 {
		t.Errorf("%d lines reached the next output (ring buffer, journal), want every one", n)
	}
	if n := logs.FilterMessageSnippet("writing too slowly").Len(); n != 1 {
		t.Errorf("dropping logged %d times, want once", n)
	}

	// The disk recovers: the queued lines are written, then a new line
	// finds room and the loss is reported once, with its count.
	close(slow.release)
	for i := range 1 + queueLines {
		select {
		case <-slow.wrote:
		case <-time.After(deadline):
			t.Fatalf("only %d of %d queued lines written after the disk recovered", i, 1+queueLines)
		}
	}
	out.Output(log, "slow", "stdout", "after")
	select {
	case l := <-slow.wrote:
		if l != "after\n" {
			t.Errorf("got %q after recovery", l)
		}
	case <-time.After(deadline):
		t.Fatal("a line after recovery did not reach the file")
	}
	caught := logs.FilterMessageSnippet("caught up").All()
	if len(caught) != 1 || caught[0].ContextMap()["dropped_lines"] != int64(extra) {
		t.Errorf("recovery logged as %v, want once with dropped_lines %d", caught, extra)
	}

	if err := out.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	out.Output(log, "slow", "stdout", "late")
	out.Output(log, "new", "stdout", "late")
	select {
	case l := <-slow.wrote:
		t.Errorf("%q written after Close", l)
	default:
	}
	if n := len(passed); n != 1+queueLines+extra+1+1+2 {
		t.Errorf("lines after Close must still reach the next output: %d", n)
	}
}
