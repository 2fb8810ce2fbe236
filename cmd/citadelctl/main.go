// Command citadelctl is the operator's client of citadel-supervisor's
// control socket: status, start, stop, restart, reset, reload, logs,
// health and gpus; and fleet haproxy, which asks several hosts' gateways.
package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/control/client"
)

// Exit codes (docs/cli.md).
const (
	exitOK          = 0
	exitFailed      = 1
	exitUsage       = 2
	exitUnreachable = 3
)

const defaultSocket = "/run/citadel/supervisor.sock"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Environ(), os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

type cli struct {
	socket string
	output string
	client *client.Client
	out    io.Writer
	err    io.Writer
	now    func() time.Time
	width  int
	long   bool // status -l: reasons uncut
}

type command struct {
	usage string // after "citadelctl "
	help  string
	run   func(c *cli, ctx context.Context, args []string) int
}

var commands = map[string]command{
	"status":  {"status [-l] [MODEL...]", "One row per model: state, pid, port, GPUs, uptime, restarts, last exit, reason. The reason is cut to the terminal width ($COLUMNS, else 80); -l shows it whole, -o json gives everything as JSON.", (*cli).status},
	"start":   {"start MODEL...|all", "Start models held stopped or failed (clears their backoff).", opCmd(api.OpStart)},
	"stop":    {"stop [--timeout D] MODEL...|all", "Stop models and hold them stopped until start or a reload that changes them. Waits until they are stopped.", opCmd(api.OpStop)},
	"restart": {"restart MODEL...|all", "Gracefully stop, then start again.", opCmd(api.OpRestart)},
	"reset":   {"reset MODEL...|all", "Clear a failed model's start limit and backoff, then start it.", opCmd(api.OpReset)},
	"sleep":   {"sleep MODEL...|all", "Put on-demand models to sleep now (vLLM sleep mode, or a stop with sleep_level 0); their requests are drained first.", opCmd(api.OpSleep)},
	"wake":    {"wake MODEL...|all", "Wake (or start) on-demand models now, as a request would.", opCmd(api.OpWake)},
	"reload":  {"reload", "Load the configuration file again (as systemctl reload does). An invalid file changes nothing.", (*cli).reload},
	"upgrade": {"upgrade [--timeout D]", "Re-execute the daemon's binary from its path on disk in place (after a package upgrade): same PID, every model kept running, listeners kept; waits until the new image answers. A binary that cannot take over is refused and the daemon keeps running.", (*cli).upgrade},
	"logs":    {"logs MODEL [-n N] [-f]", "The model's recent output, newest last; -f follows new lines until interrupted.", (*cli).logs},
	"health":  {"health", "A readiness summary; exit 0 only when every enabled model is serving: ready, or on demand and asleep or startable. Models held stopped are listed, not counted.", (*cli).health},
	"gpus":    {"gpus", "Each GPU: index, UUID, name, memory total/used/free, models placed on it.", (*cli).gpus},
	"usage":   {"usage [--by key|model]", "The gateway's requests and tokens (prompt, completion, as the models reported them) since the daemon started: per model and API key NAME, or summed by key or by model.", (*cli).usageCmd},
	"completion": {"completion bash|zsh", "A shell completion script; model names come from the daemon.", func(c *cli, _ context.Context, args []string) int {
		return c.completion(args)
	}},
	"fleet":    {"fleet haproxy [--bind ADDR] [--output FILE] [--key-file FILE] [--check-interval D] HOST:PORT...", "Print an HAProxy configuration fronting several hosts' gateways: requests routed by their body's model, each model's backend listing the hosts that serve it (where it sleeps or is startable as backup), health-checked per model with GET /v1/models/ID. Asks each HOST:PORT's GET /v1/models; the daemon's socket is not used. See docs/scaling.md.", (*cli).fleet},
	"__models": {"__models", "", (*cli).modelNames},
}

func run(ctx context.Context, args, environ []string, stdout, stderr io.Writer) int {
	c := &cli{out: stdout, err: stderr, now: time.Now, width: 80}
	if w, err := strconv.Atoi(getenv(environ, "COLUMNS", "")); err == nil && w > 40 {
		c.width = w
	}
	// The terminal's real width; piped or redirected, nothing is cut.
	if cols, tty, isFile := terminalWidth(stdout); tty && cols > 40 {
		c.width = cols
	} else if isFile && !tty {
		c.long = true
	}
	fs := flag.NewFlagSet("citadelctl", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.socket, "socket", getenv(environ, "CITADEL_SOCKET", defaultSocket), "control socket (env CITADEL_SOCKET)")
	fs.StringVar(&c.output, "o", "table", "output: table or json")
	showVersion := fs.Bool("version", false, "print the version and exit")
	fs.Usage = func() { c.usage() }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if *showVersion {
		fmt.Fprintf(stdout, "citadelctl %s (revision %s)\n", version, revision)
		return exitOK
	}
	if fs.NArg() == 0 {
		c.usage()
		return exitUsage
	}
	name, rest := fs.Arg(0), fs.Args()[1:]
	if name == "help" {
		if len(rest) == 1 {
			if cmd, ok := commands[rest[0]]; ok {
				fmt.Fprintf(stdout, "usage: citadelctl [--socket PATH] [-o table|json] %s\n\n%s\n", cmd.usage, cmd.help)
				return exitOK
			}
		}
		c.usage()
		return exitOK
	}
	cmd, ok := commands[name]
	if !ok {
		fmt.Fprintf(stderr, "citadelctl: unknown command %q\n", name)
		c.usage()
		return exitUsage
	}
	if slices.Contains(rest, "-h") || slices.Contains(rest, "--help") {
		fmt.Fprintf(stdout, "usage: citadelctl [--socket PATH] [-o table|json] %s\n\n%s\n", cmd.usage, cmd.help)
		return exitOK
	}
	if c.output != "table" && c.output != "json" {
		fmt.Fprintf(stderr, "citadelctl: -o %q: use table or json\n", c.output)
		return exitUsage
	}
	c.client = client.New(c.socket)
	return cmd.run(c, ctx, rest)
}

func (c *cli) usage() {
	fmt.Fprintln(c.err, "usage: citadelctl [--socket PATH] [-o table|json] COMMAND [ARGS]")
	fmt.Fprintln(c.err, "\ncommands:")
	names := make([]string, 0, len(commands))
	for n := range commands {
		if !strings.HasPrefix(n, "__") {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	for _, n := range names {
		fmt.Fprintf(c.err, "  %-36s %s\n", commands[n].usage, firstSentence(commands[n].help))
	}
	fmt.Fprintln(c.err, "\nexit codes: 0 ok, 1 the request failed, 2 usage, 3 daemon unreachable")
	fmt.Fprintln(c.err, "citadelctl help COMMAND shows one command's help.")
}

// fail prints err and returns the exit code it deserves.
func (c *cli) fail(err error) int {
	if errors.Is(err, client.ErrUnreachable) {
		msg, code := unreachable(c.socket, err)
		fmt.Fprintf(c.err, "citadelctl: %s\n", msg)
		return code
	}
	var re *client.RequestError
	if errors.As(err, &re) && re.Code == 403 {
		fmt.Fprintf(c.err, "citadelctl: %v (use sudo, or join control_socket_group)\n", err)
		return exitFailed
	}
	fmt.Fprintf(c.err, "citadelctl: %v\n", err)
	return exitFailed
}

func (c *cli) status(ctx context.Context, args []string) int {
	args, ok := c.parseOutput("status", args)
	if !ok {
		return exitUsage
	}
	st, err := c.client.Status(ctx, args...)
	if err != nil {
		return c.fail(err)
	}
	if c.output == "json" {
		return c.writeJSON(st)
	}
	idx, noGPUs := c.gpuIndexes(ctx)
	var buf bytes.Buffer
	tw := tabwriter.NewWriter(&buf, 0, 0, 1, ' ', 0)
	// The trailing empty cell pads EXIT, so every line is as wide and the
	// free-text reason can be cut to the terminal's width after it.
	fmt.Fprintln(tw, "NAME\tSTATE\tPID\tPORT\tGPUS\tUPTIME\tRESTARTS\tEXIT\t")
	reasons := []string{"REASON"}
	for _, s := range st {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%d\t%s\t\n",
			s.Name, s.State, dash(s.PID), s.Port, gpuList(s.GPUs, idx), c.uptime(s), s.Restarts, exitCode(s.LastExitCode))
		reasons = append(reasons, s.Reason)
	}
	tw.Flush()
	for i, line := range strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n") {
		reason := reasons[i]
		if !c.long {
			reason = truncate(reason, c.width-len(line))
		}
		fmt.Fprintln(c.out, strings.TrimRight(line+reason, " "))
	}
	if noGPUs != "" {
		fmt.Fprintln(c.out, "GPUs: "+truncate(noGPUs, c.width-6))
	}
	// How the daemon owns the processes (an older daemon does not say).
	if d, err := c.client.Daemon(ctx); err == nil && d.Ownership != "" {
		line := "Ownership: " + d.Ownership
		if d.Cgroup != "" {
			line += " (" + d.Cgroup + ")"
		}
		fmt.Fprintln(c.out, truncate(line, c.width))
	}
	// Asked about models by name: its vLLM, how an on-demand one is used,
	// why a failed one failed, with its last output.
	if len(args) > 0 {
		for _, s := range st {
			if s.VLLMVersion != "" {
				fmt.Fprintf(c.out, "\n%s: vLLM %s (%s)\n", s.Name, s.VLLMVersion, versionSource(s.VLLMVersionSource))
				if s.VLLMNote != "" {
					fmt.Fprintln(c.out, "  "+s.VLLMNote)
				}
			}
			if s.OnDemand {
				awake := "awake"
				switch {
				case s.State == api.Sleeping:
					awake = fmt.Sprintf("asleep (level %d)", s.SleepLevel)
				case s.State != api.Ready:
					awake = "not awake"
				}
				last := "never"
				if !s.LastRequest.IsZero() {
					last = c.now().Sub(s.LastRequest).Round(time.Second).String() + " ago"
				}
				fmt.Fprintf(c.out, "\n%s: on demand, %s; last request %s\n", s.Name, awake, last)
				if s.Canary != "" || s.WakeFailures > 0 {
					// How its wakes are proven (docs/on-demand.md, the canary).
					fmt.Fprintf(c.out, "  wakes proven by: %s; failed wakes: %d\n", cmp.Or(s.Canary, "-"), s.WakeFailures)
				}
			}
			if s.State == api.Failed && len(s.LastOutput) > 0 {
				fmt.Fprintf(c.out, "\n%s failed: %s\nlast output (%d lines kept; citadelctl -o json status %s for all):\n", s.Name, s.Reason, len(s.LastOutput), s.Name)
				for _, l := range s.LastOutput[max(0, len(s.LastOutput)-20):] {
					fmt.Fprintln(c.out, "  "+l)
				}
			}
		}
	}
	return exitOK
}

// versionSource says where a model's vLLM version comes from.
func versionSource(src string) string {
	switch src {
	case "package":
		return "its interpreter's package metadata"
	case "server":
		return "its GET /version"
	case "assumed":
		return "not learnable before it answers: the newest the daemon knows"
	}
	return src
}

// truncate cuts s to n runes, marking the cut.
func truncate(s string, n int) string {
	r := []rune(s)
	if len(r) <= n {
		return s
	}
	if n < 2 {
		return ""
	}
	return string(r[:n-1]) + "…"
}

// parseOutput accepts -o after the command too (citadelctl status -o json).
func (c *cli) parseOutput(cmd string, args []string) ([]string, bool) {
	var rest []string
	for i := 0; i < len(args); i++ {
		switch a := args[i]; {
		case a == "-l":
			c.long = true
		case a == "-o" && i+1 < len(args):
			c.output = args[i+1]
			i++
		case strings.HasPrefix(a, "-o="):
			c.output = strings.TrimPrefix(a, "-o=")
		case strings.HasPrefix(a, "-"):
			fmt.Fprintf(c.err, "citadelctl %s: unknown flag %s\n", cmd, a)
			return nil, false
		default:
			rest = append(rest, a)
		}
	}
	if c.output != "table" && c.output != "json" {
		fmt.Fprintf(c.err, "citadelctl: -o %q: use table or json\n", c.output)
		return nil, false
	}
	return rest, true
}

func opCmd(op api.Op) func(*cli, context.Context, []string) int {
	return func(c *cli, ctx context.Context, args []string) int {
		fs := flag.NewFlagSet(string(op), flag.ContinueOnError)
		fs.SetOutput(c.err)
		timeout := fs.Duration("timeout", 5*time.Minute, "with stop: how long to wait for the models to be stopped")
		fs.SetOutput(io.Discard) // its own message below says what is expected
		if err := fs.Parse(args); err != nil {
			if strings.Contains(err.Error(), "-timeout") {
				fmt.Fprintf(c.err, "citadelctl: --timeout: want a duration such as 5s, 2m or 1h\n")
			} else {
				fmt.Fprintf(c.err, "citadelctl %s: %v\n", op, err)
			}
			return exitUsage
		}
		models := fs.Args()
		if len(models) == 0 {
			fmt.Fprintf(c.err, "usage: citadelctl %s MODEL...|all\n", op)
			return exitUsage
		}
		res, err := c.client.Op(ctx, op, models...)
		if err != nil {
			return c.fail(err)
		}
		code := exitOK
		var ok []string
		for _, r := range res.Results {
			if r.Error != "" {
				fmt.Fprintf(c.err, "%s: %s\n", r.Model, r.Error)
				code = exitFailed
				continue
			}
			ok = append(ok, r.Model)
		}
		if op == api.OpStop && len(ok) > 0 {
			if err := c.waitStopped(ctx, ok, *timeout); err != nil {
				return c.fail(err)
			}
		}
		var st []api.Status
		if len(ok) > 0 { // none named would ask for every model's
			if st, err = c.client.Status(ctx, ok...); err != nil {
				return c.fail(err)
			}
		}
		if c.output == "json" {
			// Each model's outcome with the state it is in now.
			type result struct {
				Model  string    `json:"model"`
				Error  string    `json:"error,omitempty"`
				State  api.State `json:"state,omitempty"`
				Reason string    `json:"reason,omitempty"`
			}
			out := []result{}
			for _, r := range res.Results {
				row := result{Model: r.Model, Error: r.Error}
				for _, s := range st {
					if s.Name == r.Model {
						row.State, row.Reason = s.State, s.Reason
					}
				}
				out = append(out, row)
			}
			c.writeJSON(out)
			return code
		}
		for _, s := range st {
			fmt.Fprintf(c.out, "%s: %s%s\n", s.Name, s.State, withReason(s.Reason))
		}
		return code
	}
}

// waitStopped polls until every model is stopped (or failed), like
// systemctl stop, which returns once the unit is down. A model whose stop
// was undone meanwhile (another operator's start, restart or reset, or a
// reload that changed it: it is no longer held) ends the wait at once,
// naming that operation: the request failed, the daemon answered. What a
// stop waits for (quiet GPUs while a neighbour loads) is said on stderr as
// it changes.
func (c *cli) waitStopped(ctx context.Context, models []string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	said := map[string]string{}
	for {
		st, err := c.client.Status(ctx, models...)
		if err != nil {
			return err
		}
		done := true
		var lost []string
		for _, s := range st {
			switch {
			case s.State == api.Stopped || s.State == api.Failed:
			case !s.Held:
				what := "another operation"
				if s.LastOp != nil && s.LastOp.Op != string(api.OpStop) {
					what = s.LastOp.String()
				}
				lost = append(lost, fmt.Sprintf("%s: not stopped: %s came after this stop (now %s)", s.Name, what, s.State))
			default:
				done = false
				// What it waits for, once the scheduler names it (not the
				// moment of asking, which passes at once on a quiet GPU).
				if strings.HasSuffix(s.Reason, ", before it stops") && said[s.Name] != s.Reason {
					said[s.Name] = s.Reason
					fmt.Fprintf(c.err, "%s: %s\n", s.Name, s.Reason)
				}
			}
		}
		if len(lost) > 0 {
			return errors.New(strings.Join(lost, "; "))
		}
		if done {
			return nil
		}
		if !time.Now().Before(deadline) {
			return fmt.Errorf("models not stopped within %s", timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-tick.C:
		}
	}
}

func (c *cli) reload(ctx context.Context, args []string) int {
	if len(args) != 0 {
		fmt.Fprintln(c.err, "usage: citadelctl reload")
		return exitUsage
	}
	res, err := c.client.Reload(ctx)
	if err != nil {
		return c.fail(err)
	}
	if c.output == "json" {
		return c.writeJSON(res)
	}
	changed := 0
	for _, ch := range res.Changes {
		if ch.Change == "unchanged" {
			continue
		}
		changed++
		fields := ""
		if len(ch.Fields) > 0 {
			fields = " (" + strings.Join(ch.Fields, ", ") + ")"
		}
		fmt.Fprintf(c.out, "%s: %s%s\n", ch.Model, ch.Change, fields)
	}
	if changed == 0 {
		fmt.Fprintln(c.out, "reloaded: nothing changed")
	}
	return exitOK
}

func (c *cli) logs(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("logs", flag.ContinueOnError)
	fs.SetOutput(c.err)
	n := fs.Int("n", 50, "how many recent lines")
	follow := fs.Bool("f", false, "follow new lines until interrupted")
	// Accept the model before or after the flags: logs mixtral -n 20 -f.
	var model string
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		model, args = args[0], args[1:]
	}
	if err := fs.Parse(args); err != nil {
		return exitUsage
	}
	if model == "" && fs.NArg() == 1 {
		model = fs.Arg(0)
	} else if fs.NArg() != 0 || model == "" {
		fmt.Fprintln(c.err, "usage: citadelctl logs MODEL [-n N] [-f]")
		return exitUsage
	}
	if model == "all" {
		fmt.Fprintln(c.err, "citadelctl: logs takes one model; for all of them: journalctl -t 'citadel-*' (or one citadelctl logs per model)")
		return exitUsage
	}
	// A model's output goes to the operator's terminal: escape sequences
	// and binary are shown, not obeyed (visible). JSON lines quote them.
	err := c.client.Logs(ctx, model, *n, *follow, func(line string) {
		if c.output == "json" {
			json.NewEncoder(c.out).Encode(map[string]string{"model": model, "line": line}) //nolint:errcheck // the reader went away
			return
		}
		fmt.Fprintln(c.out, visible(line))
	})
	if err != nil && ctx.Err() == nil {
		return c.fail(err)
	}
	return exitOK
}

func (c *cli) health(ctx context.Context, _ []string) int {
	h, err := c.client.Health(ctx)
	if err != nil {
		return c.fail(err)
	}
	code := exitOK
	if !h.Healthy {
		code = exitFailed
	}
	if c.output == "json" {
		c.writeJSON(h)
		return code
	}
	// Serving: ready, or on demand and sleeping or startable (docs/gateway.md).
	fmt.Fprintf(c.out, "%d/%d enabled models serving\n", h.Ready, h.Enabled)
	for _, s := range h.NotReady {
		fmt.Fprintf(c.out, "  %s: %s%s\n", s.Name, s.State, withReason(s.Reason))
	}
	for _, s := range h.Held {
		fmt.Fprintf(c.out, "  %s: held stopped (not counted)%s\n", s.Name, withReason(s.Reason))
	}
	return code
}

func (c *cli) gpus(ctx context.Context, _ []string) int {
	g, err := c.client.GPUs(ctx)
	if err != nil {
		return c.fail(err)
	}
	if c.output == "json" {
		return c.writeJSON(g)
	}
	if len(g.GPUs) == 0 {
		fmt.Fprintf(c.out, "no GPUs: %s\n", g.Reason)
		return exitOK
	}
	tw := tabwriter.NewWriter(c.out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "GPU\tUUID\tNAME\tTOTAL\tUSED\tFREE\tMODELS")
	for _, d := range g.GPUs {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\n", d.Index, d.UUID, d.Name,
			gib(d.MemoryTotal), gib(d.MemoryUsed), gib(d.MemoryFree), strings.Join(d.Models, ","))
	}
	tw.Flush()
	return exitOK
}

func (c *cli) usageCmd(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("usage", flag.ContinueOnError)
	fs.SetOutput(c.err)
	by := fs.String("by", "", "sum by key or by model")
	if err := fs.Parse(args); err != nil || fs.NArg() != 0 || (*by != "" && *by != "key" && *by != "model") {
		fmt.Fprintln(c.err, "usage: citadelctl usage [--by key|model]")
		return exitUsage
	}
	u, err := c.client.Usage(ctx)
	if err != nil {
		return c.fail(err)
	}
	if !u.Gateway {
		fmt.Fprintln(c.err, "citadelctl: no gateway runs (gateway.listen is empty): nothing is counted")
		return exitFailed
	}
	rows := sumUsage(u.Rows, *by)
	if c.output == "json" {
		u.Rows = rows
		return c.writeJSON(u)
	}
	fmt.Fprintf(c.out, "since %s (%s ago)\n", u.Since.Local().Format(time.DateTime), human(c.now().Sub(u.Since)))
	tw := tabwriter.NewWriter(c.out, 0, 0, 2, ' ', 0)
	head := "MODEL\tKEY\t"
	switch *by {
	case "key":
		head = "KEY\t"
	case "model":
		head = "MODEL\t"
	}
	fmt.Fprintln(tw, head+"REQUESTS\tPROMPT\tCOMPLETION\tTOTAL")
	var total api.UsageRow
	for _, r := range rows {
		key := r.Key
		if key == "" {
			key = "-"
		}
		cells := r.Model + "\t" + key + "\t"
		switch *by {
		case "key":
			cells = key + "\t"
		case "model":
			cells = r.Model + "\t"
		}
		fmt.Fprintf(tw, "%s%d\t%d\t%d\t%d\n", cells, r.Requests, r.PromptTokens, r.CompletionTokens, r.PromptTokens+r.CompletionTokens)
		total.Requests += r.Requests
		total.PromptTokens += r.PromptTokens
		total.CompletionTokens += r.CompletionTokens
	}
	if len(rows) > 1 {
		cells := "all\t\t"
		if *by != "" {
			cells = "all\t"
		}
		fmt.Fprintf(tw, "%s%d\t%d\t%d\t%d\n", cells, total.Requests, total.PromptTokens, total.CompletionTokens, total.PromptTokens+total.CompletionTokens)
	}
	tw.Flush()
	return exitOK
}

// sumUsage sums rows by key or by model ("" keeps them as they are),
// sorted by what they are summed by.
func sumUsage(rows []api.UsageRow, by string) []api.UsageRow {
	if by == "" {
		return rows
	}
	sums := map[string]*api.UsageRow{}
	var names []string
	for _, r := range rows {
		name := r.Model
		if by == "key" {
			name = r.Key
		}
		s := sums[name]
		if s == nil {
			s = &api.UsageRow{}
			if by == "key" {
				s.Key = name
			} else {
				s.Model = name
			}
			sums[name] = s
			names = append(names, name)
		}
		s.Requests += r.Requests
		s.PromptTokens += r.PromptTokens
		s.CompletionTokens += r.CompletionTokens
	}
	slices.Sort(names)
	out := make([]api.UsageRow, 0, len(names))
	for _, n := range names {
		out = append(out, *sums[n])
	}
	return out
}

func (c *cli) modelNames(ctx context.Context, _ []string) int {
	st, err := c.client.Status(ctx)
	if err != nil {
		return exitUnreachable // completion stays silent
	}
	for _, s := range st {
		fmt.Fprintln(c.out, s.Name)
	}
	return exitOK
}

func (c *cli) writeJSON(v any) int {
	enc := json.NewEncoder(c.out)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		return c.fail(err)
	}
	return exitOK
}

// gpuIndexes maps GPU UUIDs to indexes for the status table, and says why
// there are no GPU readings, if so (backend none shows pins as written).
func (c *cli) gpuIndexes(ctx context.Context) (map[string]int, string) {
	out := map[string]int{}
	g, err := c.client.GPUs(ctx)
	if err != nil {
		return out, ""
	}
	for _, d := range g.GPUs {
		out[d.UUID] = d.Index
	}
	return out, g.Reason
}

func (c *cli) uptime(s api.Status) string {
	switch s.State {
	case api.Starting, api.Ready, api.Unhealthy:
		return human(c.now().Sub(s.StartedAt))
	}
	return "-"
}

func gpuList(uuids []string, idx map[string]int) string {
	if len(uuids) == 0 {
		return "-"
	}
	out := make([]string, len(uuids))
	for i, u := range uuids {
		if n, ok := idx[u]; ok {
			out[i] = strconv.Itoa(n)
		} else {
			out[i] = u
		}
	}
	return strings.Join(out, ",")
}

// human formats a duration the way `ps` and `systemctl` do: 3d4h, 2h5m, 4m10s, 12s.
func human(d time.Duration) string {
	d = d.Round(time.Second)
	switch {
	case d >= 24*time.Hour:
		return fmt.Sprintf("%dd%dh", d/(24*time.Hour), d%(24*time.Hour)/time.Hour)
	case d >= time.Hour:
		return fmt.Sprintf("%dh%dm", d/time.Hour, d%time.Hour/time.Minute)
	case d >= time.Minute:
		return fmt.Sprintf("%dm%ds", d/time.Minute, d%time.Minute/time.Second)
	}
	return fmt.Sprintf("%ds", d/time.Second)
}

func gib(b uint64) string { return fmt.Sprintf("%.1fGiB", float64(b)/(1<<30)) }

func dash(n int) string {
	if n == 0 {
		return "-"
	}
	return strconv.Itoa(n)
}

func exitCode(c *int) string {
	if c == nil {
		return "-"
	}
	return strconv.Itoa(*c)
}

func withReason(r string) string {
	if r == "" {
		return ""
	}
	return ": " + r
}

// getenv returns key's value in environ, or def when unset or empty. The
// daemon's twin is config.Getenv; citadelctl does not link package config.
func getenv(environ []string, key, def string) string {
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok && k == key && v != "" {
			return v
		}
	}
	return def
}

func firstSentence(s string) string {
	if i := strings.Index(s, ". "); i >= 0 {
		return s[:i+1]
	}
	return s
}
