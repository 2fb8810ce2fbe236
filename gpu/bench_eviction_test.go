//go:build benchdriver

package gpu

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// TestBenchEviction replays a week of each trace (replay_test.go) under the
// shipped policy, LRU, the offline references and llama-swap's rule, prints
// the table of docs/performance.md and checks the targets: on every trace
// the policy's clients wait no longer than LRU's, and on every trace whose
// popularity is not uniform the policy is closer than LRU to the offline
// reference (or beyond it).
//
//	go test -tags benchdriver -count=1 -run TestBenchEviction -v ./gpu/
func TestBenchEviction(t *testing.T) {
	const week = 7 * 24 * time.Hour
	seeds := []uint64{1, 2, 3}
	var table strings.Builder
	fmt.Fprintf(&table, "| trace (a week; seed %d) | requests | policy | LRU | offline reference | llama-swap | policy ÷ LRU |\n|---|---|---|---|---|---|---|\n", seeds[0])
	ratios, llama, ref := map[string][]string{}, map[string][]string{}, map[string][]string{}
	for i, seed := range seeds {
		for _, row := range replayAll(seed, week) {
			name, b := row.trace.name, row.bound()
			ratio := row.policy.wait.Seconds() / row.lru.wait.Seconds()
			ratios[name] = append(ratios[name], fmt.Sprintf("%.2f", ratio))
			llama[name] = append(llama[name], fmt.Sprintf("%.2f", row.llamaSw.wait.Seconds()/row.lru.wait.Seconds()))
			ref[name] = append(ref[name], fmt.Sprintf("%.2f", b.wait.Seconds()/row.lru.wait.Seconds()))
			if i == 0 {
				fmt.Fprintf(&table, "| %s | %d | %s | %s | %s | %s | %.2f |\n", name, len(row.trace.trace),
					cell(row.policy), cell(row.lru), cell(b), cell(row.llamaSw), ratio)
			}
			if row.policy.wait > row.lru.wait {
				t.Errorf("seed %d, %s: the policy's clients waited %s, LRU's %s", seed, name, row.policy.wait, row.lru.wait)
			}
			if !row.trace.uniform {
				if d, dl := absDur(row.policy.wait-b.wait), row.lru.wait-b.wait; d >= dl {
					t.Errorf("seed %d, %s: the policy is %s from the offline reference, LRU %s", seed, name, d, dl)
				}
			}
		}
	}
	fmt.Fprintf(&table, "\n| trace | total wait ÷ LRU's, seeds %v: policy | offline reference | llama-swap |\n|---|---|---|---|\n", seeds)
	for _, tr := range replayTraces(seeds[0], time.Hour) {
		fmt.Fprintf(&table, "| %s | %s | %s | %s |\n", tr.name, strings.Join(ratios[tr.name], ", "), strings.Join(ref[tr.name], ", "), strings.Join(llama[tr.name], ", "))
	}
	for _, l := range strings.Split(strings.TrimSpace(table.String()), "\n") {
		fmt.Println("    " + l)
	}
}

// cell is wakes, cold starts and the clients' total wait in hours.
func cell(r replayResult) string {
	return fmt.Sprintf("%d / %d / %.1f h", r.wakes, r.starts, r.wait.Hours())
}

func absDur(d time.Duration) time.Duration {
	if d < 0 {
		return -d
	}
	return d
}
