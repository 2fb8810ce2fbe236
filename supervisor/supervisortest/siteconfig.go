package supervisortest

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"

	"citadel-supervisor/config"
)

// This file builds a site's configuration as a YAML tree, never by
// searching text: the keys the harness must set (listen, control_socket,
// cache_dir, gpu, the gateway's listen, defaults, models) are set in the
// tree whatever the caller wrote around them, and the result is read back
// with the config package, the way the daemon reads it, to check that
// nothing a test starts listens where it must not.

// siteKeys are the top-level keys only the harness sets.
var siteKeys = []string{"control_socket", "defaults", "models"}

// modelKeys are the model keys only the harness sets (Model.Fake adds
// fake-vllm flags to args).
var modelKeys = []string{"model", "port", "vllm_port", "args"}

// siteSpec is what buildSite needs besides the caller's top-level YAML.
type siteSpec struct {
	dir      string // the site's directory: models/NAME, pids/NAME are the models'
	socket   string
	events   string // the fakes' event log
	cacheDir string
	ledger   string // the sim backend's usage_dir unless top names one
	command  string // every model's program: the test binary
	models   []Model
}

// buildSite returns the configuration tree for spec: top's keys, and
//   - listen: "" (no HTTP server) unless top sets listen;
//   - gateway.listen: "" (no gateway) unless top sets it;
//   - control_socket, cache_dir: in the site's directory;
//   - gpu: {backend: none} unless top sets gpu; with the sim backend, the
//     ledger as sim.usage_dir unless top names one;
//   - defaults: the test binary as the command, fast probes and restarts;
//   - models: each model with its port, args and extra keys (Model.YAML).
//
// It also returns the ledger (the sim backend's usage_dir, "" without the
// sim backend).
func buildSite(top string, spec siteSpec) (*yaml.Node, string, error) {
	root, err := mapping("top-level YAML", top)
	if err != nil {
		return nil, "", err
	}
	for _, k := range siteKeys {
		if get(root, k) != nil {
			return nil, "", fmt.Errorf("top-level YAML sets %s, which the harness sets (give models, and their keys in Model.YAML)", k)
		}
	}
	// The harness's own keys first, where a reader of the file looks.
	var own []*yaml.Node
	if get(root, "listen") == nil {
		own = append(own, scalar("listen"), scalar(""))
	}
	own = append(own, scalar("control_socket"), scalar(spec.socket))
	if get(root, "cache_dir") == nil {
		own = append(own, scalar("cache_dir"), scalar(spec.cacheDir))
	}
	root.Content = append(own, root.Content...)
	gw := get(root, "gateway")
	if gw == nil {
		gw = &yaml.Node{Kind: yaml.MappingNode}
		set(root, "gateway", gw)
	}
	if gw.Kind != yaml.MappingNode {
		return nil, "", fmt.Errorf("gateway: not a mapping")
	}
	if get(gw, "listen") == nil {
		set(gw, "listen", scalar(""))
	}
	g := get(root, "gpu")
	if g == nil {
		g = &yaml.Node{Kind: yaml.MappingNode}
		set(g, "backend", scalar("none"))
		set(root, "gpu", g)
	}
	if g.Kind != yaml.MappingNode {
		return nil, "", fmt.Errorf("gpu: not a mapping")
	}
	ledger := ""
	if b := get(g, "backend"); b != nil && b.Value == "sim" {
		sim := get(g, "sim")
		if sim == nil {
			sim = &yaml.Node{Kind: yaml.MappingNode}
			set(g, "sim", sim)
		}
		if sim.Kind != yaml.MappingNode {
			return nil, "", fmt.Errorf("gpu.sim: not a mapping")
		}
		if dir := get(sim, "usage_dir"); dir != nil {
			ledger = dir.Value
		} else {
			ledger = spec.ledger
			set(sim, "usage_dir", scalar(ledger))
		}
	}

	defaults, err := mapping("defaults", Defaults)
	if err != nil {
		return nil, "", err
	}
	cmd := &yaml.Node{Kind: yaml.SequenceNode, Style: yaml.FlowStyle, Content: []*yaml.Node{scalar(spec.command)}}
	env := &yaml.Node{Kind: yaml.MappingNode, Style: yaml.FlowStyle}
	set(env, SelfEnv, scalar("1"))
	defaults.Content = append([]*yaml.Node{scalar("command"), cmd, scalar("env"), env}, defaults.Content...)
	set(root, "defaults", defaults)

	models := &yaml.Node{Kind: yaml.MappingNode}
	for i, m := range spec.models {
		extra, err := mapping("models."+m.Name+" (Model.YAML)", m.YAML)
		if err != nil {
			return nil, "", err
		}
		for _, k := range modelKeys {
			if get(extra, k) != nil {
				return nil, "", fmt.Errorf("models.%s: Model.YAML sets %s, which the harness sets (fake-vllm flags go in Model.Fake)", m.Name, k)
			}
		}
		node := &yaml.Node{Kind: yaml.MappingNode}
		set(node, "model", scalar(filepath.Join(spec.dir, "models", m.Name)))
		set(node, "port", integer(m.Port))
		// vllm_port set explicitly: the value derived from random ports
		// could clash between models, which validation rightly refuses.
		// Nothing listens there: fake-vllm has no internal ports.
		set(node, "vllm_port", integer(20000+16*i))
		fake := []string{"--fake-pid-dir", filepath.Join(spec.dir, "pids", m.Name), "--fake-event-log", spec.events}
		if ledger != "" && !slices.Contains(m.Fake, "--fake-usage-dir") {
			fake = append(fake, "--fake-usage-dir", ledger)
		}
		args := &yaml.Node{Kind: yaml.SequenceNode, Style: yaml.FlowStyle}
		for _, a := range append(fake, m.Fake...) {
			args.Content = append(args.Content, scalar(a))
		}
		set(node, "args", args)
		node.Content = append(node.Content, extra.Content...)
		set(models, m.Name, node)
	}
	set(root, "models", models)
	return root, ledger, nil
}

// checkListeners reads the configuration as the daemon would and fails
// where a daemon started on it would listen on a port no test may take:
// the production defaults (listen's 127.0.0.1:9400, which a daemon on the
// same host may hold), or any fixed port. A test's listen addresses come
// from the kernel (FreePort), which hands out ports of its ephemeral range
// only.
func checkListeners(y string) error {
	cfg, err := config.Parse([]byte(y), nil)
	if err != nil {
		return fmt.Errorf("the site's configuration does not load:\n%s\n%w", y, err)
	}
	builtin, err := config.Parse(nil, nil)
	if err != nil {
		return fmt.Errorf("the built-in configuration does not load: %w", err)
	}
	eph := config.EphemeralPorts()
	var errs []error
	for _, l := range []struct{ key, addr, def string }{
		{"listen", cfg.Listen, builtin.Listen},
		{"gateway.listen", cfg.Gateway.Listen, builtin.Gateway.Listen},
	} {
		if l.addr == "" {
			continue
		}
		_, p, err := net.SplitHostPort(l.addr)
		port, perr := strconv.Atoi(p)
		switch {
		case err != nil || perr != nil:
			errs = append(errs, fmt.Errorf("%s: %q is not host:port", l.key, l.addr))
		case l.def != "" && strings.HasSuffix(l.def, ":"+p):
			errs = append(errs, fmt.Errorf("%s: %s is the production default's port, which a daemon on this host may hold; take one from the kernel (FreePort)", l.key, l.addr))
		case port < eph.Lo || port > eph.Hi:
			errs = append(errs, fmt.Errorf("%s: %s is a fixed port (the kernel hands out %d-%d); take one from the kernel (FreePort)", l.key, l.addr, eph.Lo, eph.Hi))
		}
	}
	return errors.Join(errs...)
}

// An Edit changes a configuration tree; see Set, Delete and EditYAML.
type Edit func(root *yaml.Node) error

// Set sets the key at path (keys joined by dots: "models.b.env.EXTRA") to
// value, encoded as YAML, creating the mappings on the way.
func Set(path string, value any) Edit {
	return func(root *yaml.Node) error {
		var v yaml.Node
		if err := v.Encode(value); err != nil {
			return fmt.Errorf("set %s: %w", path, err)
		}
		keys := strings.Split(path, ".")
		m := root
		for i, k := range keys[:len(keys)-1] {
			next := get(m, k)
			if next == nil {
				next = &yaml.Node{Kind: yaml.MappingNode}
				set(m, k, next)
			}
			if next.Kind != yaml.MappingNode {
				return fmt.Errorf("set %s: %s is not a mapping", path, strings.Join(keys[:i+1], "."))
			}
			m = next
		}
		set(m, keys[len(keys)-1], &v)
		return nil
	}
}

// Delete removes the key at path; it is an error if there is none.
func Delete(path string) Edit {
	return func(root *yaml.Node) error {
		keys := strings.Split(path, ".")
		m := root
		for _, k := range keys[:len(keys)-1] {
			if m = get(m, k); m == nil || m.Kind != yaml.MappingNode {
				return fmt.Errorf("delete %s: no such key", path)
			}
		}
		for i := 0; i+1 < len(m.Content); i += 2 {
			if m.Content[i].Value == keys[len(keys)-1] {
				m.Content = append(m.Content[:i], m.Content[i+2:]...)
				return nil
			}
		}
		return fmt.Errorf("delete %s: no such key", path)
	}
}

// EditYAML returns the configuration y with edits applied.
func EditYAML(y string, edits ...Edit) (string, error) {
	root, err := mapping("configuration", y)
	if err != nil {
		return "", err
	}
	for _, e := range edits {
		if err := e(root); err != nil {
			return "", err
		}
	}
	return encode(root)
}

// Value returns the scalar at path in the configuration y ("" and false
// if there is none).
func Value(y, path string) (string, bool) {
	m, err := mapping("configuration", y)
	if err != nil {
		return "", false
	}
	for _, k := range strings.Split(path, ".") {
		if m == nil || m.Kind != yaml.MappingNode {
			return "", false
		}
		m = get(m, k)
	}
	if m == nil || m.Kind != yaml.ScalarNode {
		return "", false
	}
	return m.Value, true
}

// mapping parses text as a YAML mapping ("" is an empty one).
func mapping(what, text string) (*yaml.Node, error) {
	var doc yaml.Node
	if err := yaml.Unmarshal([]byte(text), &doc); err != nil {
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	if len(doc.Content) == 0 {
		return &yaml.Node{Kind: yaml.MappingNode}, nil
	}
	if root := doc.Content[0]; root.Kind == yaml.MappingNode {
		return root, nil
	}
	return nil, fmt.Errorf("%s: not a mapping of keys:\n%s", what, text)
}

// encode writes a tree as YAML, indented by two as the docs' examples are.
func encode(root *yaml.Node) (string, error) {
	var b bytes.Buffer
	e := yaml.NewEncoder(&b)
	e.SetIndent(2)
	if err := e.Encode(root); err != nil {
		return "", err
	}
	if err := e.Close(); err != nil {
		return "", err
	}
	return b.String(), nil
}

func get(m *yaml.Node, key string) *yaml.Node {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i+1]
		}
	}
	return nil
}

// set replaces the value of key in m, or adds the key at the end.
func set(m *yaml.Node, key string, v *yaml.Node) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			m.Content[i+1] = v
			return
		}
	}
	m.Content = append(m.Content, scalar(key), v)
}

// scalar is a string node; the encoder quotes it where YAML would read it
// as something else ("", "1").
func scalar(s string) *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!str", Value: s}
}

func integer(n int) *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: "!!int", Value: strconv.Itoa(n)}
}
