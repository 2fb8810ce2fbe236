package config

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// VLLMPortBlock is how many consecutive ports starting at VLLM_PORT one model
// may use for vLLM's internal sockets (distributed init, ZMQ queues).
const VLLMPortBlock = 16

// PortRange is a range of TCP ports, both ends included.
type PortRange struct{ Lo, Hi int }

// Contains reports whether [p, p+n) meets the range.
func (r PortRange) Contains(p, n int) bool { return p <= r.Hi && p+n-1 >= r.Lo }

func (r PortRange) String() string { return strconv.Itoa(r.Lo) + "-" + strconv.Itoa(r.Hi) }

// linuxDefaultEphemeral is the kernel's default ip_local_port_range.
var linuxDefaultEphemeral = PortRange{32768, 60999}

// localPortRange is the host's ephemeral port range, the ports the kernel
// hands to outgoing connections (and to bind(0)): a VLLM_PORT block inside
// it can be taken by any connection a moment before vLLM binds it, and the
// model dies at start with "address already in use". Tests replace it.
var localPortRange = func() PortRange {
	r, err := readPortRange("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return linuxDefaultEphemeral
	}
	return r
}

func readPortRange(path string) (PortRange, error) {
	b, err := os.ReadFile(filepath.Clean(path))
	if err != nil {
		return PortRange{}, err
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return PortRange{}, strconv.ErrSyntax
	}
	lo, err1 := strconv.Atoi(f[0])
	hi, err2 := strconv.Atoi(f[1])
	if err1 != nil || err2 != nil || lo > hi {
		return PortRange{}, strconv.ErrSyntax
	}
	return PortRange{lo, hi}, nil
}

// EphemeralPorts is the host's ephemeral port range as the configuration
// was derived with.
func EphemeralPorts() PortRange { return localPortRange() }

// minBlocks is the fewest VLLM_PORT blocks a region outside the ephemeral
// range must hold to be used for the derived ones.
const minBlocks = 64

// DefaultVLLMPort derives a model's VLLM_PORT block from its API port and
// the host's ephemeral range, outside that range: above it when there is
// room for minBlocks blocks there (the kernel's default 32768-60999 leaves
// 61000-65535: 283 blocks), else below it. The value never depends on which
// other models are configured, so a reload does not move it, and ports
// that differ by less than the number of blocks get distinct blocks. A
// range that leaves no room either side (1024-65535) gives the blocks of
// earlier versions (40000 + 16·(port mod 1536)), inside it: --check says so.
func DefaultVLLMPort(port int, ephemeral PortRange) int {
	if port <= 0 {
		return 0
	}
	if above := (65535 - ephemeral.Hi) / VLLMPortBlock; above >= minBlocks {
		return ephemeral.Hi + 1 + VLLMPortBlock*(port%above)
	}
	if below := min(1536, (ephemeral.Lo-10000)/VLLMPortBlock); below >= minBlocks {
		return ephemeral.Lo - VLLMPortBlock*below + VLLMPortBlock*(port%below)
	}
	return legacyVLLMPort(port)
}

// legacyVLLMPort is the block builds before the ephemeral range was
// consulted derived. SpawnDigest hashes it for a derived vllm_port, so a
// model they started is still adopted (same digest) by this one.
func legacyVLLMPort(port int) int { return 40000 + VLLMPortBlock*(port%1536) }

// resolveCacheDir is cache_dir in force: as written, else the unit's
// CacheDirectory= (systemd sets CACHE_DIRECTORY, colon-separated when it
// names several), else /var/cache/citadel.
func resolveCacheDir(dir string, environ []string) string {
	if dir != "" {
		return dir
	}
	if v := Getenv(environ, "CACHE_DIRECTORY", ""); v != "" {
		first, _, _ := strings.Cut(v, ":")
		return first
	}
	return "/var/cache/citadel"
}
