// Package exposition serves the daemon's metrics: the collectors registered
// with client_golang's registry, and families that write their own text
// exposition past it (the model and probe series, some 8,000 of the 8,270
// series of a scrape at 200 models), merged into one exposition in the
// text format.
//
// The registry writes every series into a dto.Metric, checks it against
// its Desc and sorts it, and the encoder then reads it back to text: at 200
// models most of a scrape's CPU time outside the kernel's reads
// (docs/performance.md, "The /metrics scrape at 200 models"). A Families
// writes its text from its own snapshot instead; it is still a
// prometheus.Collector, so Gather, the protobuf format and the tests see
// the same series through the registry.
package exposition

import (
	"bytes"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Families is a set of metric families that writes its own text
// exposition (format 0.0.4) of the series it collects.
type Families interface {
	prometheus.Collector
	// AppendText appends the text exposition of its families to b and
	// their extents to fams, and returns both. Each family is its HELP and
	// TYPE lines then its samples, sorted as the registry sorts them (by
	// label values, in the order of the label names); a family without a
	// sample is left out. The families need not be in any order. Metric
	// and label names are valid in the legacy character set
	// ([a-zA-Z_:][a-zA-Z0-9_:]*), which every escaping scheme but dots
	// leaves as it is. It may be called concurrently.
	AppendText(b []byte, fams []Family) ([]byte, []Family)
}

// Family is one family of an AppendText: its name and its text, b[Start:End].
type Family struct {
	Name       string
	Start, End int
}

// Registry is a prometheus.Registry that also holds Families. Its Gather
// gathers both; its Handler serves both.
type Registry struct {
	*prometheus.Registry // the collectors gathered through client_golang

	// texts is the Families as collectors, for Gather and the formats
	// other than text.
	texts *prometheus.Registry

	mu  sync.Mutex
	fam []Families
}

// NewRegistry returns an empty registry.
func NewRegistry() *Registry {
	return &Registry{Registry: prometheus.NewRegistry(), texts: prometheus.NewRegistry()}
}

// RegisterText registers f. Its Descs are registered with the embedded
// registry too, so that a collector that describes the same series is
// refused, either way round.
func (r *Registry) RegisterText(f Families) error {
	if err := r.Registry.Register(describer{f}); err != nil {
		return err
	}
	if err := r.texts.Register(f); err != nil {
		r.Registry.Unregister(describer{f})
		return err
	}
	r.mu.Lock()
	r.fam = append(r.fam, f)
	r.mu.Unlock()
	return nil
}

var _ prometheus.Gatherer = (*Registry)(nil)

// describer reserves a Families' Descs in the registry, where it collects
// nothing.
type describer struct{ f Families }

func (d describer) Describe(ch chan<- *prometheus.Desc) { d.f.Describe(ch) }
func (describer) Collect(chan<- prometheus.Metric)      {}

// Gather gathers every series, the Families' through their Collect.
func (r *Registry) Gather() ([]*dto.MetricFamily, error) {
	return prometheus.Gatherers{r.Registry, r.texts}.Gather()
}

// WriteText writes the whole exposition to buf in format, a text format
// whose escaping scheme is not dots (TextFormat says): the registry's
// families encoded by expfmt and the Families' own text, in the order of
// the families' names, as the registry gives them. only, where not nil,
// keeps the families it names. Where the registry fails, it writes what
// was gathered (the Families' text and the families the registry gathered
// all the same) and returns the registry's error.
func (r *Registry) WriteText(buf *bytes.Buffer, format expfmt.Format, only map[string]struct{}) error {
	r.mu.Lock()
	fam := slices.Clone(r.fam)
	r.mu.Unlock()
	keep := func(name string) bool {
		if only == nil {
			return true
		}
		_, ok := only[name]
		return ok
	}
	texts := make([]*[]byte, len(fam)+1) // the last one the registry's
	for i := range texts {
		texts[i] = textPool.Get().(*[]byte)
	}
	defer func() {
		for _, t := range texts {
			textPool.Put(t)
		}
	}()
	famsOf := make([][]Family, len(texts))
	var wg sync.WaitGroup
	for i, f := range fam {
		wg.Go(func() { *texts[i], famsOf[i] = f.AppendText((*texts[i])[:0], nil) })
	}
	// The registry gathers its collectors meanwhile, and its families are
	// encoded while the Families may still write.
	mfs, err := r.Registry.Gather()
	enc := bytes.NewBuffer((*texts[len(fam)])[:0])
	e := expfmt.NewEncoder(enc, format)
	var own []Family
	for _, mf := range mfs {
		if !keep(mf.GetName()) {
			continue
		}
		start := enc.Len()
		if eerr := e.Encode(mf); eerr != nil && err == nil {
			err = eerr // a bytes.Buffer writes: an invalid family, which the registry would not gather
		}
		own = append(own, Family{Name: mf.GetName(), Start: start, End: enc.Len()})
	}
	*texts[len(fam)], famsOf[len(fam)] = enc.Bytes(), own
	wg.Wait()
	type part struct {
		name string
		text []byte
	}
	var parts []part
	for i, fs := range famsOf {
		for _, f := range fs {
			if keep(f.Name) {
				parts = append(parts, part{f.Name, (*texts[i])[f.Start:f.End]})
			}
		}
	}
	// In the order of the names, as the registry gives its own.
	slices.SortStableFunc(parts, func(a, b part) int { return strings.Compare(a.name, b.name) })
	for _, p := range parts {
		buf.Write(p.text)
	}
	return err
}

// TextFormat tells whether WriteText writes format: the text format, with
// an escaping scheme that leaves legacy names as they are.
func TextFormat(format expfmt.Format) bool {
	return format.FormatType() == expfmt.TypeTextPlain && format.ToEscapingScheme() != model.DotsEscaping
}

// textPool and bodyPool keep the buffers of a scrape (the Families' text
// and the registry's, and the whole: 480 KiB at 200 models) for the next.
var (
	textPool = sync.Pool{New: func() any { return new([]byte) }}
	bodyPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}
)

// Handler serves the registry over HTTP as promhttp.HandlerFor(r, opts)
// does: the format negotiated from the Accept header among
// opts.AcceptedFormats (or promhttp's defaults), the name[] parameter's
// filter, opts.MaxRequestsInFlight, opts.ErrorLog and opts.ErrorHandling,
// opts.ProcessStartTime. A text answer is WriteText's; any other format
// (protobuf, OpenMetrics where opts.EnableOpenMetrics) and dots escaping
// are promhttp's own, of Gather. opts.Registry (the handler's error
// counter) and opts.Timeout apply to the latter only. It does not
// compress: opts.DisableCompression must be set, and the caller compress.
func (r *Registry) Handler(opts promhttp.HandlerOpts) http.Handler {
	if !opts.DisableCompression {
		panic("exposition: Handler does not compress; set DisableCompression and compress around it")
	}
	accepted := opts.AcceptedFormats
	if len(accepted) == 0 {
		accepted = expfmt.DefaultAcceptedFormats()
		if opts.EnableOpenMetrics {
			accepted = expfmt.DefaultOpenMetricsAcceptedFormats()
		}
	}
	var inFlight chan struct{}
	if opts.MaxRequestsInFlight > 0 {
		inFlight = make(chan struct{}, opts.MaxRequestsInFlight)
	}
	limit := opts.MaxRequestsInFlight
	opts.MaxRequestsInFlight = 0 // this handler's bound covers both
	other := promhttp.HandlerFor(r, opts)
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if inFlight != nil {
			select {
			case inFlight <- struct{}{}:
				defer func() { <-inFlight }()
			default:
				http.Error(w, fmt.Sprintf("Limit of concurrent requests reached (%d), try again later.", limit), http.StatusServiceUnavailable)
				return
			}
		}
		format := expfmt.NegotiateAccept(req.Header, accepted...)
		if !TextFormat(format) {
			other.ServeHTTP(w, req)
			return
		}
		if !opts.ProcessStartTime.IsZero() {
			w.Header().Set("Process-Start-Time-Unix", strconv.FormatInt(opts.ProcessStartTime.Unix(), 10))
		}
		var only map[string]struct{}
		if req.URL != nil {
			if names := req.URL.Query()["name[]"]; len(names) > 0 {
				only = make(map[string]struct{}, len(names))
				for _, n := range names {
					only[n] = struct{}{}
				}
			}
		}
		body := bodyPool.Get().(*bytes.Buffer)
		defer bodyPool.Put(body)
		body.Reset()
		if err := r.WriteText(body, format, only); err != nil {
			if opts.ErrorLog != nil {
				opts.ErrorLog.Println("error gathering metrics:", err)
			}
			switch {
			case opts.ErrorHandling == promhttp.PanicOnError:
				panic(err)
			case opts.ErrorHandling == promhttp.ContinueOnError && body.Len() > 0:
				// What was gathered goes out.
			default:
				w.Header().Del("Content-Encoding")
				http.Error(w, "An error has occurred while serving metrics:\n\n"+err.Error(), http.StatusInternalServerError)
				return
			}
		}
		w.Header().Add("Vary", "Accept")
		w.Header().Set("Content-Type", string(format))
		w.Write(body.Bytes()) //nolint:errcheck // the client went away
	})
}
