package liverestore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"strconv"
	"strings"
	"time"
)

// Starter runs the daemon's own children (the preflight's) through the
// reaper: a child started behind its back is, to the reaper, a stray to
// kill after its grace and an exit status to take, so a --check of a few
// seconds was refused as "signal: killed". Exec runs cmd to its end,
// started through the reaper's Start, and forgets it once waited for.
type Starter interface {
	Exec(cmd *exec.Cmd) error
}

// WriteHandoverVersion is a binary's answer to the preflight's first
// question (--handover-version): the handover version it takes, then its
// own version, as Preflight reads them.
func WriteHandoverVersion(w io.Writer, version string) error {
	_, err := fmt.Fprintf(w, "%d %s\n", HandoverVersion, version)
	return err
}

// PreflightTimeout bounds the preflight (docs/operations.md).
const PreflightTimeout = 20 * time.Second

// Preflight asks the new binary exe which handover it takes and whether it
// accepts the configuration file config, and returns its version: a binary
// that cannot run, or would refuse to start, is never executed in place of
// this one. Both questions are children of the daemon's own, started
// through starter.
func Preflight(ctx context.Context, starter Starter, exe, config string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, PreflightTimeout)
	defer cancel()
	ask := exec.CommandContext(ctx, exe, "--handover-version")
	var out, stderr bytes.Buffer
	ask.Stdout, ask.Stderr = &out, &stderr
	if err := starter.Exec(ask); err != nil {
		if stderr.Len() > 0 {
			err = fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
		}
		return "", fmt.Errorf("%s --handover-version: %w (not a citadel-supervisor that can take over in place?)", exe, err)
	}
	n, to, _ := strings.Cut(strings.TrimSpace(out.String()), " ")
	if n != strconv.Itoa(HandoverVersion) {
		return "", fmt.Errorf("%s takes handover version %q, this daemon hands over version %d: restart instead (systemctl restart citadel-supervisor restarts every model)", exe, n, HandoverVersion)
	}
	check := exec.CommandContext(ctx, exe, "--check", "--config", config)
	var buf bytes.Buffer
	check.Stdout, check.Stderr = &buf, &buf
	if err := starter.Exec(check); err != nil {
		var ee *exec.ExitError
		// 3 and 4: a model cannot start here, or warnings: the running
		// daemon has the same problem. 1: the new binary refuses the file.
		if !errors.As(err, &ee) || (ee.ExitCode() != 3 && ee.ExitCode() != 4) {
			lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
			if len(lines) > 10 {
				lines = append(lines[:10], "…")
			}
			return "", fmt.Errorf("%s --check --config %s: %w:\n%s", exe, config, err, strings.Join(lines, "\n"))
		}
	}
	return to, nil
}
