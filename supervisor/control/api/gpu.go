package api

// GPU is one GPU as `citadelctl gpus` shows it: the reading, and what the
// supervisor placed on it. Its JSON keys are those of the daemon's own view
// (a gpu.Device with the placement beside it); a test in package control
// keeps the two in step.
type GPU struct {
	Index       int          `json:"index"`
	UUID        string       `json:"uuid"`
	Name        string       `json:"name"`
	PCIBusID    string       `json:"pci_bus_id"`
	MemoryTotal uint64       `json:"memory_total_bytes"`
	MemoryUsed  uint64       `json:"memory_used_bytes"`
	MemoryFree  uint64       `json:"memory_free_bytes"`
	Utilization float64      `json:"utilization_ratio"` // 0..1; -1 when not readable
	Temperature float64      `json:"temperature_celsius"`
	PowerWatts  float64      `json:"power_watts"`
	Processes   []GPUProcess `json:"processes"`
	// Up is false when the GPU stopped answering; Err says why.
	Up  bool   `json:"up"`
	Err string `json:"error,omitempty"`

	Models  []string `json:"models"`        // placed on this GPU, sorted
	Claimed uint64   `json:"claimed_bytes"` // claimed by models that are starting
	Busy    string   `json:"busy,omitempty"`
	Note    string   `json:"note,omitempty"`
}

// GPUProcess is a compute process using a GPU.
type GPUProcess struct {
	PID        int    `json:"pid"`
	UsedMemory uint64 `json:"used_memory_bytes"`
}
