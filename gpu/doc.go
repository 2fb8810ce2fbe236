// Package gpu reads the host's GPUs and decides placement. It holds the
// Reader interface and its sim backend (NVML's lives in gpu/nvmlgpu, the
// only importer of go-nvml), the pure placement rules (Plan, Fit) and the
// Prometheus collector of GPU metrics. It keeps no state of the
// supervisor's.
//
// The sim backend behaves like a driver: it declares the configured GPUs
// and finds the processes using them itself, from the process table. A
// process whose environment has CUDA_VISIBLE_DEVICES naming sim GPUs (by
// index in the declared order, or by UUID)
// and whose argv has --gpu-memory-utilization U (as the supervisor starts
// vLLM) uses U × that GPU's total on each of them, reported under its pid as
// NVML reports compute processes; its memory is free again when it exits.
// Only the daemon's own descendants count (parent links in /proc, up to
// os.Getpid()), so daemons and test binaries running side by side with the
// same sim UUIDs never see each other's processes.
package gpu
