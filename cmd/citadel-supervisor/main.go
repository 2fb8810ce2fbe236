// Command citadel-supervisor owns every vLLM model server on a GPU host.
//
// main only wires: it loads the configuration, builds each part with its
// logger and collaborators, and runs them until SIGTERM or SIGINT.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"golang.org/x/sync/errgroup"

	"citadel-supervisor/config"
	"citadel-supervisor/probe"
	"citadel-supervisor/supervisor"
	"citadel-supervisor/supervisor/control"
	"citadel-supervisor/supervisor/control/api"
	"citadel-supervisor/supervisor/exposition"
	"citadel-supervisor/supervisor/gateway"
	"citadel-supervisor/supervisor/liverestore"
	"citadel-supervisor/supervisor/netguard"
	"citadel-supervisor/supervisor/systemd"
	"citadel-supervisor/supervisor/web"
)

// Set at build time by `make build`.
var (
	version  = "dev"
	revision = "unknown"
)

func main() { os.Exit(run(os.Args[1:], os.Environ(), os.Stdout, os.Stderr)) }

func run(args, environ []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("citadel-supervisor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", config.Getenv(environ, "CITADEL_CONFIG", config.DefaultPath), "configuration file (env CITADEL_CONFIG)")
	check := fs.Bool("check", false, "validate the configuration and what this host offers its models, print every problem, and exit (0 valid, 1 invalid, 3 a model cannot start here)")
	strict := fs.Bool("strict", false, "with --check: exit 4 when there are warnings only")
	showVersion := fs.Bool("version", false, "print the version and exit")
	handoverVersion := fs.Bool("handover-version", false, "print the version of the state this binary takes over at an upgrade in place, then its version, and exit (asked by the running daemon before it executes this binary)")
	ownership := fs.String("ownership", "auto", "how to own the models' processes: cgroup (a cgroup v2 leaf per model; needs root or a unit with Delegate=yes), marker (marker variable and parent links), or auto (cgroup where usable)")
	stopLeftovers := fs.Bool("stop-leftovers", false, "stop every model process a dead daemon of this configuration left running, then exit: the unit's ExecStopPost (a no-op when $SERVICE_RESULT says the daemon died and will be restarted: the next one adopts them); refused while a daemon runs")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *showVersion {
		fmt.Fprintf(stdout, "citadel-supervisor %s (revision %s, %s)\n", version, revision, runtime.Version())
		return 0
	}
	if *handoverVersion {
		liverestore.WriteHandoverVersion(stdout, version) //nolint:errcheck // a closed stdout: the preflight says so
		return 0
	}
	// The binary's path now, before a package upgrade replaces the file:
	// an upgrade in place executes what is there then.
	exe, err := os.Executable()
	if err != nil {
		fmt.Fprintf(stderr, "citadel-supervisor: %v\n", err)
		return 1
	}

	if *check {
		return runCheck(*path, environ, *strict, stdout, stderr)
	}
	if *stopLeftovers {
		return runStopLeftovers(*path, environ, stderr)
	}
	started := time.Now()
	// The state a previous image of this process handed over (an upgrade
	// in place), if any.
	handover, environ, herr := liverestore.Read(environ)
	cfg, err := config.Load(*path, environ)
	if err != nil {
		fmt.Fprintf(stderr, "citadel-supervisor: %s is invalid:\n%s\n", *path, indent(err))
		return 1
	}

	log, err := newLogger(cfg.Log, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "citadel-supervisor: %v\n", err)
		return 1
	}
	defer log.Sync() //nolint:errcheck // nothing to do about it at exit
	log.Info("starting", zap.String("version", version), zap.String("config", *path))
	if herr != nil {
		// Past the exec there is no way back: a successor started by
		// systemd adopts the models (docs/operations.md).
		log.Error("upgrade in place: cannot take over from the previous image", zap.Error(herr))
		return 1
	}
	u := &liverestore.Upgrader{Log: log.Named("upgrade"), Exe: exe, Args: os.Args, Environ: environ, Config: *path, Version: version, Started: started}
	if handover != nil {
		u.Upgrades = handover.Upgrades + 1
		log.Info("upgraded in place", zap.String("from", handover.From), zap.String("to", version),
			zap.Int("models", len(handover.Supervisor.Models)), zap.Int("pid", os.Getpid()))
	}

	reaper, err := supervisor.NewReaper()
	if err != nil {
		log.Error("cannot become child subreaper", zap.Error(err))
		return 1
	}
	cgroups, err := openOwnership(*ownership, cfg, environ, log)
	if err != nil {
		log.Error("process ownership", zap.Error(err))
		return 1
	}
	reg := exposition.NewRegistry() // the model and probe series are written past client_golang's registry
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		buildInfo(),
	)
	nv, noGPUs, gpuStatus := openGPUs(cfg, log)
	notify := systemd.NewNotifier(log)
	u.Notify = notify
	var output supervisor.OutputFunc
	if systemd.UnderJournald() {
		// Each model's lines go to the journal as citadel-<model>.
		output = systemd.JournalOutput(log)
		log.Info("model output goes to the journal as citadel-<model>")
	}
	if cfg.Log.ModelDir != "" {
		files := systemd.FileOutput(cfg.Log, output)
		defer func() {
			if err := files.Close(); err != nil {
				log.Warn("closing model log files", zap.Error(err))
			}
		}()
		output = files.Output
	}
	opts := supervisor.Options{
		Output:     output,
		Logger:     log,
		Prober:     probe.NewHTTP(),
		Reaper:     reaper,
		Environ:    environ,
		NoGPUs:     noGPUs,
		GPUStatus:  gpuStatus,
		Registerer: reg,
		// The watchdog pings only while the main loop beats; it must beat
		// well within the ping interval however short WatchdogSec is.
		Heartbeat: systemd.Heartbeat(systemd.WatchdogInterval()),
		Cgroups:   cgroups,
		// The daemon starts no child but models: an orphan it inherits
		// that no model accounts for is an escapee.
		KillStrays: true,
	}
	if handover != nil {
		opts.Handover = &handover.Supervisor
	}
	if store := systemd.OpenFDStore(); store != nil {
		// The models' output pipes outlive a crash of the daemon there.
		opts.FDStore = store
	}
	if nv != nil {
		defer nv.Close() //nolint:errcheck // exiting
		opts.GPUs = nv
	}
	sup, err := supervisor.New(cfg, opts)
	if err != nil {
		log.Error("build supervisor", zap.Error(err))
		return 1
	}
	u.Models, u.Starter = sup, reaper
	var gw *gateway.Gateway
	var readyChecks []web.Check
	if cfg.Gateway.Listen != "" {
		// gateway.listen changes need a restart: the listener binds once.
		settings, err := gatewaySettings(cfg.Gateway)
		if err != nil {
			log.Error("gateway", zap.Error(err))
			return 1
		}
		ln, err := handover.Listener("gateway")
		if err == nil {
			gw, err = gateway.Listen(cfg.Gateway.Listen, gateway.Options{
				Models: sup.Gateway(), Logger: log.Named("gateway"), Registerer: reg, Settings: settings, Listener: ln,
				MaxConnections: cfg.Gateway.MaxConnections, MaxConnectionsPerAddress: cfg.Gateway.MaxConnectionsPerAddress,
				SpoolDir: spoolDir(environ),
			})
		}
		if err != nil {
			log.Error("cannot serve the gateway", zap.Error(err))
			return 1
		}
		// Requests in flight (a stream) finish within gateway.upgrade_drain,
		// or are ended with an error event.
		u.Serve(&liverestore.Server{Name: "gateway", Guard: gw.Guard(), HTTP: gw.HTTP(), Cut: gw.Cut,
			BoundOf: func() time.Duration { return sup.Config().Gateway.UpgradeDrain }}, nil)
		// On-demand models drain their requests here before they sleep.
		sup.SetTraffic(gw)
		log.Info("gateway listening", zap.String("addr", gw.Addr()), zap.Bool("api_keys", settings.Keys != nil),
			zap.Int("max_connections", gw.Guard().Cap()))
		readyChecks = append(readyChecks, web.Check{Name: "gateway", Err: gw.Serving})
	}
	reload := func(ctx context.Context) ([]config.Change, error) {
		notify.Reloading()
		defer notify.Ready()
		changes, err := sup.ReloadFile(ctx, *path, environ)
		if err != nil || gw == nil {
			return changes, err
		}
		// Keys and limits apply at once; a keys file that cannot be used
		// leaves the previous keys in force, and says so.
		settings, err := gatewaySettings(sup.Config().Gateway)
		if err != nil {
			log.Error("reload: the gateway keeps its previous keys and limits", zap.Error(err))
			return changes, fmt.Errorf("models reloaded, but the gateway keeps its previous keys and limits: %w", err)
		}
		gw.Apply(settings)
		return changes, nil
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	exited := make(chan struct{})
	defer close(exited)
	go exitWithin(ctx, exited, sup, cgroups, log)
	// One pending SIGHUP is enough: reloads that arrive during a reload
	// are coalesced into the next.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	g, gctx := errgroup.WithContext(ctx)
	// An upgrade never executes a new image once the daemon is stopping.
	u.Stopping = func() bool { return gctx.Err() != nil }
	reapCtx, stopReaper := context.WithCancel(context.Background())
	g.Go(func() error { return reaper.Run(reapCtx) })
	g.Go(func() error {
		defer stopReaper() // reap until the last model is gone
		return sup.Run(gctx)
	})
	g.Go(func() error {
		// The socket comes up once the supervisor holds its identity lock
		// and has stopped any predecessor's leftovers.
		select {
		case <-sup.Ready():
		case <-gctx.Done():
			return nil
		}
		_, maxConns := netguard.Limits()
		ln, err := handover.Listener("control")
		if err != nil {
			return err
		}
		ul, _ := ln.(*net.UnixListener)
		srv, err := control.Listen(control.Options{
			Listener:  ul,
			Upgrade:   func(ctx context.Context) (api.UpgradeResponse, func(), error) { return u.Prepare(ctx, true) },
			Path:      cfg.ControlSocket,
			Group:     cfg.ControlGroup,
			ReadGroup: cfg.ControlReadGroup,
			Logger:    log.Named("control"),
			Backend:   sup,
			Reload:    reload,
			MaxConns:  maxConns,
			Daemon: func() api.Daemon {
				d := api.Daemon{Ownership: sup.Ownership(), Cgroup: sup.CgroupRoot()}
				u.Daemon(&d)
				return d
			},
			Usage: func() api.Usage { return gatewayUsage(gw) },
		})
		if err != nil {
			return err
		}
		u.Serve(&liverestore.Server{Name: "control", Guard: srv.Guard(), HTTP: srv.HTTP(), Bound: liverestore.ControlDrain}, srv.KeepSocket)
		// SIGUSR2 upgrades in place, as `citadelctl upgrade` does.
		usr2 := make(chan os.Signal, 1)
		signal.Notify(usr2, syscall.SIGUSR2)
		g.Go(func() error {
			defer signal.Stop(usr2)
			for {
				select {
				case <-gctx.Done():
					return nil
				case <-usr2:
					u.Signal(gctx)
				}
			}
		})
		log.Info("control socket listening", zap.String("path", cfg.ControlSocket))
		// Configuration, GPU backend and both listeners are up: ready,
		// without waiting for models (they report on their own).
		notify.Ready()
		g.Go(func() error {
			return notify.StatusUpdates(gctx, 2*time.Second, func() string {
				st, _ := sup.Status()
				return supervisor.Summary(st)
			})
		})
		return srv.Run(gctx)
	})
	g.Go(func() error { return notify.Watchdog(gctx, sup.Alive) })
	g.Go(func() error {
		<-gctx.Done()
		notify.Stopping()
		notify.Status("stopping every model")
		return nil
	})
	if nv != nil {
		g.Go(func() error { return nv.WatchXids(gctx) })
	}
	if gw != nil {
		g.Go(func() error { return gw.Run(gctx) })
	}
	if cfg.Listen != "" {
		// listen changes need a restart: the HTTP server binds once.
		var srv *web.Server
		ln, err := handover.Listener("http")
		switch {
		case err != nil:
		case ln != nil:
			srv = web.Serve(ln, sup, reg, log.Named("http"), readyChecks...)
		default:
			srv, err = web.Listen(cfg.Listen, sup, reg, log.Named("http"), readyChecks...)
		}
		if err != nil {
			log.Error("cannot serve HTTP", zap.Error(err))
			return 1
		}
		u.Serve(&liverestore.Server{Name: "http", Guard: srv.Guard(), HTTP: srv.HTTP(), Bound: liverestore.HTTPDrain}, nil)
		log.Info("HTTP listening", zap.String("addr", srv.Addr()))
		g.Go(func() error { return srv.Run(gctx) })
	}
	g.Go(func() error {
		for {
			select {
			case <-gctx.Done():
				return nil
			case <-hup:
				reload(gctx) //nolint:errcheck // logged inside
			}
		}
	})
	if err := g.Wait(); err != nil {
		log.Error("exiting", zap.Error(err))
		return 1
	}
	log.Info("stopped")
	return 0
}

// spoolDir is where the gateway writes the request bodies over its memory
// budget: the unit's StateDirectory (systemd sets STATE_DIRECTORY), on
// disk, rather than a /tmp that may be a tmpfs (Debian 13's is), whose
// files are memory; else $TMPDIR.
func spoolDir(environ []string) string {
	dir, _, _ := strings.Cut(config.Getenv(environ, "STATE_DIRECTORY", ""), ":")
	return dir
}

// gatewaySettings are the gateway's limits and its keys, read from
// api_keys_file now (at start and at each reload).
func gatewaySettings(c config.Gateway) (gateway.Settings, error) {
	s := gateway.Settings{MaxQueue: c.MaxQueue, MaxWait: c.MaxWait, MaxBody: int64(c.MaxBody),
		BodyTimeout: c.BodyTimeout, MinBodyRate: int64(c.MinBodyRate), SendTimeout: c.SendTimeout,
		BodyMemory: int64(c.BodyMemory), BodySpool: int64(c.BodySpool)}
	if c.APIKeysFile != "" && c.Listen != "" {
		keys, err := gateway.LoadKeys(c.APIKeysFile)
		if err != nil {
			return s, err
		}
		s.Keys = keys
		s.Policies = make(map[string]gateway.Policy, len(c.Keys))
		for name, p := range c.Keys {
			s.Policies[name] = gateway.Policy{
				Models: p.Models, RequestsPerMinute: p.RequestsPerMinute, TokensPerMinute: p.TokensPerMinute,
				MaxConcurrency: p.MaxConcurrency, Weight: p.Weight,
			}
		}
	}
	return s, nil
}

// gatewayUsage is the gateway's usage on the control wire.
func gatewayUsage(gw *gateway.Gateway) api.Usage {
	u := api.Usage{Rows: []api.UsageRow{}}
	if gw == nil {
		return u
	}
	u.Gateway, u.Since = true, gw.Started()
	for _, r := range gw.Usage() {
		u.Rows = append(u.Rows, api.UsageRow{Model: r.Model, Key: r.Key, Requests: r.Requests, PromptTokens: r.Prompt, CompletionTokens: r.Completion})
	}
	return u
}

// buildInfo is citadel_build_info, set at build time by `make build`.
func buildInfo() prometheus.Collector {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "citadel_build_info",
		Help: "The running build; always 1.",
	}, []string{"version", "revision", "goversion"})
	g.WithLabelValues(version, revision, runtime.Version()).Set(1)
	return g
}

func newLogger(c config.Log, w io.Writer) (*zap.Logger, error) {
	level, err := zapcore.ParseLevel(c.Level)
	if err != nil {
		return nil, fmt.Errorf("log.level: %w", err)
	}
	enc := zap.NewProductionEncoderConfig()
	enc.EncodeTime = zapcore.ISO8601TimeEncoder
	var encoder zapcore.Encoder
	if c.Format == "console" {
		encoder = zapcore.NewConsoleEncoder(enc)
	} else {
		encoder = zapcore.NewJSONEncoder(enc)
	}
	return zap.New(zapcore.NewCore(encoder, zapcore.AddSync(w), level)), nil
}

func indent(err error) string {
	return "  " + strings.ReplaceAll(err.Error(), "\n", "\n  ")
}

// runStopLeftovers is --stop-leftovers. Under systemd it runs as
// ExecStopPost after every end of the daemon: after `systemctl stop` it
// stops what a daemon that hung left (SERVICE_RESULT success or timeout);
// after a crash (signal, core-dump, watchdog, exit-code) it does nothing,
// so the daemon systemd restarts adopts the models (docs/operations.md).
func runStopLeftovers(path string, environ []string, stderr io.Writer) int {
	switch result := config.Getenv(environ, "SERVICE_RESULT", ""); result {
	case "", "success", "timeout":
	default:
		fmt.Fprintf(stderr, "citadel-supervisor: the daemon ended with %s: its models are left for the next one to adopt\n", result)
		return 0
	}
	cfg, err := config.Load(path, environ)
	if err != nil {
		fmt.Fprintf(stderr, "citadel-supervisor: %s is invalid:\n%s\n", path, indent(err))
		return 1
	}
	log, err := newLogger(cfg.Log, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "citadel-supervisor: %v\n", err)
		return 1
	}
	if err := supervisor.StopLeftovers(cfg, log); err != nil {
		log.Error("stop leftovers", zap.Error(err))
		return 1
	}
	return 0
}
