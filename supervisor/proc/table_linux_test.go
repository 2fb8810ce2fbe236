package proc

import (
	"os"
	"testing"
)

func TestParseStat(t *testing.T) {
	line := "4411 (python3 (Engine) x) S 1 4411 4411 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 123456 1000000 2560 18446744073709551615"
	s, err := parseStat(4411, []byte(line))
	if err != nil {
		t.Fatal(err)
	}
	want := Stat{PID: 4411, PPID: 1, PGID: 4411, State: 'S', Start: 123456, Comm: "python3 (Engine) x", UTime: 250, STime: 50, RSSPages: 2560}
	if s != want {
		t.Errorf("got %+v\nwant %+v", s, want)
	}
	if _, err := parseStat(1, []byte("1 (x")); err == nil {
		t.Error("malformed stat accepted")
	}
	if _, err := ReadStat(os.Getpid()); err != nil {
		t.Errorf("ReadStat(self): %v", err)
	}
}
