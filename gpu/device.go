package gpu

import (
	"context"
	"errors"
)

// Device is one GPU as read at one moment.
type Device struct {
	Index       int       `json:"index"`
	UUID        string    `json:"uuid"`
	Name        string    `json:"name"`
	PCIBusID    string    `json:"pci_bus_id"`
	MemoryTotal uint64    `json:"memory_total_bytes"`
	MemoryUsed  uint64    `json:"memory_used_bytes"`
	MemoryFree  uint64    `json:"memory_free_bytes"`
	Utilization float64   `json:"utilization_ratio"` // 0..1; -1 when not readable
	Temperature float64   `json:"temperature_celsius"`
	PowerWatts  float64   `json:"power_watts"`
	Processes   []Process `json:"processes"`
	// Up is false when the GPU stopped answering (NVML: GPU is lost); Err
	// says why. Nothing new is placed on a GPU that is down.
	Up  bool   `json:"up"`
	Err string `json:"error,omitempty"`
}

// Process is a compute process using a GPU.
type Process struct {
	PID        int    `json:"pid"`
	UsedMemory uint64 `json:"used_memory_bytes"`
}

// Reader reads every GPU of the host. Implementations: the nvml backend
// (package nvmlgpu) and Sim. Read must be safe for concurrent use.
type Reader interface {
	Read(ctx context.Context) ([]Device, error)
}

// XidReader is implemented by backends that count Xid critical errors.
type XidReader interface {
	// Xids returns, per GPU UUID, the count of each Xid seen since start.
	Xids() map[string]map[uint64]uint64
}

// ErrNoDriver means NVML could not be loaded: no NVIDIA driver on this
// host. The daemon runs without GPU readings and says so.
var ErrNoDriver = errors.New("NVML library not found: no NVIDIA driver on this host")
