package exposition

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// texts is a Families of two families, b_text_gauge{model} and
// d_text_total, whose names fall between the registry's families' in the
// tests below. enter, where set, is signalled at each AppendText, which
// then waits for release.
type texts struct {
	gauge, total   *prometheus.Desc
	models         []string
	enter, release chan struct{}
}

func newTexts(models ...string) *texts {
	return &texts{
		gauge:  prometheus.NewDesc("b_text_gauge", "A gauge with a \\ and a\nnewline in its help.", []string{"model"}, nil),
		total:  prometheus.NewDesc("d_text_total", "A counter.", nil, nil),
		models: models,
	}
}

func (t *texts) Describe(ch chan<- *prometheus.Desc) { ch <- t.gauge; ch <- t.total }

func (t *texts) Collect(ch chan<- prometheus.Metric) {
	for i, m := range t.models {
		ch <- prometheus.MustNewConstMetric(t.gauge, prometheus.GaugeValue, float64(i)+0.5, m)
	}
	ch <- prometheus.MustNewConstMetric(t.total, prometheus.CounterValue, 42)
}

func (t *texts) AppendText(b []byte, fams []Family) ([]byte, []Family) {
	if t.enter != nil {
		t.enter <- struct{}{}
		<-t.release
	}
	if len(t.models) > 0 {
		start := len(b)
		b = append(b, "# HELP b_text_gauge A gauge with a \\\\ and a\\nnewline in its help.\n# TYPE b_text_gauge gauge\n"...)
		for i, m := range t.models { // sorted by the tests
			b = fmt.Appendf(b, "b_text_gauge{model=%q} %g\n", m, float64(i)+0.5)
		}
		fams = append(fams, Family{"b_text_gauge", start, len(b)})
	}
	start := len(b)
	b = append(b, "# HELP d_text_total A counter.\n# TYPE d_text_total counter\nd_text_total 42\n"...)
	return b, append(fams, Family{"d_text_total", start, len(b)})
}

// newTestRegistry has the texts and three families of the registry's own,
// a_reg, c_reg and e_reg (a histogram).
func newTestRegistry(t *testing.T, f Families) *Registry {
	t.Helper()
	r := NewRegistry()
	a := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "a_reg", Help: "Registry's."}, []string{"model"})
	a.WithLabelValues("x").Set(3)
	a.WithLabelValues("w").Set(-1)
	c := prometheus.NewCounter(prometheus.CounterOpts{Name: "c_reg_total", Help: "Registry's."})
	c.Add(7)
	e := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "e_reg_seconds", Help: "Registry's.", Buckets: []float64{.1, 1}})
	e.Observe(.5)
	r.MustRegister(a, c, e)
	if err := r.RegisterText(f); err != nil {
		t.Fatal(err)
	}
	return r
}

// TestWriteTextIsTheRegistrysExposition: the text written is the one the
// registry's own path gives of the same series (Gather, encoded by
// expfmt), byte for byte, the Families' families in their place by name.
func TestWriteTextIsTheRegistrysExposition(t *testing.T) {
	r := newTestRegistry(t, newTexts("m1", "m2"))
	var got bytes.Buffer
	if err := r.WriteText(&got, expfmt.NewFormat(expfmt.TypeTextPlain), nil); err != nil {
		t.Fatal(err)
	}
	mfs, err := r.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var want bytes.Buffer
	enc := expfmt.NewEncoder(&want, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if err := enc.Encode(mf); err != nil {
			t.Fatal(err)
		}
	}
	if got.String() != want.String() {
		t.Fatalf("WriteText:\n%s\nthe registry's:\n%s", got.String(), want.String())
	}
	var names []string
	for _, line := range strings.Split(got.String(), "\n") {
		if name, ok := strings.CutPrefix(line, "# TYPE "); ok {
			names = append(names, strings.Fields(name)[0])
		}
	}
	if fmt.Sprint(names) != "[a_reg b_text_gauge c_reg_total d_text_total e_reg_seconds]" {
		t.Errorf("families %v", names)
	}
}

// TestHandlerAnswersAsPromhttp: for each Accept header and name[] filter,
// the handler's answer (status, Content-Type, Vary, body) is promhttp's
// over Gather: the text format (also to a client that asks for
// OpenMetrics while the handler does not offer it) from WriteText, the
// others from promhttp.
func TestHandlerAnswersAsPromhttp(t *testing.T) {
	r := newTestRegistry(t, newTexts("m1", "m2"))
	accepts := []string{
		"",
		"*/*",
		"text/plain",
		"text/plain;version=0.0.4",
		"text/plain;version=1.0.0;escaping=allow-utf-8",
		"text/plain;version=0.0.4;escaping=values",
		"text/plain;version=0.0.4;escaping=dots",
		"application/openmetrics-text;version=1.0.0",
		// Prometheus's default scrape protocols.
		"application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,text/plain;version=0.0.4;q=0.2,*/*;q=0.1",
		// With native histograms.
		"application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.6,application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.2",
		"application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=text",
	}
	for _, openMetrics := range []bool{false, true} {
		opts := promhttp.HandlerOpts{DisableCompression: true, EnableOpenMetrics: openMetrics, ProcessStartTime: time.Unix(1795000000, 0)}
		ours, theirs := r.Handler(opts), promhttp.HandlerFor(prometheus.Gatherers{r}, opts)
		for _, accept := range accepts {
			for _, query := range []string{"", "?name[]=b_text_gauge&name[]=c_reg_total", "?name[]=d_text_total"} {
				name := fmt.Sprintf("openmetrics %v, Accept %q, %q", openMetrics, accept, query)
				got, want := serve(ours, accept, query), serve(theirs, accept, query)
				if got != want {
					t.Errorf("%s:\n%s\npromhttp's:\n%s", name, got, want)
				}
				if ct, _, _ := strings.Cut(got, "\n"); strings.Contains(ct, "text/plain") {
					body := got[strings.Index(got, "\n\n")+2:]
					parser := expfmt.NewTextParser(model.UTF8Validation)
					if _, err := parser.TextToMetricFamilies(strings.NewReader(body)); err != nil {
						t.Errorf("%s: %v", name, err)
					}
				}
			}
		}
	}
}

// serve returns an answer's status, headers that matter and body.
func serve(h http.Handler, accept, query string) string {
	req := httptest.NewRequest("GET", "/metrics"+query, nil)
	if accept != "" {
		req.Header.Set("Accept", accept)
	}
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	resp := w.Result()
	b, _ := io.ReadAll(resp.Body)
	return fmt.Sprintf("%d %s\nVary: %q\nProcess-Start-Time-Unix: %s\n\n%s", resp.StatusCode, resp.Header.Get("Content-Type"),
		resp.Header.Values("Vary"), resp.Header.Get("Process-Start-Time-Unix"), b)
}

// TestHandlerBoundsScrapes: past MaxRequestsInFlight a scrape is answered
// 503, in either path.
func TestHandlerBoundsScrapes(t *testing.T) {
	f := newTexts("m1")
	f.enter, f.release = make(chan struct{}), make(chan struct{})
	r := newTestRegistry(t, f)
	h := r.Handler(promhttp.HandlerOpts{DisableCompression: true, MaxRequestsInFlight: 1})
	var wg sync.WaitGroup
	wg.Go(func() { serve(h, "", "") })
	select {
	case <-f.enter:
	case <-time.After(10 * time.Second):
		t.Fatal("the first scrape did not begin")
	}
	for _, accept := range []string{"", "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"} {
		if got := serve(h, accept, ""); !strings.HasPrefix(got, "503 ") || !strings.Contains(got, "Limit of concurrent requests reached (1)") {
			t.Errorf("Accept %q, a second scrape meanwhile: %s", accept, got)
		}
	}
	close(f.release)
	wg.Wait()
	f.enter = nil
	if got := serve(h, "", ""); !strings.HasPrefix(got, "200 ") {
		t.Errorf("after: %s", got)
	}
}

type failing struct{ d *prometheus.Desc }

func (f failing) Describe(ch chan<- *prometheus.Desc) { ch <- f.d }
func (f failing) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.NewInvalidMetric(f.d, errors.New("no readings"))
}

// TestHandlerGatherError: a collector's error is a 500 with the error, as
// promhttp answers it, and logged.
func TestHandlerGatherError(t *testing.T) {
	r := newTestRegistry(t, newTexts("m1"))
	r.MustRegister(failing{prometheus.NewDesc("f_reg", "Fails.", nil, nil)})
	var logged strings.Builder
	logger := loggerFunc(func(v ...any) { fmt.Fprintln(&logged, v...) })
	opts := promhttp.HandlerOpts{DisableCompression: true, ErrorLog: logger}
	// The registry's error as a registry's handler answers it (Gather's
	// says which of the two registries failed).
	got, want := serve(r.Handler(opts), "", ""), serve(promhttp.HandlerFor(r.Registry, opts), "", "")
	if got != want || !strings.HasPrefix(got, "500 ") || !strings.Contains(got, "no readings") {
		t.Errorf("got:\n%s\npromhttp's:\n%s", got, want)
	}
	if !strings.Contains(logged.String(), "no readings") {
		t.Errorf("logged %q", logged.String())
	}
	opts.ErrorHandling = promhttp.ContinueOnError
	got, want = serve(r.Handler(opts), "", ""), serve(promhttp.HandlerFor(r, opts), "", "")
	if got != want || !strings.HasPrefix(got, "200 ") || !strings.Contains(got, "b_text_gauge") {
		t.Errorf("continuing on error, got:\n%s\npromhttp's:\n%s", got, want)
	}
}

type loggerFunc func(v ...any)

func (f loggerFunc) Println(v ...any) { f(v...) }

// TestRegisterTextRefusesTheSameSeries: a collector of a Families' series
// is refused, registered before it or after.
func TestRegisterTextRefusesTheSameSeries(t *testing.T) {
	r := NewRegistry()
	if err := r.RegisterText(newTexts()); err != nil {
		t.Fatal(err)
	}
	same := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "b_text_gauge", Help: "A gauge with a \\ and a\nnewline in its help."}, []string{"model"})
	if err := r.Register(same); err == nil {
		t.Error("a collector of the same series registered after")
	}
	if err := r.RegisterText(newTexts()); err == nil {
		t.Error("the same Families registered twice")
	}
	r = NewRegistry()
	r.MustRegister(same)
	if err := r.RegisterText(newTexts()); err == nil {
		t.Error("a Families of a registered collector's series")
	}
	if n := len(r.fam); n != 0 {
		t.Errorf("%d Families kept of a refused registration", n)
	}
}
