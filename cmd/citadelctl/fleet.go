package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"
)

// fleetKeyEnv names the environment variable HAProxy reads the health
// checks' API key from: the key stays out of the generated file, which is
// usually readable by all (/etc/haproxy/haproxy.cfg).
const fleetKeyEnv = "CITADEL_FLEET_KEY"

// fleetOptions are fleet haproxy's flags.
type fleetOptions struct {
	bind    string
	output  string
	keyFile string
	inter   time.Duration
	fall    int
	bufsize int
	timeout time.Duration // each host's GET /v1/models
	hosts   []string
	key     string // read from keyFile
}

// fleet is "citadelctl fleet haproxy HOST:PORT...": it asks every host's
// gateway for its models and prints an HAProxy configuration fronting
// them (docs/scaling.md).
func (c *cli) fleet(ctx context.Context, args []string) int {
	if len(args) == 0 || args[0] != "haproxy" {
		fmt.Fprintln(c.err, "citadelctl: usage: citadelctl fleet haproxy [--bind ADDR] [--output FILE] [--key-file FILE] [--check-interval D] HOST:PORT...")
		return exitUsage
	}
	o := fleetOptions{}
	fs := flag.NewFlagSet("fleet haproxy", flag.ContinueOnError)
	fs.SetOutput(c.err)
	fs.StringVar(&o.bind, "bind", ":8000", "the front's address (HAProxy bind syntax)")
	fs.StringVar(&o.output, "output", "", "write the configuration to FILE (atomically) instead of stdout")
	fs.StringVar(&o.keyFile, "key-file", "", "a file holding an API key of the gateways, if they require keys")
	fs.DurationVar(&o.inter, "check-interval", 2*time.Second, "health check interval per model and host")
	fs.IntVar(&o.fall, "fall", 2, "failed checks before a host leaves a model's rotation")
	fs.IntVar(&o.bufsize, "bufsize", 1<<20, "HAProxy's tune.bufsize: request bodies up to this size are routed by their model")
	fs.DurationVar(&o.timeout, "timeout", 10*time.Second, "time allowed to each host's GET /v1/models")
	if err := fs.Parse(args[1:]); err != nil {
		return exitUsage
	}
	o.hosts = fs.Args()
	if len(o.hosts) == 0 {
		fmt.Fprintln(c.err, "citadelctl: fleet haproxy: name at least one gateway as HOST:PORT")
		return exitUsage
	}
	if err := o.check(); err != nil {
		fmt.Fprintf(c.err, "citadelctl: fleet haproxy: %v\n", err)
		return exitUsage
	}
	if o.keyFile != "" {
		b, err := os.ReadFile(o.keyFile)
		if err != nil {
			fmt.Fprintf(c.err, "citadelctl: fleet haproxy: %v\n", err)
			return exitFailed
		}
		o.key = strings.TrimSpace(string(b))
	}
	hosts := make([]fleetHost, 0, len(o.hosts))
	for _, h := range o.hosts {
		models, err := fetchModels(ctx, h, o.key, o.timeout)
		if err != nil {
			// No configuration rather than one without this host: the
			// one in place keeps it, and its checks say whether it is up.
			fmt.Fprintf(c.err, "citadelctl: fleet haproxy: %v\n", err)
			return exitFailed
		}
		hosts = append(hosts, fleetHost{addr: h, models: models})
	}
	cfg, skipped := haproxyConfig(o, hosts)
	for _, s := range skipped {
		fmt.Fprintf(c.err, "citadelctl: fleet haproxy: skipped %s\n", s)
	}
	if o.output == "" {
		_, err := io.WriteString(c.out, cfg)
		if err != nil {
			return exitFailed
		}
		return exitOK
	}
	if err := writeAtomic(o.output, []byte(cfg)); err != nil {
		fmt.Fprintf(c.err, "citadelctl: fleet haproxy: %v\n", err)
		return exitFailed
	}
	return exitOK
}

// hostPort is what a gateway address may look like: a DNS name or an IP
// address, and a port. Anything else could carry HAProxy syntax.
var hostName = regexp.MustCompile(`^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$`)

func (o *fleetOptions) check() error {
	seen := map[string]bool{}
	var errs []error
	for _, h := range o.hosts {
		if err := checkHostPort(h); err != nil {
			errs = append(errs, err)
		} else if seen[h] {
			errs = append(errs, fmt.Errorf("%s named twice", h))
		}
		seen[h] = true
	}
	// The bind address goes into the file as is: the same rule, with an
	// empty host (":8000", all addresses) allowed.
	if h, p, err := net.SplitHostPort(o.bind); err != nil || (h != "" && checkHostPort(o.bind) != nil) || !validPort(p) {
		errs = append(errs, fmt.Errorf("--bind %q: want [HOST]:PORT", o.bind))
	}
	if o.inter < 100*time.Millisecond {
		errs = append(errs, fmt.Errorf("--check-interval %s: at least 100ms", o.inter))
	}
	if o.fall < 1 {
		errs = append(errs, fmt.Errorf("--fall %d: at least 1", o.fall))
	}
	if o.bufsize < 16384 {
		errs = append(errs, fmt.Errorf("--bufsize %d: at least 16384", o.bufsize))
	}
	return errors.Join(errs...)
}

func checkHostPort(hp string) error {
	h, p, err := net.SplitHostPort(hp)
	if err != nil || h == "" || !validPort(p) {
		return fmt.Errorf("%q: want HOST:PORT", hp)
	}
	if net.ParseIP(h) == nil && !hostName.MatchString(h) {
		return fmt.Errorf("%q: %q is neither an IP address nor a host name", hp, h)
	}
	return nil
}

func validPort(p string) bool {
	n, err := strconv.Atoi(p)
	return err == nil && n > 0 && n < 65536 && strconv.Itoa(n) == p
}

// fleetHost is one gateway and what it said about its models.
type fleetHost struct {
	addr   string
	models []fleetModel
}

// fleetModel is the part of a GET /v1/models entry the fleet needs.
type fleetModel struct {
	ID      string `json:"id"`
	Citadel struct {
		Fleet string `json:"fleet"` // awake, sleeping, startable or unavailable
	} `json:"citadel"`
}

// fetchModels asks one gateway for its models.
func fetchModels(ctx context.Context, host, key string, timeout time.Duration) ([]fleetModel, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+host+"/v1/models", nil)
	if err != nil {
		return nil, fmt.Errorf("ask %s: %w", host, err)
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("ask %s for its models: %w", host, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if err != nil {
		return nil, fmt.Errorf("ask %s for its models: %w", host, err)
	}
	if resp.StatusCode != http.StatusOK {
		hint := ""
		if resp.StatusCode == http.StatusUnauthorized {
			hint = " (its gateway requires keys: --key-file)"
		}
		return nil, fmt.Errorf("ask %s for its models: GET /v1/models answered %s%s", host, resp.Status, hint)
	}
	var list struct {
		Data []fleetModel `json:"data"`
	}
	if err := json.Unmarshal(body, &list); err != nil {
		return nil, fmt.Errorf("ask %s for its models: not a model list: %w", host, err)
	}
	return list.Data, nil
}

// modelID is a model name the configuration can carry as is: in an ACL
// value, a backend's name (sanitised) and the health check's URI. Letters,
// digits and ._:@+~- in segments split by single slashes, each segment
// starting with a letter or digit: no space, quote, '#', '%' or newline can
// reach HAProxy's parser, no "." or ".." segment the gateway would refuse,
// and nothing that needs percent-encoding (the gateway refuses encoded
// paths).
var modelID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:@+~-]*(/[A-Za-z0-9][A-Za-z0-9._:@+~-]*)*$`)

// haproxyConfig writes the configuration for hosts, and says which models
// it left out and why.
func haproxyConfig(o fleetOptions, hosts []fleetHost) (string, []string) {
	type server struct {
		host   string
		backup bool
	}
	backends := map[string][]server{}
	var skipped []string
	for _, h := range hosts {
		for _, m := range h.models {
			if len(m.ID) > 200 || !modelID.MatchString(m.ID) {
				skipped = append(skipped, fmt.Sprintf("model %q of %s: its name cannot be written into an HAProxy configuration safely (letters, digits, ._:@+~- and single slashes)", m.ID, h.addr))
				continue
			}
			// Awake hosts are preferred: a request never pays a wake-up
			// while an awake copy is up. A sleeping or startable host is a
			// backup; an unavailable one (starting, failed, held) is a
			// plain server its health check keeps out until it serves.
			backup := m.Citadel.Fleet == "sleeping" || m.Citadel.Fleet == "startable"
			backends[m.ID] = append(backends[m.ID], server{host: h.addr, backup: backup})
		}
	}
	ids := make([]string, 0, len(backends))
	for id := range backends {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	names := backendNames(ids)

	var b strings.Builder
	addrs := make([]string, len(hosts))
	for i, h := range hosts {
		addrs[i] = h.addr
	}
	fmt.Fprintf(&b, `# Generated by citadelctl fleet haproxy from the gateways of %s.
# Run it again when models are added, removed or moved; health checks follow
# models that wake, sleep, fail or stop. Check with haproxy -c -f FILE.
global
    # Requests are routed by their body's model: a body must fit in one
    # buffer to be read whole.
    tune.bufsize %d

defaults
    mode http
    timeout connect 2s
    timeout client 10m
    timeout server 10m
    timeout http-request 30s
    timeout check %s
    # A host that refuses connections, or whose gateway answers 502/503,
    # gets the request again on another host that serves the model.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response 502 503
    # check: per model, GET /v1/models/ID on the host's gateway (200 when
    # servable there). observe: a refused connection takes the host out at
    # once, not after the next checks.
    default-server check inter %s fall %d rise 2 observe layer4 error-limit 1 on-error mark-down
    # Token streams: each event is sent on as it comes. By default HAProxy
    # asks the kernel to hold small writes for more (MSG_MORE), and a
    # stream's tokens then arrive late and in bursts.
    option http-no-delay

frontend citadel
    bind %s
    option http-buffer-request
    http-request set-var(txn.model) req.body,json_query('$.model')
    http-request return status 400 content-type application/json string "{\"error\":{\"message\":\"the fleet routes by the JSON body's model; this request names none (or its body is over tune.bufsize)\",\"type\":\"invalid_request_error\",\"code\":\"model_missing\"}}" if !{ var(txn.model) -m found }
`, strings.Join(addrs, " "), o.bufsize, haDuration(o.inter), haDuration(o.inter), o.fall, o.bind)
	for _, id := range ids {
		fmt.Fprintf(&b, "    use_backend %s if { var(txn.model) -m str %s }\n", names[id], id)
	}
	b.WriteString("    default_backend citadel_unknown_model\n")
	for _, id := range ids {
		fmt.Fprintf(&b, "\nbackend %s\n    option httpchk GET /v1/models/%s\n", names[id], id)
		if o.key != "" {
			fmt.Fprintf(&b, "    http-check send hdr Authorization \"Bearer ${%s}\"\n", fleetKeyEnv)
		}
		b.WriteString("    http-check expect status 200\n")
		for _, s := range backends[id] {
			fmt.Fprintf(&b, "    server %s %s", serverName(s.host), s.host)
			if s.backup {
				b.WriteString(" backup")
			}
			b.WriteString("\n")
		}
	}
	b.WriteString(`
backend citadel_unknown_model
    http-request return status 404 content-type application/json string "{\"error\":{\"message\":\"no host of this fleet serves that model\",\"type\":\"invalid_request_error\",\"code\":\"model_not_found\"}}"
`)
	return b.String(), skipped
}

// backendNames gives each model a backend name HAProxy accepts (letters,
// digits, "_.:-"): "m_" and the model's name with anything else replaced,
// numbered when two names come out the same.
func backendNames(ids []string) map[string]string {
	out := make(map[string]string, len(ids))
	used := map[string]bool{}
	for _, id := range ids {
		base := "m_" + sanitize(id)
		name := base
		for n := 2; used[name]; n++ {
			name = base + "_" + strconv.Itoa(n)
		}
		used[name] = true
		out[id] = name
	}
	return out
}

func serverName(hostPort string) string { return sanitize(hostPort) }

func sanitize(s string) string {
	return strings.Map(func(r rune) rune {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '.', r == '-':
			return r
		}
		return '_'
	}, s)
}

// haDuration writes d in HAProxy's time format (milliseconds).
func haDuration(d time.Duration) string {
	if d%time.Second == 0 {
		return strconv.FormatInt(int64(d/time.Second), 10) + "s"
	}
	return strconv.FormatInt(d.Milliseconds(), 10) + "ms"
}

// writeAtomic replaces path with data: HAProxy (or an operator's reload)
// never reads a half-written file.
func writeAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) //nolint:errcheck // gone once renamed
	if _, err := io.Copy(tmp, bytes.NewReader(data)); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
