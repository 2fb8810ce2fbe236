package config

import (
	"fmt"
	"maps"
	"net"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Gateway configures the OpenAI-compatible endpoint in front of every model
// (docs/gateway.md). Listen "" disables it.
type Gateway struct {
	Listen string `koanf:"listen"`
	// APIKeysFile, when set, holds one `NAME TOKEN` per line; a request
	// must carry one of the tokens as `Authorization: Bearer TOKEN`.
	APIKeysFile string `koanf:"api_keys_file"`
	// MaxQueue is how many requests one model holds waiting (for a free
	// slot under max_concurrency, or for the model to become ready);
	// beyond it the gateway answers 429.
	MaxQueue int `koanf:"max_queue"`
	// MaxWait is how long a held request waits before 503 + Retry-After.
	MaxWait time.Duration `koanf:"max_wait"`
	// MaxBody caps a request body; base64 images to a vision model make
	// bodies of several MiB.
	MaxBody ByteSize `koanf:"max_body"`
	// Keys holds a policy per key NAME of the api_keys_file: the models it
	// may use, its rate limits and its share of a busy model's queue. A
	// key without a policy may use every model without limit, at weight 1.
	Keys map[string]KeyPolicy `koanf:"keys"`
	// BodyTimeout: a request body that brings no byte for this long is
	// answered 408 (nginx's client_body_timeout).
	BodyTimeout time.Duration `koanf:"body_timeout"`
	// MinBodyRate: past the first BodyTimeout, a body must arrive at this
	// many bytes per second on average, else 408 (Apache mod_reqtimeout's
	// MinRate). 0 = only BodyTimeout applies.
	MinBodyRate ByteSize `koanf:"min_body_rate"`
	// SendTimeout: an answer the client reads nothing of for this long is
	// cut (nginx's send_timeout).
	SendTimeout time.Duration `koanf:"send_timeout"`
	// BodyMemory bounds the request bodies held in memory, all requests
	// together; beyond it bodies are written to temporary files.
	BodyMemory ByteSize `koanf:"body_memory"`
	// BodySpool bounds the bodies held in temporary files; beyond it the
	// gateway answers 429. 0 = no files: 429 once BodyMemory is full.
	BodySpool ByteSize `koanf:"body_spool"`
	// MaxConnections caps the gateway's client connections; 0 = derived
	// from the descriptor limit (docs/gateway.md). Read at start-up.
	MaxConnections int `koanf:"max_connections"`
	// MaxConnectionsPerAddress caps one client address's connections; 0 =
	// no cap (the default: a fleet's HAProxy is one address). Read at
	// start-up.
	MaxConnectionsPerAddress int `koanf:"max_connections_per_address"`
	// UpgradeDrain: how long an upgrade in place lets the requests in
	// flight finish before it ends them (a stream with an error event).
	UpgradeDrain time.Duration `koanf:"upgrade_drain"`
}

// KeyPolicy is one API key's scope and limits (gateway.keys.NAME).
type KeyPolicy struct {
	// Models this key may use, by configured or served name; empty: all.
	Models []string `koanf:"models"`
	// RequestsPerMinute and TokensPerMinute limit the key; 0 = no limit.
	// Tokens are prompt plus completion tokens as the models' answers
	// report them (usage), charged once the answer is complete.
	RequestsPerMinute int `koanf:"requests_per_minute"`
	TokensPerMinute   int `koanf:"tokens_per_minute"`
	// MaxConcurrency caps the key's requests in flight across all models;
	// beyond it they wait in the model's queue. 0 = no cap.
	MaxConcurrency int `koanf:"max_concurrency"`
	// Weight is the key's share when keys wait for one model; 0 means 1.
	Weight int `koanf:"weight"`
}

// Share is the policy's weight: 1 unless set.
func (p KeyPolicy) Share() int { return max(p.Weight, 1) }

// keyNamePattern is what api_keys_file accepts as a NAME.
var keyNamePattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$`)

// builtinGateway holds the gateway's defaults: disabled.
func builtinGateway() map[string]any {
	return map[string]any{
		"listen":        "",
		"api_keys_file": "",
		"max_queue":     64,
		"max_wait":      "3m",
		"max_body":      "32MiB",
		"keys":          map[string]any{},
		"body_timeout":  "10s",
		"min_body_rate": "16KiB",
		"send_timeout":  "60s",
		"body_memory":   "64MiB",
		"body_spool":    "2GiB",
		"upgrade_drain": "30s",
		// Bound once, at start-up.
		"max_connections":             0,
		"max_connections_per_address": 0,
	}
}

func (c *Config) validateGateway(add func(key, format string, args ...any)) {
	g := c.Gateway
	if g.MaxQueue < 0 {
		add("gateway.max_queue", "%d: must not be negative (0 = no queue: 429 when a model is busy)", g.MaxQueue)
	}
	if g.MaxWait <= 0 {
		add("gateway.max_wait", "must be positive")
	}
	if g.MaxBody < KiB {
		add("gateway.max_body", "must be at least 1KiB")
	}
	if g.BodyTimeout <= 0 {
		add("gateway.body_timeout", "must be positive")
	}
	if g.SendTimeout <= 0 {
		add("gateway.send_timeout", "must be positive")
	}
	if g.UpgradeDrain <= 0 {
		add("gateway.upgrade_drain", "must be positive")
	}
	if g.BodyMemory < MiB {
		add("gateway.body_memory", "must be at least 1MiB")
	}
	if g.MaxBody >= KiB && g.BodyMemory >= MiB && g.BodyMemory+g.BodySpool < g.MaxBody {
		add("gateway.body_spool", "body_memory + body_spool (%s) is less than max_body (%s): the largest body allowed could never be held", g.BodyMemory+g.BodySpool, g.MaxBody)
	}
	if g.MaxConnections < 0 {
		add("gateway.max_connections", "%d: must not be negative (0 = derived from the descriptor limit)", g.MaxConnections)
	}
	if g.MaxConnectionsPerAddress < 0 {
		add("gateway.max_connections_per_address", "%d: must not be negative (0 = no cap)", g.MaxConnectionsPerAddress)
	}
	if g.APIKeysFile != "" && !filepath.IsAbs(g.APIKeysFile) {
		add("gateway.api_keys_file", "%q: must be an absolute path", g.APIKeysFile)
	}
	for _, m := range c.Models {
		if m.MaxConcurrency < 0 {
			add("models."+m.Name+".max_concurrency", "%d: must not be negative (0 = no cap)", m.MaxConcurrency)
		}
	}
	c.validateKeys(add)
	if g.Listen == "" {
		return
	}
	_, p, err := net.SplitHostPort(g.Listen)
	port, perr := strconv.Atoi(p)
	if err != nil || perr != nil || port < 0 || port > 65535 {
		add("gateway.listen", "%q is not host:port (use \"\" to disable the gateway)", g.Listen)
		return
	}
	if _, lp, err := net.SplitHostPort(c.Listen); err == nil && lp == p && port != 0 {
		add("gateway.listen", "port %d is the supervisor's own listen port", port)
	}
	// The gateway routes by name: a name must lead to one model.
	names := map[string]string{} // configured or served name → model
	for _, m := range c.Models {
		if m.Port == port && port != 0 {
			add("gateway.listen", "port %d is models.%s's port", port, m.Name)
		}
		names[m.Name] = m.Name
	}
	for _, m := range c.Models {
		if m.ServedName == m.Name {
			continue
		}
		if other, ok := names[m.ServedName]; ok {
			add("models."+m.Name+".served_name", "%q already names models.%s: the gateway could not tell them apart", m.ServedName, other)
			continue
		}
		names[m.ServedName] = m.Name
	}
}

// GatewayWarnings lists what is valid but probably not meant: with a
// gateway in front, a model bound to a wider address than loopback can be
// reached around the gateway's keys and limits.
func (c *Config) GatewayWarnings() []string {
	if c.Gateway.Listen == "" {
		return nil
	}
	var out []string
	for _, m := range c.Models {
		ip := net.ParseIP(m.Host)
		if m.Host == "localhost" || (ip != nil && ip.IsLoopback()) {
			continue
		}
		out = append(out, fmt.Sprintf("models.%s.host: %s is reachable around the gateway (its keys and limits); bind models to 127.0.0.1", m.Name, m.Host))
	}
	return out
}

// validateKeys checks gateway.keys: each NAME as api_keys_file writes it,
// each scope naming configured models, no negative limit.
func (c *Config) validateKeys(add func(key, format string, args ...any)) {
	g := c.Gateway
	if len(g.Keys) > 0 && g.APIKeysFile == "" {
		add("gateway.keys", "policies need keys: set gateway.api_keys_file (one `NAME TOKEN` per line) and name its NAMEs here")
	}
	known := map[string]bool{}
	var names []string
	for _, m := range c.Models {
		known[m.Name], known[m.ServedName] = true, true
		names = append(names, m.Name)
	}
	sort.Strings(names)
	for _, name := range slices.Sorted(maps.Keys(g.Keys)) {
		p, key := g.Keys[name], "gateway.keys."+name
		if !keyNamePattern.MatchString(name) {
			add(key, "a key NAME is letters, digits, '_', '.', '@' or '-' (at most 64), as in api_keys_file")
		}
		for i, m := range p.Models {
			if !known[m] {
				add(fmt.Sprintf("%s.models[%d]", key, i), "%q names no model (configured: %s)", m, strings.Join(names, ", "))
			}
		}
		for _, l := range []struct {
			sub, zero string
			v         int
		}{
			{"requests_per_minute", "no limit", p.RequestsPerMinute},
			{"tokens_per_minute", "no limit", p.TokensPerMinute},
			{"max_concurrency", "no cap", p.MaxConcurrency},
			{"weight", "1", p.Weight},
		} {
			if l.v < 0 {
				add(key+"."+l.sub, "%d: must not be negative (0 = %s)", l.v, l.zero)
			}
		}
	}
}
