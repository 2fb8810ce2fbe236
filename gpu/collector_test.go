package gpu

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

type staticReader struct {
	mu    sync.Mutex
	devs  []Device
	err   error
	reads atomic.Int32
	gate  chan struct{} // when set, Read blocks until it is closed
	xids  map[string]map[uint64]uint64
}

func (r *staticReader) Read(context.Context) ([]Device, error) {
	r.reads.Add(1)
	if r.gate != nil {
		<-r.gate
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.devs, r.err
}

// set changes what the next reads return.
func (r *staticReader) set(devs []Device, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.devs, r.err = devs, err
}

func (r *staticReader) Xids() map[string]map[uint64]uint64 { return r.xids }

var twoDevices = []Device{
	{Index: 0, UUID: "GPU-a", Name: "NVIDIA H100 80GB HBM3", PCIBusID: "00000000:1B:00.0", MemoryTotal: 80 << 30, MemoryUsed: 60 << 30, MemoryFree: 20 << 30,
		Utilization: 0.45, Temperature: 61, PowerWatts: 312.5, Up: true,
		Processes: []Process{{PID: 10, UsedMemory: 30 << 30}, {PID: 11, UsedMemory: 20 << 30}, {PID: 99, UsedMemory: 10 << 30}}},
	{Index: 1, UUID: "GPU-b", Name: "NVIDIA H100 80GB HBM3", PCIBusID: "00000000:1C:00.0", Up: false, Err: "GPU is lost"},
}

// steppingClock returns a now that moves on by step at each call, so a read
// seems to take step.
func steppingClock(step time.Duration) func() time.Time {
	var mu sync.Mutex
	t := time.Unix(1_700_000_000, 0)
	return func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		t = t.Add(step)
		return t
	}
}

func TestCollectorGolden(t *testing.T) {
	r := &staticReader{devs: twoDevices, xids: map[string]map[uint64]uint64{"GPU-b": {79: 2}}}
	c := NewCollector("nvml", "ok", r, func() map[int]string { return map[int]string{10: "mixtral", 11: "mixtral"} })
	c.now = steppingClock(250 * time.Millisecond)
	want := `
# HELP citadel_gpu_backend_info The GPU backend and whether it gives readings (status ok, disabled, no_driver, error); always 1.
# TYPE citadel_gpu_backend_info gauge
citadel_gpu_backend_info{backend="nvml",status="ok"} 1
# HELP citadel_scrape_collector_duration_seconds How long the collector's read took at this scrape.
# TYPE citadel_scrape_collector_duration_seconds gauge
citadel_scrape_collector_duration_seconds{collector="gpu"} 0.25
# HELP citadel_scrape_collector_success 1 if the collector's read succeeded at this scrape, 0 if it failed (its series are then absent).
# TYPE citadel_scrape_collector_success gauge
citadel_scrape_collector_success{collector="gpu"} 1
# HELP citadel_gpu_info A GPU of this host; always 1.
# TYPE citadel_gpu_info gauge
citadel_gpu_info{gpu="0",name="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:1B:00.0",uuid="GPU-a"} 1
citadel_gpu_info{gpu="1",name="NVIDIA H100 80GB HBM3",pci_bus_id="00000000:1C:00.0",uuid="GPU-b"} 1
# HELP citadel_gpu_memory_free_bytes GPU memory free.
# TYPE citadel_gpu_memory_free_bytes gauge
citadel_gpu_memory_free_bytes{gpu="0",uuid="GPU-a"} 2.147483648e+10
# HELP citadel_gpu_memory_total_bytes GPU memory in total.
# TYPE citadel_gpu_memory_total_bytes gauge
citadel_gpu_memory_total_bytes{gpu="0",uuid="GPU-a"} 8.589934592e+10
# HELP citadel_gpu_memory_used_bytes GPU memory in use.
# TYPE citadel_gpu_memory_used_bytes gauge
citadel_gpu_memory_used_bytes{gpu="0",uuid="GPU-a"} 6.442450944e+10
# HELP citadel_gpu_power_watts GPU power draw.
# TYPE citadel_gpu_power_watts gauge
citadel_gpu_power_watts{gpu="0",uuid="GPU-a"} 312.5
# HELP citadel_gpu_temperature_celsius GPU core temperature.
# TYPE citadel_gpu_temperature_celsius gauge
citadel_gpu_temperature_celsius{gpu="0",uuid="GPU-a"} 61
# HELP citadel_gpu_up 1 if the GPU answers, 0 if it stopped answering (nothing new is placed on it).
# TYPE citadel_gpu_up gauge
citadel_gpu_up{gpu="0",uuid="GPU-a"} 1
citadel_gpu_up{gpu="1",uuid="GPU-b"} 0
# HELP citadel_gpu_utilization_ratio GPU compute utilization over the driver's last sample period, 0 to 1.
# TYPE citadel_gpu_utilization_ratio gauge
citadel_gpu_utilization_ratio{gpu="0",uuid="GPU-a"} 0.45
# HELP citadel_gpu_xid_errors_total Xid critical errors reported by the driver since the supervisor started.
# TYPE citadel_gpu_xid_errors_total counter
citadel_gpu_xid_errors_total{gpu="1",uuid="GPU-b",xid="79"} 2
# HELP citadel_model_gpu_memory_bytes GPU memory used by all of a model's processes, per GPU.
# TYPE citadel_model_gpu_memory_bytes gauge
citadel_model_gpu_memory_bytes{model="mixtral",uuid="GPU-a"} 5.36870912e+10
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}

func TestCollectorWithoutReadings(t *testing.T) {
	c := NewCollector("nvml", "no_driver", nil, nil)
	want := `
# HELP citadel_gpu_backend_info The GPU backend and whether it gives readings (status ok, disabled, no_driver, error); always 1.
# TYPE citadel_gpu_backend_info gauge
citadel_gpu_backend_info{backend="nvml",status="no_driver"} 1
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
}

// TestCollectorReadError: a failed read leaves the GPU series out and says
// so with citadel_scrape_collector_success 0; it does not fail the scrape.
func TestCollectorReadError(t *testing.T) {
	r := &staticReader{err: errors.New("driver hung"), xids: map[string]map[uint64]uint64{"GPU-a": {79: 1}}}
	c := NewCollector("nvml", "ok", r, nil)
	c.now = steppingClock(5 * time.Second)
	want := `
# HELP citadel_gpu_backend_info The GPU backend and whether it gives readings (status ok, disabled, no_driver, error); always 1.
# TYPE citadel_gpu_backend_info gauge
citadel_gpu_backend_info{backend="nvml",status="error"} 1
# HELP citadel_scrape_collector_duration_seconds How long the collector's read took at this scrape.
# TYPE citadel_scrape_collector_duration_seconds gauge
citadel_scrape_collector_duration_seconds{collector="gpu"} 5
# HELP citadel_scrape_collector_success 1 if the collector's read succeeded at this scrape, 0 if it failed (its series are then absent).
# TYPE citadel_scrape_collector_success gauge
citadel_scrape_collector_success{collector="gpu"} 0
`
	if err := testutil.CollectAndCompare(c, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
	if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %v", problems, err)
	}
}

// TestScrapeSurvivesAFailedGPURead goes through a real registry and
// promhttp handler, as /metrics does: with the GPU read failing, the scrape
// still answers 200 with the model series and the runtime's own.
func TestScrapeSurvivesAFailedGPURead(t *testing.T) {
	r := &staticReader{err: errors.New("driver hung")}
	reg := prometheus.NewPedanticRegistry()
	modelUp := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "citadel_model_up", Help: "1 when ready."}, []string{"model"})
	modelUp.WithLabelValues("mixtral").Set(1)
	reg.MustRegister(
		NewCollector("nvml", "ok", r, nil), modelUp,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer srv.Close()

	scrape := func() string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, srv.URL, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d with a failed GPU read, want 200:\n%s", resp.StatusCode, b)
		}
		return string(b)
	}
	body := scrape()
	for _, s := range []string{
		`citadel_model_up{model="mixtral"} 1`,
		`citadel_scrape_collector_success{collector="gpu"} 0`,
		`citadel_scrape_collector_duration_seconds{collector="gpu"}`,
		`citadel_gpu_backend_info{backend="nvml",status="error"} 1`,
		"go_goroutines ",
		"process_start_time_seconds ",
	} {
		if !strings.Contains(body, s) {
			t.Errorf("scrape lacks %s", s)
		}
	}
	if strings.Contains(body, "citadel_gpu_up") || strings.Contains(body, "driver hung") {
		t.Errorf("GPU series or the read error in a failed scrape:\n%s", body)
	}

	r.set(twoDevices, nil)
	body = scrape()
	for _, s := range []string{`citadel_scrape_collector_success{collector="gpu"} 1`, `citadel_gpu_up{gpu="0",uuid="GPU-a"} 1`} {
		if !strings.Contains(body, s) {
			t.Errorf("after the read works again, the scrape lacks %s", s)
		}
	}
}

// TestCollectorLogsReadFailuresOnce: a failing read is logged when it
// starts failing and when it works again, not at every scrape.
func TestCollectorLogsReadFailuresOnce(t *testing.T) {
	core, logs := observer.New(zap.InfoLevel)
	r := &staticReader{err: errors.New("driver hung")}
	c := NewCollector("nvml", "ok", r, nil).LogTo(zap.New(core))
	for range 5 {
		testutil.CollectAndCount(c)
	}
	if n := logs.FilterMessageSnippet("GPU readings failed").Len(); n != 1 {
		t.Errorf("5 failed reads logged %d times, want once", n)
	}
	r.set(twoDevices, nil)
	for range 3 {
		testutil.CollectAndCount(c)
	}
	if n := logs.FilterMessage("GPU readings work again").Len(); n != 1 {
		t.Errorf("recovery logged %d times, want once", n)
	}
}

// TestConcurrentScrapesShareOneRead: scrapes that arrive while a read is in
// flight wait for it instead of reading again.
func TestConcurrentScrapesShareOneRead(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := &staticReader{devs: twoDevices, gate: make(chan struct{})}
		c := NewCollector("sim", "ok", r, nil)
		var wg sync.WaitGroup
		for range 5 {
			wg.Go(func() { testutil.CollectAndCount(c) })
		}
		synctest.Wait() // every scrape is blocked: one in Read, four on its result
		close(r.gate)
		wg.Wait()
		if n := r.reads.Load(); n != 1 {
			t.Errorf("%d reads for 5 concurrent scrapes, want 1", n)
		}
	})
}
