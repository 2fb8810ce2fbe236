package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"strings"
	"time"

	"go.uber.org/zap"

	"citadel-supervisor/config"
	"citadel-supervisor/gpu"
	"citadel-supervisor/supervisor"
	"citadel-supervisor/supervisor/schedule"
	"citadel-supervisor/vllm"
)

// Exit codes of --check. 0 and 1 are docs/configuration.md's; the others let a script
// tell a bad file from a host that cannot run it. The unit's ExecStartPre
// fails on anything but 0, so warnings (what a running daemon waits for:
// storage, ports, env files) never keep the daemon from starting.
const (
	checkValid    = 0 // valid; warnings may have been printed
	checkInvalid  = 1 // the daemon refuses this file (start and reload)
	checkHostErr  = 3 // valid, but an enabled model cannot start on this host as written
	checkWarnings = 4 // with --strict only: valid, no errors, some warnings
)

// runCheck is `citadel-supervisor --check`: the file's problems, all of
// them, then what keeps its models from starting on this host, then the
// placement it would make on the GPUs seen now.
func runCheck(path string, environ []string, strict bool, stdout, stderr io.Writer) int {
	cfg, err := config.Load(path, environ)
	if err != nil {
		fmt.Fprintf(stderr, "citadel-supervisor: %s is invalid:\n%s\n", path, indent(err))
		fmt.Fprintln(stderr, "(the host checks: storage, programs, env files, ports and GPUs, run once the file is valid)")
		return checkInvalid
	}
	devs, why := readGPUs(cfg)
	host := &osHost{devs: devs, haveGPUs: why == "", versions: supervisor.NewVersions(environ), learned: map[string]versionResult{}}
	if daemonRunning(cfg.ControlSocket) {
		// Its models hold their ports, and it holds listen: every port
		// would look taken.
		host.skipPorts = true
	}
	findings := cfg.Check(host)
	for _, w := range cfg.GatewayWarnings() {
		key, msg, _ := strings.Cut(w, ": ")
		findings = append(findings, config.Finding{Key: key, Msg: msg, Wait: true})
	}
	findings = append(findings, residueFindings(cfg, devs)...)
	if _, err := gatewaySettings(cfg.Gateway); err != nil {
		// The keys file: nothing the daemon waits for fixes it.
		findings = append(findings, config.Finding{Key: "gateway.api_keys_file", Msg: err.Error()})
	}
	if cfg.Empty() {
		// A truncated file, or --config naming the wrong one.
		for i, f := range findings {
			if f.Key == "models" {
				findings[i].Msg = "the file sets nothing (it is empty or only comments): the daemon would run no model until a reload adds some"
			}
		}
	}
	errs, warns := 0, 0
	for _, f := range findings {
		switch {
		case f.Note:
		case f.Wait:
			warns++
		default:
			errs++
		}
		fmt.Fprintln(stderr, f)
	}

	fmt.Fprintf(stdout, "%s: valid, %s", path, plural(len(cfg.Models), "model"))
	if errs+warns > 0 {
		fmt.Fprintf(stdout, "; on this host: %s, %s", plural(errs, "error"), plural(warns, "warning"))
	}
	fmt.Fprintln(stdout)
	if host.skipPorts {
		fmt.Fprintf(stdout, "ports: not checked, a daemon is running on %s (its models hold their ports)\n", cfg.ControlSocket)
	}
	printVersions(stdout, cfg, host)
	printPlacement(stdout, cfg, devs, why)
	switch {
	case errs > 0:
		return checkHostErr
	case warns > 0 && strict:
		return checkWarnings
	}
	return checkValid
}

func plural(n int, word string) string {
	if n == 1 {
		return "1 " + word
	}
	return fmt.Sprintf("%d %ss", n, word)
}

// readGPUs reads the GPUs the configured backend sees now; why says why
// there are none to read (backend none, NVML unavailable, a failed read).
func readGPUs(cfg *config.Config) (devs []gpu.Device, why string) {
	var reader gpu.Reader
	switch cfg.GPU.Backend {
	case "sim":
		reader = gpu.NewSim(cfg.GPU, nil)
	default:
		b, why, _ := openGPUs(cfg, zap.NewNop())
		if b == nil {
			return nil, why
		}
		defer b.Close() //nolint:errcheck // read once
		reader = b
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	devs, err := reader.Read(ctx)
	if err != nil {
		return nil, "cannot read the GPUs: " + err.Error()
	}
	return devs, ""
}

// daemonRunning reports whether a daemon answers on the control socket.
func daemonRunning(socket string) bool {
	c, err := net.DialTimeout("unix", socket, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}

// osHost answers config.Check's questions about this machine, the way a
// start does.
type osHost struct {
	devs      []gpu.Device
	haveGPUs  bool
	skipPorts bool
	versions  *supervisor.Versions
	learned   map[string]versionResult // by model
}

type versionResult struct {
	v   vllm.Version
	err error
}

var _ config.VLLMHost = (*osHost)(nil)

func (h *osHost) ReadFile(path string) ([]byte, error) { return os.ReadFile(path) }

func (h *osHost) ReadDir(path string) ([]fs.DirEntry, error) { return os.ReadDir(path) }

func (h *osHost) EnvKeys(path string) ([]string, error) { return supervisor.EnvFileKeys(path) }

// Version learns m's vLLM as the daemon would before starting it.
func (h *osHost) Version(m config.Model) (vllm.Version, error) {
	if r, ok := h.learned[m.Name]; ok {
		return r.v, r.err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	v, err := h.versions.Learn(ctx, m)
	h.learned[m.Name] = versionResult{v, err}
	return v, err
}

func (h *osHost) GPUTotal() (uint64, bool) {
	var total uint64
	for _, d := range h.devs {
		if total == 0 || d.MemoryTotal < total {
			total = d.MemoryTotal
		}
	}
	return total, h.haveGPUs && total > 0
}

func (h *osHost) EphemeralPorts() config.PortRange { return config.EphemeralPorts() }

// printVersions shows each enabled model's vLLM, as the daemon will learn
// it before starting the model.
func printVersions(w io.Writer, cfg *config.Config, h *osHost) {
	var lines []string
	unknown := false
	for _, m := range cfg.Models {
		if !m.Enabled {
			continue
		}
		v, err := h.Version(m)
		switch {
		case err == nil:
			lines = append(lines, fmt.Sprintf("  %-12s %s", m.Name, v))
		case errors.Is(err, vllm.ErrNoInterpreter):
			unknown = true
			lines = append(lines, fmt.Sprintf("  %-12s unknown: %s", m.Name, strings.TrimPrefix(err.Error(), vllm.ErrNoInterpreter.Error()+": ")))
		default:
			unknown = true
			lines = append(lines, fmt.Sprintf("  %-12s unknown: %s", m.Name, firstLine(err.Error())))
		}
	}
	if len(lines) == 0 {
		return
	}
	fmt.Fprintln(w, "vLLM (each model's interpreter's package metadata, read as the daemon does before a start):")
	for _, l := range lines {
		fmt.Fprintln(w, l)
	}
	if unknown {
		fmt.Fprintf(w, "  (an unknown version is taken as %s, the newest known, until the model's GET /version answers)\n", vllm.Newest)
	}
}

func firstLine(s string) string {
	first, _, _ := strings.Cut(s, "\n")
	return first
}

func (h *osHost) Stat(path string) (fs.FileInfo, error) { return os.Stat(path) }

func (h *osHost) LookPath(file string) (string, error) { return exec.LookPath(file) }

func (h *osHost) EnvFile(path string) error { return supervisor.CheckEnvFile(path) }

func (h *osHost) Port(host string, port int) error {
	if h.skipPorts || port <= 0 {
		return nil
	}
	return supervisor.CheckPort(host, port)
}

func (h *osHost) GPUs() ([]string, bool) {
	if !h.haveGPUs {
		return nil, false
	}
	uuids := make([]string, len(h.devs))
	for i, d := range h.devs {
		uuids[i] = d.UUID
	}
	return uuids, true
}

// printPlacement shows what the daemon would place on the GPUs seen now.
func printPlacement(w io.Writer, cfg *config.Config, devs []gpu.Device, why string) {
	if why != "" {
		fmt.Fprintf(w, "placement: %s; every enabled model starts\n", why)
		return
	}
	slots := make([]gpu.Slot, len(devs))
	var names []string
	for i, d := range devs {
		slots[i] = gpu.Slot{Device: d}
		state := ""
		if !d.Up {
			state = ", DOWN: " + d.Err
		}
		names = append(names, fmt.Sprintf("GPU%d %s %s free of %s%s", d.Index, d.Name, config.ByteSize(d.MemoryFree), config.ByteSize(d.MemoryTotal), state))
	}
	var reqs []gpu.Request
	var onDemand []string
	for _, m := range cfg.Models {
		switch {
		case m.Enabled && m.OnDemand():
			onDemand = append(onDemand, m.Name)
		case m.Enabled:
			reqs = append(reqs, schedule.Request(m))
		}
	}
	fmt.Fprintf(w, "GPUs now (%s backend):\n  %s\n", cfg.GPU.Backend, strings.Join(names, "\n  "))
	if len(reqs) > 0 {
		fmt.Fprintln(w, "placement it would make, in priority order:")
	}
	for _, d := range gpu.Resident(reqs, slots, cfg.GPU.Headroom) {
		if d.GPUs == nil {
			fmt.Fprintf(w, "  %-12s pending: %s\n", d.Name, d.Reason)
			continue
		}
		var g []string
		for _, i := range d.GPUs {
			g = append(g, fmt.Sprintf("GPU%d", slots[i].Index))
		}
		fmt.Fprintf(w, "  %-12s %s\n", d.Name, strings.Join(g, ","))
	}
	for _, m := range cfg.Models {
		if !m.Enabled {
			fmt.Fprintf(w, "  %-12s stopped: enabled: false\n", m.Name)
		}
	}
	if len(onDemand) > 0 {
		fmt.Fprintf(w, "on demand (started or woken by a request, taking turns): %s\n", strings.Join(onDemand, ", "))
	}
}

// sleepResidue is what --check assumes a sleeping vLLM keeps on each of its
// GPUs (CUDA graphs about 1-2 GiB, NCCL about 1 GiB per rank); at run time
// the scheduler counts what NVML reports instead.
const sleepResidue = 2 * config.GiB

// residueFindings warns of on-demand models that cannot wake or start next
// to the residue of every other model that may sleep on the same GPUs: the
// scheduler then stops sleepers for them (a cold start of those later),
// which works but is slow. It says what utilization would fit.
func residueFindings(cfg *config.Config, devs []gpu.Device) []config.Finding {
	if len(devs) == 0 {
		return nil
	}
	var total uint64
	for _, d := range devs {
		if total == 0 || d.MemoryTotal < total {
			total = d.MemoryTotal // the smallest GPU decides
		}
	}
	sleepers := 0
	for _, m := range cfg.Models {
		if m.Enabled && m.Sleeps() {
			sleepers++
		}
	}
	var out []config.Finding
	for _, m := range cfg.Models {
		if !m.Enabled || !m.OnDemand() {
			continue
		}
		// Every other sleeper may be on this model's GPUs.
		others := sleepers
		if m.Sleeps() {
			others--
		}
		room := int64(total) - int64(others)*int64(sleepResidue) - int64(cfg.GPU.Headroom)
		need := int64(gpu.Share(m.GPUMemoryUtilization, total))
		if others == 0 || need <= room {
			continue
		}
		fit := float64(max(room, 0)) / float64(total)
		out = append(out, config.Finding{
			Key: "models." + m.Name + ".gpu_memory_utilization",
			Msg: fmt.Sprintf("%g needs %s per GPU; next to %d sleepers' residue (about %s each) only %s is left: sleepers will be stopped to make room for it (cold starts later); at most %.2f fits",
				m.GPUMemoryUtilization, config.ByteSize(need), others, sleepResidue, config.ByteSize(max(room, 0)), float64(int(fit*100))/100),
			Wait: true,
		})
	}
	return out
}
