// Package nvmlgpu reads NVIDIA GPUs through NVML (github.com/NVIDIA/go-nvml).
// It is the only package that imports go-nvml, and the only one that needs
// cgo. NVML is always passed in as nvml.Interface, so tests use go-nvml's
// pkg/nvml/mock and production uses nvml.New().
package nvmlgpu

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"go.uber.org/zap"

	"citadel-supervisor/gpu"
)

// Error is a failed NVML call. nvml.Return is not kept as an error value
// on its own: it is wrapped with the operation that returned it.
type Error struct {
	Op  string
	Ret nvml.Return
}

func (e *Error) Error() string { return e.Op + ": " + e.Ret.Error() }

func nvmlError(op string, ret nvml.Return) error { return &Error{Op: op, Ret: ret} }

// IsLost reports whether err says the GPU fell off the bus.
func IsLost(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.Ret == nvml.ERROR_GPU_IS_LOST
}

// Backend reads every GPU through NVML and counts Xid critical errors.
type Backend struct {
	lib   nvml.Interface
	log   *zap.Logger
	after func(time.Duration) <-chan time.Time // time.After; tests pace retries
	noV2  atomic.Bool                          // the driver lacks nvmlDeviceGetMemoryInfo_v2
	mu    sync.Mutex
	xids  map[string]map[uint64]uint64 // uuid → xid → count
	count int
}

var (
	_ gpu.Reader    = (*Backend)(nil)
	_ gpu.XidReader = (*Backend)(nil)
)

// Open initialises NVML. Without a driver it returns an error wrapping
// gpu.ErrNoDriver: the daemon then runs without GPU readings and says so.
// Close must follow a successful Open.
func Open(lib nvml.Interface, log *zap.Logger) (*Backend, error) {
	ret := lib.Init()
	switch ret {
	case nvml.SUCCESS:
	case nvml.ERROR_LIBRARY_NOT_FOUND:
		return nil, fmt.Errorf("nvml Init: %w", gpu.ErrNoDriver)
	default:
		return nil, nvmlError("nvml Init", ret)
	}
	n, ret := lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		lib.Shutdown()
		return nil, nvmlError("nvml DeviceGetCount", ret)
	}
	return &Backend{lib: lib, log: log, after: time.After, xids: map[string]map[uint64]uint64{}, count: n}, nil
}

// Close shuts NVML down.
func (b *Backend) Close() error {
	if ret := b.lib.Shutdown(); ret != nvml.SUCCESS {
		return nvmlError("nvml Shutdown", ret)
	}
	return nil
}

// Read reads every GPU. A GPU that fails (lost, or an essential reading
// errors) is returned with Up false and Err saying why; the others are read
// normally. Readings that only some GPUs support (power, temperature,
// utilization) are left at -1 when unsupported.
func (b *Backend) Read(context.Context) ([]gpu.Device, error) {
	out := make([]gpu.Device, 0, b.count)
	for i := range b.count {
		d := gpu.Device{Index: i, Processes: []gpu.Process{}, Utilization: -1, Temperature: -1, PowerWatts: -1}
		if err := b.readDevice(i, &d); err != nil {
			d.Up, d.Err = false, err.Error()
			if IsLost(err) {
				d.Err = "GPU is lost (fell off the bus): " + err.Error()
			}
		} else {
			d.Up = true
		}
		out = append(out, d)
	}
	return out, nil
}

func (b *Backend) readDevice(i int, d *gpu.Device) error {
	dev, ret := b.lib.DeviceGetHandleByIndex(i)
	if ret != nvml.SUCCESS {
		return nvmlError(fmt.Sprintf("GPU%d DeviceGetHandleByIndex", i), ret)
	}
	if d.UUID, ret = dev.GetUUID(); ret != nvml.SUCCESS {
		return nvmlError(fmt.Sprintf("GPU%d GetUUID", i), ret)
	}
	if name, ret := dev.GetName(); ret == nvml.SUCCESS {
		d.Name = name
	}
	if pci, ret := dev.GetPciInfo(); ret == nvml.SUCCESS {
		d.PCIBusID = busID(pci.BusId)
	}
	if err := b.readMemory(dev, d); err != nil {
		return err
	}
	if u, ret := dev.GetUtilizationRates(); ret == nvml.SUCCESS {
		d.Utilization = float64(u.Gpu) / 100
	} else if ret == nvml.ERROR_GPU_IS_LOST {
		return nvmlError(d.UUID+" GetUtilizationRates", ret)
	}
	if t, ret := dev.GetTemperature(nvml.TEMPERATURE_GPU); ret == nvml.SUCCESS {
		d.Temperature = float64(t)
	}
	if mw, ret := dev.GetPowerUsage(); ret == nvml.SUCCESS {
		d.PowerWatts = float64(mw) / 1000
	}
	procs, ret := dev.GetComputeRunningProcesses()
	if ret != nvml.SUCCESS {
		return nvmlError(d.UUID+" GetComputeRunningProcesses", ret)
	}
	for _, p := range procs {
		d.Processes = append(d.Processes, gpu.Process{PID: int(p.Pid), UsedMemory: p.UsedGpuMemory})
	}
	return nil
}

// readMemory prefers GetMemoryInfo_v2, whose Used excludes memory the driver
// reserves (v1 counts it as used), and falls back to v1 on drivers without
// it, remembering that.
func (b *Backend) readMemory(dev nvml.Device, d *gpu.Device) error {
	if !b.noV2.Load() {
		m, ret := dev.GetMemoryInfo_v2()
		switch ret {
		case nvml.SUCCESS:
			d.MemoryTotal, d.MemoryUsed, d.MemoryFree = m.Total, m.Used, m.Free
			return nil
		case nvml.ERROR_FUNCTION_NOT_FOUND, nvml.ERROR_NOT_SUPPORTED:
			b.noV2.Store(true)
			b.log.Info("NVML has no GetMemoryInfo_v2; using v1 (reserved memory counts as used)")
		default:
			return nvmlError(d.UUID+" GetMemoryInfo_v2", ret)
		}
	}
	m, ret := dev.GetMemoryInfo()
	if ret != nvml.SUCCESS {
		return nvmlError(d.UUID+" GetMemoryInfo", ret)
	}
	d.MemoryTotal, d.MemoryUsed, d.MemoryFree = m.Total, m.Used, m.Free
	return nil
}

func busID(b [32]int8) string {
	var sb strings.Builder
	for _, c := range b {
		if c == 0 {
			break
		}
		sb.WriteByte(byte(c))
	}
	return sb.String()
}

// xidWait is how long one wait for an event blocks, in milliseconds: the
// bound on how long WatchXids takes to notice ctx ending.
const xidWait = 1000

// A wait for events that fails with anything but a timeout returns at
// once, and a driver in trouble keeps failing it: retries back off from
// xidRetryMin, doubling up to xidRetryMax, so WatchXids neither spins a
// core nor floods the log.
const (
	xidRetryMin = time.Second
	xidRetryMax = time.Minute
)

// WatchXids counts Xid critical errors (a fallen GPU, a double-bit ECC
// error, a hung engine …) until ctx ends. GPUs that do not support events
// are skipped and logged. A failing wait is logged when it starts failing
// and when it works again, and retried with backoff meanwhile.
func (b *Backend) WatchXids(ctx context.Context) error {
	set, ret := b.lib.EventSetCreate()
	if ret != nvml.SUCCESS {
		return nvmlError("nvml EventSetCreate", ret)
	}
	defer set.Free()
	registered := 0
	for i := range b.count {
		dev, ret := b.lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			continue
		}
		if ret := dev.RegisterEvents(nvml.EventTypeXidCriticalError, set); ret != nvml.SUCCESS {
			b.log.Warn("Xid events not available", zap.Int("gpu", i), zap.String("error", ret.Error()))
			continue
		}
		registered++
	}
	if registered == 0 {
		<-ctx.Done()
		return nil
	}
	var (
		retry    time.Duration // the wait before the next retry; 0 while waits work
		failures int
	)
	for ctx.Err() == nil {
		data, ret := set.Wait(xidWait)
		if ret != nvml.SUCCESS && ret != nvml.ERROR_TIMEOUT {
			failures++
			if retry == 0 {
				b.log.Warn("waiting for Xid events failed; retrying with backoff, Xid errors are not counted meanwhile",
					zap.Error(nvmlError("nvml EventSet Wait", ret)), zap.Duration("max_retry_delay", xidRetryMax))
				retry = xidRetryMin
			} else {
				retry = min(2*retry, xidRetryMax)
			}
			select {
			case <-ctx.Done():
			case <-b.after(retry):
			}
			continue
		}
		if retry != 0 {
			b.log.Info("waiting for Xid events works again", zap.Int("failed_waits", failures))
			retry, failures = 0, 0
		}
		if ret == nvml.ERROR_TIMEOUT || data.EventType != nvml.EventTypeXidCriticalError || data.Device == nil {
			continue
		}
		uuid, ret := data.Device.GetUUID()
		if ret != nvml.SUCCESS {
			uuid = "unknown"
		}
		b.log.Warn("Xid critical error", zap.String("uuid", uuid), zap.Uint64("xid", data.EventData))
		b.mu.Lock()
		if b.xids[uuid] == nil {
			b.xids[uuid] = map[uint64]uint64{}
		}
		b.xids[uuid][data.EventData]++
		b.mu.Unlock()
	}
	return nil
}

// Xids returns a copy of the Xid counts: uuid → xid → count.
func (b *Backend) Xids() map[string]map[uint64]uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := make(map[string]map[uint64]uint64, len(b.xids))
	for u, m := range b.xids {
		out[u] = maps.Clone(m)
	}
	return out
}
