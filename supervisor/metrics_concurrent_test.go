package supervisor

import (
	"bytes"
	"os"
	"regexp"
	"sync"
	"testing"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"citadel-supervisor/supervisor/exposition"
)

// TestScrapesAtOnce: scrapes at once (the handler lets 4 through), each
// with the pooled buffers of the one before and the models' kept files,
// write the same valid exposition.
func TestScrapesAtOnce(t *testing.T) {
	for _, pids := range [][]int{{noSuchPID}, {os.Getpid()}} {
		reg := exposition.NewRegistry()
		scrapeFixture(t, 20, reg, pids)
		format := expfmt.NewFormat(expfmt.TypeTextPlain)
		// The values that move between two scrapes.
		moving := regexp.MustCompile(`(?m)^((citadel_scrape_collector_duration_seconds|citadel_model_resident_memory_bytes|citadel_model_cpu_seconds_total)\{[^}]*\}) .*$`)
		var first bytes.Buffer
		if err := reg.WriteText(&first, format, nil); err != nil {
			t.Fatal(err)
		}
		want := moving.ReplaceAllString(first.String(), "$1 V")
		var wg sync.WaitGroup
		for range 4 {
			wg.Go(func() {
				for range 25 {
					var b bytes.Buffer
					if err := reg.WriteText(&b, format, nil); err != nil {
						t.Error(err)
						return
					}
					if got := moving.ReplaceAllString(b.String(), "$1 V"); got != want {
						t.Errorf("pids %v: a scrape among others:\n%s\nalone:\n%s", pids, got, want)
						return
					}
					parser := expfmt.NewTextParser(model.LegacyValidation)
					if _, err := parser.TextToMetricFamilies(&b); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
	}
}
