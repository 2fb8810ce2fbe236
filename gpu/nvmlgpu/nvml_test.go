package nvmlgpu

import (
	"context"
	"errors"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"citadel-supervisor/gpu"
)

const gib = 1 << 30

func pciBus(s string) [32]int8 {
	var b [32]int8
	for i, c := range []byte(s) {
		b[i] = int8(c)
	}
	return b
}

// h100 is a healthy mocked 80 GiB GPU with one process.
func h100(i int) *mock.Device {
	uuid := []string{"GPU-aaaa", "GPU-bbbb", "GPU-cccc"}[i]
	return &mock.Device{
		GetUUIDFunc: func() (string, nvml.Return) { return uuid, nvml.SUCCESS },
		GetNameFunc: func() (string, nvml.Return) { return "NVIDIA H100 80GB HBM3", nvml.SUCCESS },
		GetPciInfoFunc: func() (nvml.PciInfo, nvml.Return) {
			return nvml.PciInfo{BusId: pciBus("00000000:1B:00.0")}, nvml.SUCCESS
		},
		GetMemoryInfo_v2Func: func() (nvml.Memory_v2, nvml.Return) {
			return nvml.Memory_v2{Total: 80 * gib, Used: 30 * gib, Free: 50 * gib, Reserved: gib / 2}, nvml.SUCCESS
		},
		GetUtilizationRatesFunc: func() (nvml.Utilization, nvml.Return) { return nvml.Utilization{Gpu: 45}, nvml.SUCCESS },
		GetTemperatureFunc:      func(nvml.TemperatureSensors) (uint32, nvml.Return) { return 61, nvml.SUCCESS },
		GetPowerUsageFunc:       func() (uint32, nvml.Return) { return 312500, nvml.SUCCESS },
		GetComputeRunningProcessesFunc: func() ([]nvml.ProcessInfo, nvml.Return) {
			return []nvml.ProcessInfo{{Pid: 4411, UsedGpuMemory: 30 * gib}}, nvml.SUCCESS
		},
		RegisterEventsFunc: func(uint64, nvml.EventSet) nvml.Return { return nvml.SUCCESS },
	}
}

func lib(devs ...nvml.Device) *mock.Interface {
	return &mock.Interface{
		InitFunc:           func() nvml.Return { return nvml.SUCCESS },
		ShutdownFunc:       func() nvml.Return { return nvml.SUCCESS },
		DeviceGetCountFunc: func() (int, nvml.Return) { return len(devs), nvml.SUCCESS },
		DeviceGetHandleByIndexFunc: func(i int) (nvml.Device, nvml.Return) {
			if i >= len(devs) {
				return nil, nvml.ERROR_INVALID_ARGUMENT
			}
			return devs[i], nvml.SUCCESS
		},
	}
}

func TestRead(t *testing.T) {
	b, err := Open(lib(h100(0)), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	devs, err := b.Read(context.Background())
	if err != nil || len(devs) != 1 {
		t.Fatalf("Read: %v %v", devs, err)
	}
	d := devs[0]
	want := gpu.Device{
		Index: 0, UUID: "GPU-aaaa", Name: "NVIDIA H100 80GB HBM3", PCIBusID: "00000000:1B:00.0",
		MemoryTotal: 80 * gib, MemoryUsed: 30 * gib, MemoryFree: 50 * gib,
		Utilization: 0.45, Temperature: 61, PowerWatts: 312.5, Up: true,
	}
	if d.Index != want.Index || d.UUID != want.UUID || d.Name != want.Name || d.PCIBusID != want.PCIBusID ||
		d.MemoryTotal != want.MemoryTotal || d.MemoryUsed != want.MemoryUsed || d.MemoryFree != want.MemoryFree ||
		d.Utilization != want.Utilization || d.Temperature != want.Temperature || d.PowerWatts != want.PowerWatts || !d.Up {
		t.Errorf("got  %+v\nwant %+v", d, want)
	}
	if len(d.Processes) != 1 || d.Processes[0] != (gpu.Process{PID: 4411, UsedMemory: 30 * gib}) {
		t.Errorf("processes: %+v", d.Processes)
	}
}

func TestMemoryInfoV1Fallback(t *testing.T) {
	dev := h100(0)
	v2calls := 0
	dev.GetMemoryInfo_v2Func = func() (nvml.Memory_v2, nvml.Return) {
		v2calls++
		return nvml.Memory_v2{}, nvml.ERROR_FUNCTION_NOT_FOUND
	}
	dev.GetMemoryInfoFunc = func() (nvml.Memory, nvml.Return) {
		return nvml.Memory{Total: 80 * gib, Used: 31 * gib, Free: 49 * gib}, nvml.SUCCESS
	}
	b, err := Open(lib(dev), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		devs, _ := b.Read(context.Background())
		if devs[0].MemoryUsed != 31*gib || !devs[0].Up {
			t.Errorf("v1 reading: %+v", devs[0])
		}
	}
	if v2calls != 1 {
		t.Errorf("v2 tried %d times; after it is missing once, v1 is used directly", v2calls)
	}
}

// TestErrorsPerDevice: one GPU falling off the bus, or failing a reading
// placement needs, marks that GPU down and leaves the others up.
func TestErrorsPerDevice(t *testing.T) {
	lost := h100(1)
	lost.GetMemoryInfo_v2Func = func() (nvml.Memory_v2, nvml.Return) { return nvml.Memory_v2{}, nvml.ERROR_GPU_IS_LOST }
	noProcs := h100(2)
	noProcs.GetComputeRunningProcessesFunc = func() ([]nvml.ProcessInfo, nvml.Return) { return nil, nvml.ERROR_UNKNOWN }
	noPower := h100(0)
	noPower.GetPowerUsageFunc = func() (uint32, nvml.Return) { return 0, nvml.ERROR_NOT_SUPPORTED }

	b, err := Open(lib(noPower, lost, noProcs), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	devs, err := b.Read(context.Background())
	if err != nil || len(devs) != 3 {
		t.Fatalf("Read: %v", err)
	}
	if !devs[0].Up || devs[0].PowerWatts != -1 {
		t.Errorf("GPU0 (no power reading) should be up with power -1: %+v", devs[0])
	}
	if devs[1].Up || devs[1].Err != "GPU is lost (fell off the bus): GPU-bbbb GetMemoryInfo_v2: ERROR_GPU_IS_LOST" {
		t.Errorf("GPU1 (lost): up=%v err=%q", devs[1].Up, devs[1].Err)
	}
	if devs[2].Up || devs[2].Err != "GPU-cccc GetComputeRunningProcesses: ERROR_UNKNOWN" {
		t.Errorf("GPU2 (no process list): up=%v err=%q", devs[2].Up, devs[2].Err)
	}
}

func TestOpenWithoutDriver(t *testing.T) {
	l := lib()
	l.InitFunc = func() nvml.Return { return nvml.ERROR_LIBRARY_NOT_FOUND }
	_, err := Open(l, zap.NewNop())
	if !errors.Is(err, gpu.ErrNoDriver) {
		t.Errorf("got %v, want ErrNoDriver", err)
	}
	l.InitFunc = func() nvml.Return { return nvml.ERROR_NO_PERMISSION }
	_, err = Open(l, zap.NewNop())
	var ne *Error
	if !errors.As(err, &ne) || ne.Ret != nvml.ERROR_NO_PERMISSION || err.Error() != "nvml Init: ERROR_NO_PERMISSION" {
		t.Errorf("got %v", err)
	}
}

func TestWatchXids(t *testing.T) {
	dev := h100(0)
	events := make(chan nvml.EventData, 4)
	events <- nvml.EventData{Device: dev, EventType: nvml.EventTypeXidCriticalError, EventData: 79}
	events <- nvml.EventData{Device: dev, EventType: nvml.EventTypeXidCriticalError, EventData: 79}
	events <- nvml.EventData{Device: dev, EventType: nvml.EventTypeXidCriticalError, EventData: 48}
	freed := make(chan struct{})
	set := &mock.EventSet{
		WaitFunc: func(uint32) (nvml.EventData, nvml.Return) {
			select {
			case e := <-events:
				return e, nvml.SUCCESS
			default:
				return nvml.EventData{}, nvml.ERROR_TIMEOUT
			}
		},
		FreeFunc: func() nvml.Return { close(freed); return nvml.SUCCESS },
	}
	l := lib(dev)
	l.EventSetCreateFunc = func() (nvml.EventSet, nvml.Return) { return set, nvml.SUCCESS }
	b, err := Open(l, zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- b.WatchXids(ctx) }()
	deadline := time.Now().Add(5 * time.Second)
	for {
		x := b.Xids()
		if x["GPU-aaaa"][79] == 2 && x["GPU-aaaa"][48] == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("Xids = %v", x)
		}
		time.Sleep(5 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("WatchXids: %v", err)
	}
	select {
	case <-freed:
	default:
		t.Error("event set not freed")
	}
}

// TestWatchXidsBacksOffAPersistentError: a Wait that fails at once with
// something other than a timeout (the driver in trouble) is retried after
// 1s, 2s, 4s … up to 1m, not in a busy loop, and logged once when it starts
// failing and once when it works again.
func TestWatchXidsBacksOffAPersistentError(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var (
		waits, okWaits atomic.Int32
		recovered      atomic.Bool
		blocked        = make(chan struct{}, 1) // the second recovered Wait blocks until ctx ends
	)
	set := &mock.EventSet{
		WaitFunc: func(uint32) (nvml.EventData, nvml.Return) {
			waits.Add(1)
			if !recovered.Load() {
				return nvml.EventData{}, nvml.ERROR_UNKNOWN
			}
			if okWaits.Add(1) > 1 {
				select {
				case blocked <- struct{}{}:
				default:
				}
				<-ctx.Done()
			}
			return nvml.EventData{}, nvml.ERROR_TIMEOUT
		},
		FreeFunc: func() nvml.Return { return nvml.SUCCESS },
	}
	l := lib(h100(0))
	l.EventSetCreateFunc = func() (nvml.EventSet, nvml.Return) { return set, nvml.SUCCESS }
	core, logs := observer.New(zap.InfoLevel)
	b, err := Open(l, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	// Retries wait on channels the test fires, one at a time.
	type timer struct {
		d time.Duration
		c chan time.Time
	}
	timers := make(chan timer)
	b.after = func(d time.Duration) <-chan time.Time {
		c := make(chan time.Time, 1)
		timers <- timer{d, c}
		return c
	}
	done := make(chan error, 1)
	go func() { done <- b.WatchXids(ctx) }()
	next := func() timer {
		t.Helper()
		select {
		case tm := <-timers:
			return tm
		case <-time.After(5 * time.Second):
			t.Fatal("WatchXids did not wait before retrying")
			return timer{}
		}
	}

	var delays []time.Duration
	for i := range 10 {
		tm := next()
		// WatchXids is now blocked on tm.c: one Wait per retry, no more.
		if n := waits.Load(); n != int32(i+1) {
			t.Fatalf("%d Waits before retry %d, want %d", n, i+1, i+1)
		}
		delays = append(delays, tm.d)
		if i == 9 {
			recovered.Store(true)
		}
		tm.c <- time.Time{}
	}
	want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 16 * time.Second,
		32 * time.Second, time.Minute, time.Minute, time.Minute, time.Minute}
	if !slices.Equal(delays, want) {
		t.Errorf("retry delays %v, want %v", delays, want)
	}
	select {
	case <-blocked:
	case <-time.After(5 * time.Second):
		t.Fatal("WatchXids did not go back to waiting for events")
	}
	if n := logs.FilterMessageSnippet("waiting for Xid events failed").Len(); n != 1 {
		t.Errorf("10 failed waits logged %d times, want once", n)
	}
	if l := logs.FilterMessage("waiting for Xid events works again").All(); len(l) != 1 || l[0].ContextMap()["failed_waits"] != int64(10) {
		t.Errorf("recovery logged as %v, want once with failed_waits 10", l)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("WatchXids: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("WatchXids did not return after ctx ended")
	}
}
