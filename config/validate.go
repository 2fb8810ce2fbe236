package config

import (
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// maxSocketPath is the room in sockaddr_un.sun_path (108 bytes with the NUL).
const maxSocketPath = 107

var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// Validate returns every problem in c, joined, each naming its key path;
// nil when c is valid. A model path that does not exist is not a problem
// here: storage may be mounted later, and the model waits as pending (see
// Check for what the host lacks).
func (c *Config) Validate() error {
	if errs := c.problems(); len(errs) > 0 {
		return joinSorted(errs)
	}
	return nil
}

// problems is Validate's list, each problem at the model key it concerns.
func (c *Config) problems() []error {
	var errs []error
	add := func(key, format string, args ...any) { errs = append(errs, errorf(key, format, args...)) }

	listenPort := 0
	if c.Listen != "" {
		_, p, err := net.SplitHostPort(c.Listen)
		n, perr := strconv.Atoi(p)
		if err != nil || perr != nil || n < 0 || n > 65535 {
			add("listen", "%q is not host:port (use \"\" to disable HTTP)", c.Listen)
		} else {
			listenPort = n
		}
	}
	switch {
	case c.ControlSocket == "":
		add("control_socket", "must name a path, e.g. /run/citadel/supervisor.sock")
	case len(c.ControlSocket) > maxSocketPath:
		add("control_socket", "path is %d bytes; a Unix socket path must be at most %d", len(c.ControlSocket), maxSocketPath)
	}
	if !slices.Contains([]string{"debug", "info", "warn", "error"}, c.Log.Level) {
		add("log.level", "%q: use debug, info, warn or error", c.Log.Level)
	}
	if !slices.Contains([]string{"json", "console"}, c.Log.Format) {
		add("log.format", "%q: use json or console", c.Log.Format)
	}
	if c.Log.ModelDir != "" && c.Log.ModelMaxSize < MiB {
		add("log.model_max_size", "must be at least 1MiB")
	}
	if c.Log.ModelKeep < 0 {
		add("log.model_keep", "must not be negative")
	}
	c.validateGPU(add)
	c.validateGateway(add)

	ports := map[int]string{}    // API port → model
	blocks := map[int]string{}   // each VLLM_PORT-block port → model
	for _, m := range c.Models { // sorted by name: the later model gets the error
		c.validateModel(m, add)
		key := "models." + m.Name
		if m.Port == listenPort && listenPort != 0 {
			add(key+".port", "%d is the supervisor's own listen port", m.Port)
		} else if other, ok := ports[m.Port]; ok && m.Port > 0 {
			add(key+".port", "%d already used by models.%s", m.Port, other)
			continue // its derived VLLM_PORT block clashes too; one error is enough
		} else if m.Port > 0 {
			ports[m.Port] = m.Name
		}
		start := m.VLLMPortStart()
		for p := start; p < start+VLLMPortBlock && start > 0; p++ {
			if other, ok := blocks[p]; ok {
				add(key+".vllm_port", "block %d-%d overlaps models.%s's block; set vllm_port to a free range", start, start+VLLMPortBlock-1, other)
				break
			}
			blocks[p] = m.Name
		}
	}
	for _, m := range c.Models {
		if other, ok := blocks[m.Port]; ok && m.Port > 0 {
			add("models."+m.Name+".port", "%d lies in models.%s's VLLM_PORT block; move one of them", m.Port, other)
		}
	}
	return errs
}

func (c *Config) validateGPU(add func(key, format string, args ...any)) {
	if !slices.Contains([]string{"nvml", "sim", "none"}, c.GPU.Backend) {
		add("gpu.backend", "%q: use nvml, sim or none", c.GPU.Backend)
	}
	if !slices.Contains([]string{VisibleIndex, VisibleUUID}, c.GPU.VisibleDevices) {
		add("gpu.visible_devices", "%q: use index (NVML indices, every vLLM) or uuid (vLLM 0.24 and newer; MIG)", c.GPU.VisibleDevices)
	}
	if c.GPU.ReleaseTimeout <= 0 {
		add("gpu.release_timeout", "must be positive")
	}
	if c.GPU.Backend != "sim" {
		return
	}
	if len(c.GPU.Sim.Devices) == 0 {
		add("gpu.sim.devices", "backend sim needs at least one device")
	}
	seen := map[string]int{}
	for i, d := range c.GPU.Sim.Devices {
		key := fmt.Sprintf("gpu.sim.devices[%d]", i)
		if !strings.HasPrefix(d.UUID, "GPU-") {
			add(key+".uuid", "%q: a GPU UUID starts with GPU-", d.UUID)
		} else if j, ok := seen[d.UUID]; ok {
			add(key+".uuid", "%s already used by gpu.sim.devices[%d]", d.UUID, j)
		}
		seen[d.UUID] = i
		if d.Memory == 0 {
			add(key+".memory", "must be positive, e.g. 80GiB")
		}
	}
}

func (c *Config) validateModel(m Model, add func(key, format string, args ...any)) {
	key := "models." + m.Name
	if m.Path == "" {
		add(key+".model", "required: the model's directory (vLLM --model)")
	}
	if m.Port < 1 || m.Port > 65535 {
		add(key+".port", "required: a TCP port from 1 to 65535")
	}
	// vllm_port is derived from port: when port is missing, its error says it.
	if start := m.VLLMPortStart(); (m.VLLMPort != 0 || m.Port > 0) && (start < 1024 || start > 65535-VLLMPortBlock+1) {
		add(key+".vllm_port", "%d: must be from 1024 to %d", start, 65535-VLLMPortBlock+1)
	}
	if len(m.Command) == 0 || m.Command[0] == "" {
		add(key+".command", "must name the program to run, e.g. [/opt/citadel/vllm-env/bin/python, -m, vllm.entrypoints.openai.api_server]")
	}
	if m.Host == "" || strings.ContainsAny(m.Host, " \t/") {
		add(key+".host", "%q is not an address to bind, e.g. 127.0.0.1", m.Host)
	}
	if m.TensorParallel < 1 {
		add(key+".tensor_parallel", "%d: must be at least 1 (the number of GPUs)", m.TensorParallel)
	}
	if m.GPUMemoryUtilization <= 0 || m.GPUMemoryUtilization > 1 {
		add(key+".gpu_memory_utilization", "%g: must be in (0, 1], a fraction of each GPU's memory", m.GPUMemoryUtilization)
	}
	if m.MaxModelLen < 0 {
		add(key+".max_model_len", "%d: must not be negative (0 lets vLLM choose)", m.MaxModelLen)
	}
	if m.StopTimeout <= 0 {
		add(key+".stop_timeout", "must be positive")
	}
	switch m.Activation {
	case ActivationAlways, ActivationOnDemand:
	default:
		add(key+".activation", "%q: must be always or on_demand", m.Activation)
	}
	if m.SleepLevel < 0 || m.SleepLevel > 2 {
		add(key+".sleep_level", "%d: must be 1 or 2 (vLLM's sleep levels), or 0 to stop the process", m.SleepLevel)
	}
	if m.IdleAfter < time.Second {
		add(key+".idle_after", "must be at least 1s")
	}
	if m.MinAwake < 0 {
		add(key+".min_awake", "must not be negative")
	}
	switch {
	case m.WakeTimeout < 0:
		add(key+".wake_timeout", "must not be negative (0 derives it from the model's recent wakes)")
	case m.WakeTimeout > 0 && m.WakeTimeout >= m.Probe.StartupTimeout:
		add(key+".wake_timeout", "%s: must be below probe.startup_timeout %s (a wake that takes as long as a cold start has failed); 0 derives it from the model's recent wakes", m.WakeTimeout, m.Probe.StartupTimeout)
	}
	for i, a := range m.Command {
		if strings.IndexByte(a, 0) >= 0 {
			add(fmt.Sprintf("%s.command[%d]", key, i), "contains a NUL byte, which a program's argument cannot hold")
		}
	}
	for i, a := range m.Args {
		if strings.IndexByte(a, 0) >= 0 {
			add(fmt.Sprintf("%s.args[%d]", key, i), "contains a NUL byte, which a program's argument cannot hold")
		}
	}
	for name, v := range m.Env {
		hint, owned := ownedVarHint(name)
		switch {
		case strings.IndexByte(v, 0) >= 0:
			add(key+".env."+name, "contains a NUL byte, which an environment variable cannot hold")
		case !envName.MatchString(name):
			add(key+".env."+name, "not a valid environment variable name")
		case owned:
			add(key+".env."+name, "set by the supervisor: %s", hint)
		case strings.HasPrefix(name, EnvPrefix):
			add(key+".env."+name, "the %s prefix is reserved for the supervisor", EnvPrefix)
		}
	}
	for i, f := range m.EnvFiles {
		if !filepath.IsAbs(f) {
			add(fmt.Sprintf("%s.env_files[%d]", key, i), "%q: must be an absolute path", f)
		}
	}
	for i, a := range m.Args {
		flag, _, _ := strings.Cut(a, "=")
		if k, ok := ownedFlagKey(flag); ok {
			add(fmt.Sprintf("%s.args[%d]", key, i), "%s is set by the supervisor from the model's key %s", flag, k)
		}
	}
	validateRestart(key+".restart", m.Restart, add)
	validateProbe(key+".probe", m.Probe, add)
	c.validatePins(key+".gpus", m, add)
}

func validateRestart(key string, r Restart, add func(key, format string, args ...any)) {
	if r.Delay < 0 {
		add(key+".delay", "must not be negative")
	}
	if r.MaxDelay < r.Delay {
		add(key+".max_delay", "%s is below delay %s", r.MaxDelay, r.Delay)
	}
	if r.ResetAfter <= 0 {
		add(key+".reset_after", "must be positive")
	}
	if r.Burst < 1 {
		add(key+".burst", "%d: must be at least 1", r.Burst)
	}
	if r.Interval <= 0 {
		add(key+".interval", "must be positive")
	}
	if r.RetryFailedAfter < 0 {
		add(key+".retry_failed_after", "must not be negative (0 = never)")
	}
}

func validateProbe(key string, p Probe, add func(key, format string, args ...any)) {
	if !strings.HasPrefix(p.Path, "/") {
		add(key+".path", "%q: must start with /", p.Path)
	}
	if p.Period <= 0 {
		add(key+".period", "must be positive")
	}
	if p.Timeout <= 0 {
		add(key+".timeout", "must be positive")
	}
	if p.FailureThreshold < 1 {
		add(key+".failure_threshold", "%d: must be at least 1", p.FailureThreshold)
	}
	if p.StartupTimeout <= 0 {
		add(key+".startup_timeout", "must be positive")
	}
	if p.DeepPeriod < 0 {
		add(key+".deep_period", "must not be negative (0 = off)")
	}
	if p.DeepTimeout <= 0 {
		add(key+".deep_timeout", "must be positive")
	}
}

func (c *Config) validatePins(key string, m Model, add func(key, format string, args ...any)) {
	if len(m.GPUs) == 0 {
		return
	}
	if len(m.GPUs) < m.TensorParallel {
		add(key, "pins %d GPUs but tensor_parallel is %d", len(m.GPUs), m.TensorParallel)
	}
	seen := map[GPURef]bool{}
	for i, g := range m.GPUs {
		k := fmt.Sprintf("%s[%d]", key, i)
		if seen[g] {
			add(k, "%s is pinned twice", g)
		}
		seen[g] = true
		idx, err := strconv.Atoi(string(g))
		isUUID := strings.HasPrefix(string(g), "GPU-") || strings.HasPrefix(string(g), "MIG-")
		switch {
		case err != nil && !isUUID:
			add(k, "%q: use a GPU index (0) or UUID (GPU-…)", g)
		case c.GPU.Backend == "sim" && err == nil && idx >= len(c.GPU.Sim.Devices):
			add(k, "GPU %d does not exist: gpu.sim.devices declares %d", idx, len(c.GPU.Sim.Devices))
		case c.GPU.Backend == "sim" && isUUID && !c.simHas(string(g)):
			add(k, "%s is not among gpu.sim.devices", g)
		}
	}
}

func (c *Config) simHas(uuid string) bool {
	for _, d := range c.GPU.Sim.Devices {
		if d.UUID == uuid {
			return true
		}
	}
	return false
}
