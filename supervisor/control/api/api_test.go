package api

import "testing"

func TestOpMutates(t *testing.T) {
	for _, o := range Ops {
		if _, ok := opMutates[o]; !ok {
			t.Errorf("operation %q is not classified in opMutates", o)
		}
	}
	for _, o := range []Op{OpStart, OpStop, OpRestart, OpReset, OpSleep, OpWake, "", "no-such-op"} {
		if !o.Mutates() {
			t.Errorf("%q.Mutates() = false, want true", o)
		}
	}
}
