package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"citadel-supervisor/supervisor/control/api"
)

// upgrade asks the daemon to re-execute its binary in place and waits for
// the new image to answer: same PID, every model kept (docs/operations.md).
func (c *cli) upgrade(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("upgrade", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // the messages below say what is expected
	timeout := fs.Duration("timeout", 2*time.Minute, "how long to wait for the new image")
	if err := fs.Parse(args); err != nil || fs.NArg() != 0 {
		if err != nil && strings.Contains(err.Error(), "-timeout") {
			fmt.Fprintf(c.err, "citadelctl: --timeout: want a duration such as 5s, 2m or 1h\n")
		} else {
			fmt.Fprintln(c.err, "usage: citadelctl upgrade [--timeout D]")
		}
		return exitUsage
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	before, err := c.client.Daemon(ctx)
	if err != nil {
		return c.fail(err)
	}
	res, err := c.client.Upgrade(ctx)
	if err != nil {
		return c.fail(err)
	}
	if c.output == "table" {
		fmt.Fprintf(c.out, "upgrading in place: pid %d, %s → %s (%s), %d models handed over, %d of them running\n",
			before.PID, res.From, res.To, res.Binary, res.Models, res.Running)
	}
	after, err := c.waitImage(ctx, before)
	if err != nil {
		fmt.Fprintf(c.err, "citadelctl: %v\n", err)
		return exitFailed
	}
	if c.output == "json" {
		return c.writeJSON(struct {
			api.UpgradeResponse
			Daemon api.Daemon `json:"daemon"`
		}{res, after})
	}
	fmt.Fprintf(c.out, "upgraded: pid %d, version %s, image started %s\n", after.PID, after.Version, after.ImageStarted.Format(time.RFC3339))
	return exitOK
}

// waitImage waits until a new image of the daemon answers, or the old one
// says the exec failed.
func (c *cli) waitImage(ctx context.Context, before api.Daemon) (api.Daemon, error) {
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		d, err := c.client.Daemon(ctx)
		switch {
		case err == nil && d.Upgrades > before.Upgrades:
			if d.PID != before.PID {
				return d, fmt.Errorf("the daemon answers with pid %d, not %d: it was restarted, not upgraded in place", d.PID, before.PID)
			}
			return d, nil
		case err == nil && d.UpgradeFailures > before.UpgradeFailures && d.PID == before.PID:
			return d, errors.New("the upgrade failed; the daemon keeps running its previous image: " + d.LastUpgradeError)
		}
		select {
		case <-ctx.Done():
			return api.Daemon{}, fmt.Errorf("no new image answered: %w (see journalctl -u citadel-supervisor)", ctx.Err())
		case <-tick.C:
		}
	}
}
