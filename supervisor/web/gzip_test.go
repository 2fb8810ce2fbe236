package web

import (
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"citadel-supervisor/supervisor/exposition"
)

// TestMetricsCompression: /metrics answers gzip to a client that accepts
// it (Prometheus does) with the same exposition as uncompressed, says Vary:
// Accept-Encoding either way, and sends an error answer uncompressed.
// Either registry: the daemon's (exposition.Registry) or a plain one.
func TestMetricsCompression(t *testing.T) {
	for _, reg := range []interface {
		prometheus.Registerer
		prometheus.Gatherer
	}{exposition.NewRegistry(), prometheus.NewRegistry()} {
		t.Run(fmt.Sprintf("%T", reg), func(t *testing.T) { testMetricsCompression(t, reg) })
	}
}

func testMetricsCompression(t *testing.T, reg interface {
	prometheus.Registerer
	prometheus.Gatherer
}) {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "citadel_test_gauge", Help: "A gauge."}, []string{"model"})
	for i := range 100 { // an exposition the size of a few models' (small answers go out as written)
		g.WithLabelValues(fmt.Sprintf("m%d", i)).Set(1)
	}
	reg.MustRegister(g)
	h := Handler(stub{alive: true}, reg, zap.NewNop())
	scrape := func(h http.Handler, acceptEncoding string) (*http.Response, string) {
		t.Helper()
		req := httptest.NewRequest("GET", "/metrics", nil)
		if acceptEncoding != "" {
			req.Header.Set("Accept-Encoding", acceptEncoding)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		resp := w.Result()
		var body io.Reader = resp.Body
		if resp.Header.Get("Content-Encoding") == "gzip" {
			zr, err := gzip.NewReader(resp.Body)
			if err != nil {
				t.Fatal(err)
			}
			body = zr
		}
		b, err := io.ReadAll(body)
		if err != nil {
			t.Fatal(err)
		}
		return resp, string(b)
	}
	plainResp, plain := scrape(h, "")
	if !strings.Contains(plain, `citadel_test_gauge{model="m42"} 1`) {
		t.Fatalf("uncompressed exposition:\n%s", plain)
	}
	for _, c := range []struct {
		acceptEncoding string
		gzip           bool
	}{
		{"gzip", true},
		{"gzip, deflate, br", true}, // Go's and browsers'
		{"zstd;q=1, gzip;q=0.5", true},
		{"identity", false},
		{"gzip;q=0", false},
		{"gzip;q=0, *", false},
		{"br", false},
	} {
		resp, body := scrape(h, c.acceptEncoding)
		if got := resp.Header.Get("Content-Encoding") == "gzip"; got != c.gzip {
			t.Errorf("Accept-Encoding %q: Content-Encoding %q, want gzip %v", c.acceptEncoding, resp.Header.Get("Content-Encoding"), c.gzip)
		}
		if body != plain {
			t.Errorf("Accept-Encoding %q: exposition differs from the uncompressed one:\n%s", c.acceptEncoding, body)
		}
		if vary := resp.Header.Values("Vary"); !slices.Contains(vary, "Accept-Encoding") || !slices.Contains(vary, "Accept") {
			t.Errorf("Accept-Encoding %q: Vary %q", c.acceptEncoding, vary)
		}
		if resp.Header.Get("Content-Type") != plainResp.Header.Get("Content-Type") {
			t.Errorf("Accept-Encoding %q: Content-Type %q, want %q", c.acceptEncoding, resp.Header.Get("Content-Type"), plainResp.Header.Get("Content-Type"))
		}
	}

	reg.MustRegister(failingCollector{prometheus.NewDesc("citadel_test_failing", "Fails.", nil, nil)})
	resp, body := scrape(h, "gzip")
	if resp.StatusCode != http.StatusInternalServerError || resp.Header.Get("Content-Encoding") != "" || !strings.Contains(body, "no readings") {
		t.Errorf("a failed gather: %d, Content-Encoding %q, body %q", resp.StatusCode, resp.Header.Get("Content-Encoding"), body)
	}
}

type failingCollector struct{ d *prometheus.Desc }

func (f failingCollector) Describe(ch chan<- *prometheus.Desc) { ch <- f.d }
func (f failingCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.NewInvalidMetric(f.d, errors.New("no readings"))
}
