package config

import (
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"slices"
	"strings"

	"citadel-supervisor/vllm"
)

// VLLMHost is what Check asks, besides Host, to judge each model against
// the vLLM it runs (docs/vllm.md): its version, its model directory's
// config.json and weights, the keys of its env files, the GPUs' size and
// the host's ephemeral ports. A Host without it gets none of these checks.
type VLLMHost interface {
	Host
	// ReadFile and ReadDir read the model directory.
	ReadFile(path string) ([]byte, error)
	ReadDir(path string) ([]fs.DirEntry, error)
	// EnvKeys lists the variables an env file sets (never their values).
	EnvKeys(path string) ([]string, error)
	// Version is the vLLM the model's interpreter has (the daemon's own
	// lookup); an error when it cannot be learned.
	Version(m Model) (vllm.Version, error)
	// GPUTotal is the memory of the smallest GPU; ok false without
	// readings.
	GPUTotal() (total uint64, ok bool)
	// EphemeralPorts is the kernel's ip_local_port_range.
	EphemeralPorts() PortRange
}

// checkVLLM adds what the model's vLLM makes of its configuration.
func (c *Config) checkVLLM(h VLLMHost, key string, m Model, add func(string, bool, string, ...any), note func(string, string, ...any)) {
	v, verr := h.Version(m)
	if verr == nil {
		if m.OnDemand() && m.SleepLevel > 0 {
			if got, why := v.SleepLevel(m.SleepLevel); got < m.SleepLevel {
				add(key+".sleep_level", true, "%d: its vLLM is %s: %s", m.SleepLevel, v, why)
			}
		}
		if c.GPU.VisibleDevices == VisibleUUID && !v.Has(vllm.UUIDDevices) {
			add("gpu.visible_devices", false, "uuid: models.%s runs vLLM %s, which dies at start on a UUID in CUDA_VISIBLE_DEVICES (UUIDs need %s, vllm#45026): use index, or upgrade its vLLM", m.Name, v, vllm.UUIDDevices.Since)
		}
		if v.Compare(vllm.Oldest) < 0 {
			add(key+".command", true, "its vLLM is %s, older than any this daemon is built for (%s, docs/vllm.md)", v, vllm.Oldest)
		}
	}
	if c.GPU.Backend == "none" && (verr != nil || !v.Has(vllm.UUIDDevices)) {
		for i, g := range m.GPUs {
			if strings.HasPrefix(string(g), "GPU-") || strings.HasPrefix(string(g), "MIG-") {
				add(fmt.Sprintf("%s.gpus[%d]", key, i), true, "%s: with gpu.backend none there are no readings to turn it into an index, so the child gets the UUID, on which vLLM before %s dies at start: pin by index", g, vllm.UUIDDevices.Since)
			}
		}
	}
	if c.Gateway.Listen != "" && c.Gateway.APIKeysFile == "" && c.keyed(h, m) {
		add("gateway.api_keys_file", true, "models.%s wants an API key of its clients (VLLM_API_KEY or --api-key): the gateway sends it on every request it forwards, and without api_keys_file it asks none of its own clients: anyone who reaches %s uses models.%s", m.Name, c.Gateway.Listen, m.Name)
	}
	eph := h.EphemeralPorts()
	if start := m.VLLMPortStart(); start > 0 && eph.Contains(start, VLLMPortBlock) {
		if m.VLLMPort != 0 {
			add(key+".vllm_port", true, "block %d-%d lies in the host's ephemeral port range %s (net.ipv4.ip_local_port_range): any outgoing connection may take one of its ports and vLLM then dies at start; choose a block outside it", start, start+VLLMPortBlock-1, eph)
		} else {
			add(key+".vllm_port", true, "the host's ephemeral port range %s leaves no room for the derived VLLM_PORT blocks, so %d-%d lies inside it: set vllm_port outside it, or narrow net.ipv4.ip_local_port_range", eph, start, start+VLLMPortBlock-1)
		}
	}
	c.checkFit(h, key, m, add, note)
}

// keyed reports whether the model's vLLM wants an API key: --api-key in
// args, VLLM_API_KEY in env or in one of its env files.
func (c *Config) keyed(h VLLMHost, m Model) bool {
	if m.APIKey(nil) != "" {
		return true
	}
	for _, f := range m.EnvFiles {
		if keys, err := h.EnvKeys(f); err == nil && slices.Contains(keys, APIKeyVar) {
			return true
		}
	}
	return false
}

// sharedCacheRoots warns of models whose env sets one VLLM_CACHE_ROOT:
// their compile caches race (vllm#24601).
func (c *Config) sharedCacheRoots(add func(string, bool, string, ...any)) {
	by := map[string][]string{}
	for _, m := range c.Models {
		if root := m.Env[CacheRootVar]; root != "" && m.Enabled {
			by[filepath.Clean(root)] = append(by[filepath.Clean(root)], m.Name)
		}
	}
	for root, names := range by {
		if len(names) < 2 {
			continue
		}
		for _, n := range names {
			add("models."+n+".env."+CacheRootVar, true, "%s is shared by models %s: vLLM's compile caches race between instances (vllm#24601); leave it unset (each model gets cache_dir/vllm/<model>) or give each its own", root, strings.Join(names, ", "))
		}
	}
}

// weightSuffixes are the weight files vLLM loads, in the order it prefers
// them: safetensors when there are any, else PyTorch's.
var weightSuffixes = [][]string{{".safetensors"}, {".bin", ".pt", ".pth"}}

// checkFit says whether one sequence of max_model_len fits the model's KV
// cache (vllm.CheckFit): an error when not, with what would.
func (c *Config) checkFit(h VLLMHost, key string, m Model, add func(string, bool, string, ...any), note func(string, string, ...any)) {
	total, ok := h.GPUTotal()
	if !ok {
		return // no readings: no GPU size to divide
	}
	b, err := h.ReadFile(filepath.Join(m.Path, "config.json"))
	if errors.Is(err, fs.ErrNotExist) {
		if _, serr := h.Stat(m.Path); serr == nil {
			note(key+".model", "%s has no config.json (weights not there yet?): whether max_model_len fits is not checked", m.Path)
		}
		return
	}
	if err != nil {
		add(key+".model", true, "%s: %s: whether max_model_len fits is not checked", filepath.Join(m.Path, "config.json"), errText(err))
		return
	}
	mc, err := vllm.ParseModelConfig(b)
	if err != nil {
		add(key+".model", true, "%s: %s: whether max_model_len fits is not checked", m.Path, err)
		return
	}
	weights, estimated := c.weights(h, m.Path), ""
	if weights == 0 {
		weights = mc.Params() * uint64(mc.DtypeBytes())
		estimated = fmt.Sprintf(" (no weight files: %s estimated from config.json)", ByteSize(weights))
	}
	maxLen, own := m.MaxModelLen, ""
	modelMax := mc.MaxLen()
	if maxLen == 0 {
		maxLen, own = modelMax, fmt.Sprintf(" (max_model_len 0: vLLM takes the model's %d)", modelMax)
	}
	if maxLen <= 0 {
		return
	}
	if m.MaxModelLen > modelMax && modelMax > 0 && m.Env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] == "" {
		add(key+".max_model_len", false, "%d is more than the model's own %d (config.json): vLLM refuses it at start (unless VLLM_ALLOW_LONG_MAX_MODEL_LEN=1); set at most %d", m.MaxModelLen, modelMax, modelMax)
		return
	}
	kvBytes := 0
	for i, a := range m.Args {
		v, ok := strings.CutPrefix(a, "--kv-cache-dtype=")
		if !ok && a == "--kv-cache-dtype" && i+1 < len(m.Args) {
			v, ok = m.Args[i+1], true
		}
		if ok && strings.HasPrefix(v, "fp8") {
			kvBytes = 1
		}
	}
	f := vllm.CheckFit(mc, weights, maxLen, m.TensorParallel, m.GPUMemoryUtilization, total, kvBytes)
	if f.Fits {
		return
	}
	perToken := mc.KVBytes(1, m.TensorParallel, kvBytes)
	fit := "not even a short sequence fits"
	if l := f.LargestLen; l > 0 {
		if modelMax > 0 {
			l = min(l, modelMax)
		}
		fit = fmt.Sprintf("at most %d tokens fit", l)
	}
	if f.SmallestUtil <= 1 {
		fit += fmt.Sprintf(", or gpu_memory_utilization %.2f", f.SmallestUtil)
	} else {
		fit += fmt.Sprintf("; no gpu_memory_utilization fits %d tokens on GPUs of %s (more tensor_parallel would)", maxLen, ByteSize(total))
	}
	add(key+".max_model_len", false, "%d tokens%s need %s of KV cache on each GPU (%s a token); %g of %s leaves %s after %s of weights%s and %s of overhead: %s",
		maxLen, own, ByteSize(f.KVNeed), fmt.Sprintf("%.1f KiB", float64(perToken)/1024), m.GPUMemoryUtilization, ByteSize(total),
		signedSize(f.KVBudget), ByteSize(f.Weights), estimated, ByteSize(f.Overhead), fit)
}

// weights sums the weight files vLLM would load from dir.
func (c *Config) weights(h VLLMHost, dir string) uint64 {
	ents, err := h.ReadDir(dir)
	if err != nil {
		return 0
	}
	for _, suffixes := range weightSuffixes {
		var sum uint64
		for _, e := range ents {
			if e.IsDir() || !slices.ContainsFunc(suffixes, func(s string) bool { return strings.HasSuffix(e.Name(), s) }) {
				continue
			}
			if info, err := e.Info(); err == nil && info.Size() > 0 {
				sum += uint64(info.Size())
			}
		}
		if sum > 0 {
			return sum
		}
	}
	return 0
}

func signedSize(n int64) string {
	if n < 0 {
		return "nothing (" + ByteSize(-n).String() + " short)"
	}
	return ByteSize(n).String()
}
