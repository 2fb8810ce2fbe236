package supervisor

import (
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"syscall"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"

	"citadel-supervisor/config"
	"citadel-supervisor/probe"
	"citadel-supervisor/supervisor/lifecycle"
	"citadel-supervisor/supervisor/proc"
)

// spawn starts one instance of m in a new process group, with its output
// captured line by line. eff is m as its vLLM can have it (spawnConfig):
// the command line and environment are built from it, the digest from m.
// gpus are the placed GPUs, visible how the child's CUDA_VISIBLE_DEVICES
// names them. doing is told what it does now (a spawn that hangs says
// so).
func (r *runner) spawn(m, eff config.Model, secrets map[string]string, gpus, visible []string, doing func(string)) (*instance, error) {
	args := eff.Argv()
	marker := r.d.id + "/" + m.Name + "/" + rand.Text()[:16]
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = childEnv(r.d.environ, eff, secrets, visible, marker)
	// Its own process group, so a terminal's or systemd's signal to the
	// daemon's group does not reach models behind the supervisor's back.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	var cg *proc.Cgroup
	if r.d.cgroups != nil {
		// Cloned straight into its own leaf (clone3 CLONE_INTO_CGROUP), not
		// moved after: nothing it forks can run a moment outside it.
		doing("creating its cgroup leaf")
		leaf, err := r.d.cgroups.New(m.Name + "@" + marker[len(marker)-16:])
		if err != nil {
			return nil, err
		}
		fd, err := leaf.OpenFD()
		if err != nil {
			_ = leaf.Remove()
			return nil, err
		}
		defer unix.Close(fd)
		cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, fd
		cg = leaf
		defer func() {
			if cmd.Process == nil {
				_ = leaf.Remove()
			}
		}()
	}
	// The pipes are os.Files handed to the child directly: Wait does not
	// wait for them, so a detached worker holding them open cannot stall
	// the reaping of the main process. WaitDelay bounds Wait regardless.
	cmd.WaitDelay = time.Second
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("stdout pipe: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return nil, fmt.Errorf("stderr pipe: %w", err)
	}
	cmd.Stdout, cmd.Stderr = outW, errW
	doing("starting " + args[0])
	err = r.d.reaper.Start(cmd)
	outW.Close()
	errW.Close()
	if err != nil {
		outR.Close()
		errR.Close()
		return nil, err
	}
	tree := proc.NewTree(marker, cmd.Process.Pid)
	if cg != nil {
		tree = proc.NewCgroupTree(marker, cmd.Process.Pid, cg)
		r.cg.Store(cg)
	}
	r.marker.Store(&marker)
	inst := &instance{
		Instance: lifecycle.Instance{PID: cmd.Process.Pid, Started: r.d.now(), GPUs: gpus, SleepMode: eff.Sleeps()},
		marker:   marker,
		digest:   m.SpawnDigest(),
		stdout:   outR,
		stderr:   errR,
		tree:     tree,
		kill:     cmd.Process.Kill,
		deep:     &probe.Deep{Period: m.Probe.DeepPeriod, Now: r.d.now},
		done:     make(chan struct{}),
	}
	doing("reading the start time of its process")
	if st, err := proc.ReadStat(inst.PID); err == nil {
		inst.start = st.Start
	}
	r.d.storeOutput(marker, outR, errR)
	r.log.Info("spawned", zap.Int("pid", inst.PID), zap.Strings("argv", config.MaskArgs(args)), zap.Strings("gpus", gpus), zap.Strings("cuda_visible_devices", visible))
	go r.capture(outR, "stdout")
	go r.capture(errR, "stderr")
	go func() {
		awaitExit(inst.PID, inst.start)
		err := cmd.Wait()
		r.d.reaper.Done(inst.PID)
		inst.Exit = describeExit(cmd.ProcessState, err)
		close(inst.done)
	}()
	return inst, nil
}

// partialFlush is how long a line without its end (a progress bar
// redrawn with \r, a prompt) waits before it is passed on as it is.
const partialFlush = time.Second

// capture copies one output stream into the ring and the daemon's log until
// every writer (the model and any worker holding the pipe) has closed it.
// A line ends at \n or \r (progress bars redraw with \r; \r\n is one end),
// and a partial line is passed on once it has waited partialFlush, so
// output reaches the ring and the journal as it comes. It never stops
// reading, so a chatty model is never blocked on its pipe; an overlong
// line is cut at maxLineBytes.
func (r *runner) capture(f *os.File, stream string) {
	defer f.Close()
	log := r.log.With(zap.String("stream", stream))
	emit := func(text string) {
		r.out.add(text)
		r.d.output(log, r.name, stream, text)
		if servingLine(text) {
			select {
			case r.serving <- struct{}{}:
			default: // one signal pending is enough
			}
		}
	}
	// A model's output is a few lines a second: a small read buffer serves
	// it as well as a large one, and two of them are held for every model
	// as long as it runs (64 KiB each was 25 MiB of a 200-model daemon).
	// A longer line gathers in line, up to maxLineBytes.
	buf := make([]byte, 4*1024)
	line := make([]byte, 0, 256)
	cut, afterCR := false, false // discarding the rest of a cut line; the last byte was \r
	for {
		// Waiting with a partial line: give it partialFlush, then pass it on.
		if len(line) > 0 {
			f.SetReadDeadline(time.Now().Add(partialFlush)) //nolint:errcheck // pipes support deadlines
		} else {
			f.SetReadDeadline(time.Time{}) //nolint:errcheck // as above
		}
		n, err := f.Read(buf)
		for _, b := range buf[:n] {
			switch {
			case b == '\n' && afterCR:
				afterCR = false // \r\n: the line ended at \r
			case b == '\n' || b == '\r':
				if !cut {
					emit(string(line))
				}
				line, cut, afterCR = line[:0], false, b == '\r'
			case cut:
				afterCR = false
			case len(line) >= maxLineBytes:
				emit(string(line) + " [line cut]")
				line, cut, afterCR = line[:0], true, false
			default:
				line, afterCR = append(line, b), false
			}
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			emit(string(line))
			line = line[:0]
			continue
		}
		if err != nil {
			if len(line) > 0 && !cut {
				emit(string(line))
			}
			if !errors.Is(err, io.EOF) && !errors.Is(err, os.ErrClosed) {
				log.Warn("output read failed", zap.Error(err))
			}
			return
		}
	}
}

func describeExit(ps *os.ProcessState, err error) lifecycle.Exit {
	if ps == nil {
		return lifecycle.Exit{Code: -1, Desc: fmt.Sprintf("wait failed: %v", err)}
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		sig := ws.Signal()
		return lifecycle.Exit{Code: 128 + int(sig), Desc: fmt.Sprintf("killed by %s", unix.SignalName(sig))}
	}
	return lifecycle.Exit{Code: ps.ExitCode(), Desc: fmt.Sprintf("exit code %d", ps.ExitCode())}
}
