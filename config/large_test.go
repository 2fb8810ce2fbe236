package config

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// largeEnvConfig is one model with an env of n entries.
func largeEnvConfig(n int) []byte {
	var b strings.Builder
	b.WriteString("gpu: {backend: none}\nmodels:\n  a:\n    model: /m/a\n    port: 11400\n    env:\n")
	for i := range n {
		fmt.Fprintf(&b, "      K%d: v%d\n", i, i)
	}
	return []byte(b.String())
}

// TestLoadLargeMapIsLinear guards against quadratic work per map entry: the
// YAML decoder's pairwise duplicate-key check took about a minute for a
// 100 000-entry env. Linear work loads it in a few seconds, even under
// -race on a busy machine; the bound is generous, the quadratic time is not.
func TestLoadLargeMapIsLinear(t *testing.T) {
	data := largeEnvConfig(100_000)
	start := time.Now()
	c, err := Parse(data, nil)
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	if got := len(c.Models[0].Env); got != 100_000 {
		t.Fatalf("env has %d entries, want 100000", got)
	}
	t.Logf("100000 env entries loaded in %s", took)
	if took > 40*time.Second {
		t.Errorf("loading took %s: quadratic in the number of entries?", took)
	}
}

func BenchmarkParseLargeEnv(b *testing.B) {
	data := largeEnvConfig(20_000)
	for b.Loop() {
		if _, err := Parse(data, nil); err != nil {
			b.Fatal(err)
		}
	}
}
