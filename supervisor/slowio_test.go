package supervisor

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// TestBlockingIOHungRead: a read that never returns (a FIFO nobody
// writes) is reported as hung after the wait, naming the file; later
// callers are told at once and start no second read; once it returns, the
// next caller reads afresh.
func TestBlockingIOHungRead(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "secrets.env")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	b := &blockingIO{wait: 50 * time.Millisecond, runs: map[string]*ioRun{}}
	var reads atomic.Int32
	read := func() (any, error) {
		return b.do("env", func(doing func(string)) (any, error) {
			reads.Add(1)
			doing("env_files: reading " + fifo)
			vars, err := readEnvFile(fifo)
			return vars, err
		})
	}
	_, err := read()
	var hung *HungError
	if !errors.As(err, &hung) || !strings.Contains(err.Error(), "reading "+fifo+" has not returned") {
		t.Fatalf("first read: %v, want a hung read naming %s", err, fifo)
	}
	began := time.Now()
	for range 5 {
		if _, err := read(); !errors.As(err, &hung) {
			t.Fatalf("while hung: %v", err)
		}
	}
	if waited := time.Since(began); waited > time.Second {
		t.Errorf("callers waited %s in all for a read known to hang", waited)
	}
	if n := reads.Load(); n != 1 {
		t.Errorf("%d reads started, want 1 while it hangs", n)
	}

	// The mount answers: the hung read returns, and later ones read afresh.
	w, err := os.OpenFile(fifo, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	w.WriteString("A=1\n") //nolint:errcheck // the reader says
	w.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		b.mu.Lock()
		n := len(b.runs)
		b.mu.Unlock()
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the hung read did not return once written")
		}
		time.Sleep(time.Millisecond)
	}
	go func() {
		w, err := os.OpenFile(fifo, os.O_WRONLY, 0)
		if err == nil {
			w.WriteString("A=2\n") //nolint:errcheck // the reader says
			w.Close()
		}
	}()
	v, err := read()
	if err != nil {
		// Under load the writer may take longer than the wait to open.
		deadline := time.Now().Add(10 * time.Second)
		for errors.As(err, &hung) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
			v, err = read()
		}
	}
	if err != nil || v.(map[string]string)["A"] != "2" {
		t.Fatalf("read after it returned: %v %v, want A=2", v, err)
	}
	if n := reads.Load(); n != 2 {
		t.Errorf("%d reads started, want 2", n)
	}
}

// TestLoadEnvFilesNoFiles: a model without env_files reads nothing.
func TestLoadEnvFilesNoFiles(t *testing.T) {
	v, err := loadEnvFiles(nil)
	if err != nil || len(v) != 0 {
		t.Fatalf("%v %v", v, err)
	}
}
