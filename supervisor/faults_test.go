package supervisor

import (
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
)

// TestLogFloodNeitherBlocksNorGrows: a model writing 2 MB/s keeps writing
// (the daemon never stops reading its pipe) and the daemon keeps only the
// last lines.
func TestLogFloodNeitherBlocksNorGrows(t *testing.T) {
	h := newHarness(t, modelSpec{Name: "chatty", Fake: []string{"--fake-log-bytes-per-sec", "2000000"}}).start(Options{})
	h.waitState("chatty", Ready, 20*time.Second)
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)

	lineNo := func() int {
		out, _ := h.sup.Output("chatty", 1)
		if len(out) == 0 {
			return -1
		}
		n, err := strconv.Atoi(strings.Fields(out[0])[0])
		if err != nil {
			return -1
		}
		return n
	}
	start := time.Now()
	first := lineNo()
	// 2 MB/s is 20 000 lines/s; a blocked pipe would stall at a few
	// hundred (the pipe buffer). Ask for a tenth of the rate.
	h.waitFor(t, 20*time.Second, "the flood to keep flowing", func() bool { return lineNo() > first+2000*int(time.Since(start)/time.Second+1) })
	if out, _ := h.sup.Output("chatty", 1000); len(out) != OutputLines {
		t.Errorf("ring holds %d lines, want %d", len(out), OutputLines)
	}
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	if grown := int64(after.HeapInuse) - int64(before.HeapInuse); grown > 32<<20 {
		t.Errorf("heap grew %d MiB under the flood", grown>>20)
	}
}

// TestOverlongLineIsCut: a line without a newline does not grow memory; it
// is cut at maxLineBytes and marked.
func TestOverlongLineIsCut(t *testing.T) {
	r := newRunner(config.Model{Name: "m"}, &deps{now: time.Now, log: zap.NewNop(), output: func(*zap.Logger, string, string, string) {}})
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { r.capture(pr, "stdout"); close(done) }()
	pw.WriteString(strings.Repeat("y", 100_000) + "\nnext\n")
	pw.Close()
	<-done
	out := r.out.last(10)
	if len(out) != 2 || len(out[0]) != maxLineBytes+len(" [line cut]") || !strings.HasSuffix(out[0], " [line cut]") || out[1] != "next" {
		t.Errorf("got %d lines: %.40q… (%d bytes), %q", len(out), out[0], len(out[0]), out[1:])
	}
}

// TestProgressOutputArrivesAsItComes: \r ends a line (progress bars), \r\n
// is one end, and a partial line is passed on after partialFlush instead
// of waiting for a newline that may never come.
func TestProgressOutputArrivesAsItComes(t *testing.T) {
	r := newRunner(config.Model{Name: "m"}, &deps{now: time.Now, log: zap.NewNop(), output: func(*zap.Logger, string, string, string) {}})
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { r.capture(pr, "stdout"); close(done) }()
	pw.WriteString("Loading 10%\rLoading 50%\rdone\r\nwaiting for input> ")
	waitFor(t, 5*time.Second, "the partial line passed on", func() bool {
		return slices.Contains(r.out.last(10), "waiting for input> ")
	})
	if got := r.out.last(10); !slices.Equal(got, []string{"Loading 10%", "Loading 50%", "done", "waiting for input> "}) {
		t.Errorf("lines %q", got)
	}
	pw.Close()
	<-done
}
