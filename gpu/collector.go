package gpu

import (
	"context"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"
)

// readTimeout bounds one scrape's GPU read.
const readTimeout = 5 * time.Second

// Collector exposes the GPUs as Prometheus metrics, read at scrape time.
// Concurrent scrapes share one read (NVML calls are not free, and a slow
// driver must not pile up readers).
//
// A failed read never fails the scrape: like node_exporter's execute(), the
// collector reports citadel_scrape_collector_success{collector="gpu"} 0 and
// leaves the GPU series out, so the model series, go_ and process_ still
// reach Prometheus exactly when the operator needs them. (An invalid metric
// would make promhttp answer 500 for the whole exposition.)
type Collector struct {
	backend string
	status  string // ok, disabled, no_driver, error
	reader  Reader // nil: no readings; only citadel_gpu_backend_info is emitted
	xids    XidReader
	owners  func() map[int]string // pid → model
	sf      singleflight.Group
	now     func() time.Time
	log     *zap.Logger
	failing atomic.Bool // the last read failed (logged once per failure run)

	info, up, total, used, free, util, temp, power, xid, modelMem, backendInfo *prometheus.Desc
	scrapeSuccess, scrapeDuration                                              *prometheus.Desc
}

var _ prometheus.Collector = (*Collector)(nil)

// NewCollector returns a collector over reader (nil when there are no
// readings; status then says why: disabled, no_driver or error). owners
// attributes GPU processes to models for citadel_model_gpu_memory_bytes.
func NewCollector(backend, status string, reader Reader, owners func() map[int]string) *Collector {
	gpuLabels := []string{"gpu", "uuid"}
	c := &Collector{
		backend: backend, status: status, reader: reader, owners: owners, now: time.Now, log: zap.NewNop(),
		info:        prometheus.NewDesc("citadel_gpu_info", "A GPU of this host; always 1.", []string{"gpu", "uuid", "name", "pci_bus_id"}, nil),
		up:          prometheus.NewDesc("citadel_gpu_up", "1 if the GPU answers, 0 if it stopped answering (nothing new is placed on it).", gpuLabels, nil),
		total:       prometheus.NewDesc("citadel_gpu_memory_total_bytes", "GPU memory in total.", gpuLabels, nil),
		used:        prometheus.NewDesc("citadel_gpu_memory_used_bytes", "GPU memory in use.", gpuLabels, nil),
		free:        prometheus.NewDesc("citadel_gpu_memory_free_bytes", "GPU memory free.", gpuLabels, nil),
		util:        prometheus.NewDesc("citadel_gpu_utilization_ratio", "GPU compute utilization over the driver's last sample period, 0 to 1.", gpuLabels, nil),
		temp:        prometheus.NewDesc("citadel_gpu_temperature_celsius", "GPU core temperature.", gpuLabels, nil),
		power:       prometheus.NewDesc("citadel_gpu_power_watts", "GPU power draw.", gpuLabels, nil),
		xid:         prometheus.NewDesc("citadel_gpu_xid_errors_total", "Xid critical errors reported by the driver since the supervisor started.", []string{"gpu", "uuid", "xid"}, nil),
		modelMem:    prometheus.NewDesc("citadel_model_gpu_memory_bytes", "GPU memory used by all of a model's processes, per GPU.", []string{"model", "uuid"}, nil),
		backendInfo: prometheus.NewDesc("citadel_gpu_backend_info", "The GPU backend and whether it gives readings (status ok, disabled, no_driver, error); always 1.", []string{"backend", "status"}, nil),
		scrapeSuccess: prometheus.NewDesc("citadel_scrape_collector_success", "1 if the collector's read succeeded at this scrape, 0 if it failed (its series are then absent).",
			[]string{"collector"}, nil),
		scrapeDuration: prometheus.NewDesc("citadel_scrape_collector_duration_seconds", "How long the collector's read took at this scrape.",
			[]string{"collector"}, nil),
	}
	if x, ok := reader.(XidReader); ok {
		c.xids = x
	}
	return c
}

// LogTo makes the collector log a failed GPU read (once when reads start
// failing, once when they work again) to log, and returns it. The scrape
// itself only carries citadel_scrape_collector_success 0, not the error.
func (c *Collector) LogTo(log *zap.Logger) *Collector {
	c.log = log
	return c
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		c.info, c.up, c.total, c.used, c.free, c.util, c.temp, c.power, c.xid, c.modelMem, c.backendInfo,
		c.scrapeSuccess, c.scrapeDuration,
	} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	if c.reader == nil {
		ch <- prometheus.MustNewConstMetric(c.backendInfo, prometheus.GaugeValue, 1, c.backend, c.status)
		return
	}
	start := c.now()
	v, err, _ := c.sf.Do("read", func() (any, error) {
		ctx, cancel := context.WithTimeout(context.Background(), readTimeout)
		defer cancel()
		return c.reader.Read(ctx)
	})
	status := "ok"
	if err != nil {
		status = "error"
	}
	ch <- prometheus.MustNewConstMetric(c.backendInfo, prometheus.GaugeValue, 1, c.backend, status)
	ch <- prometheus.MustNewConstMetric(c.scrapeDuration, prometheus.GaugeValue, c.now().Sub(start).Seconds(), "gpu")
	ch <- prometheus.MustNewConstMetric(c.scrapeSuccess, prometheus.GaugeValue, boolf(err == nil), "gpu")
	switch wasFailing := c.failing.Swap(err != nil); {
	case err != nil && !wasFailing:
		c.log.Error("GPU readings failed: GPU series are left out of /metrics until they work again", zap.Error(err))
	case err == nil && wasFailing:
		c.log.Info("GPU readings work again")
	}
	if err != nil {
		return
	}
	devs := v.([]Device)
	byUUID := map[string]string{}
	owners := map[int]string{}
	if c.owners != nil {
		owners = c.owners()
	}
	type key struct{ model, uuid string }
	modelMem := map[key]uint64{}
	for _, d := range devs {
		idx := strconv.Itoa(d.Index)
		byUUID[d.UUID] = idx
		ch <- prometheus.MustNewConstMetric(c.info, prometheus.GaugeValue, 1, idx, d.UUID, d.Name, d.PCIBusID)
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, boolf(d.Up), idx, d.UUID)
		if !d.Up {
			continue
		}
		ch <- prometheus.MustNewConstMetric(c.total, prometheus.GaugeValue, float64(d.MemoryTotal), idx, d.UUID)
		ch <- prometheus.MustNewConstMetric(c.used, prometheus.GaugeValue, float64(d.MemoryUsed), idx, d.UUID)
		ch <- prometheus.MustNewConstMetric(c.free, prometheus.GaugeValue, float64(d.MemoryFree), idx, d.UUID)
		if d.Utilization >= 0 {
			ch <- prometheus.MustNewConstMetric(c.util, prometheus.GaugeValue, d.Utilization, idx, d.UUID)
		}
		if d.Temperature >= 0 {
			ch <- prometheus.MustNewConstMetric(c.temp, prometheus.GaugeValue, d.Temperature, idx, d.UUID)
		}
		if d.PowerWatts >= 0 {
			ch <- prometheus.MustNewConstMetric(c.power, prometheus.GaugeValue, d.PowerWatts, idx, d.UUID)
		}
		for _, p := range d.Processes {
			if m, ok := owners[p.PID]; ok {
				modelMem[key{m, d.UUID}] += p.UsedMemory
			}
		}
	}
	for k, b := range modelMem {
		ch <- prometheus.MustNewConstMetric(c.modelMem, prometheus.GaugeValue, float64(b), k.model, k.uuid)
	}
	if c.xids != nil {
		for uuid, counts := range c.xids.Xids() {
			for xid, n := range counts {
				ch <- prometheus.MustNewConstMetric(c.xid, prometheus.CounterValue, float64(n), byUUID[uuid], uuid, strconv.FormatUint(xid, 10))
			}
		}
	}
}

func boolf(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
