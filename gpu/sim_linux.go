package gpu

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
)

// descendantProcesses lists the daemon's descendants with their argv and
// environment, from /proc. Only descendants: daemons (or test binaries)
// running side by side on one host with the same sim UUIDs must not count
// each other's models. Models' orphaned workers stay descendants, since
// the daemon is their subreaper.
func descendantProcesses() ([]SimProcess, error) {
	return procDescendants("/proc", os.Getpid())
}

// procDescendants walks the parent links of every process under root (a
// procfs) and returns those that descend from self. Processes that exit
// during the walk, and zombies (which hold no GPU memory), are left out.
func procDescendants(root string, self int) ([]SimProcess, error) {
	entries, err := os.ReadDir(root)
	if err != nil {
		return nil, err
	}
	children := map[int][]int{}
	zombie := map[int]bool{}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		ppid, state, err := readParent(root, pid)
		if err != nil {
			continue // gone meanwhile
		}
		children[ppid] = append(children[ppid], pid)
		zombie[pid] = state == 'Z'
	}
	var out []SimProcess
	queue := slices.Clone(children[self])
	for len(queue) > 0 {
		pid := queue[0]
		queue = append(queue[1:], children[pid]...)
		if zombie[pid] {
			continue
		}
		args, err := readNulList(root, pid, "cmdline")
		if err != nil {
			continue
		}
		env, err := readNulList(root, pid, "environ")
		if err != nil {
			continue
		}
		out = append(out, SimProcess{PID: pid, Args: args, Env: env})
	}
	slices.SortFunc(out, func(a, b SimProcess) int { return a.PID - b.PID })
	return out, nil
}

// readParent reads the parent pid and state of pid from <root>/PID/stat.
func readParent(root string, pid int) (ppid int, state byte, err error) {
	b, err := os.ReadFile(root + "/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	// comm may hold spaces and parentheses: it ends at the last ')'.
	end := bytes.LastIndexByte(b, ')')
	if end < 0 || end+2 >= len(b) {
		return 0, 0, fmt.Errorf("parse %s/%d/stat: malformed", root, pid)
	}
	f := strings.Fields(string(b[end+2:]))
	if len(f) < 2 || len(f[0]) == 0 {
		return 0, 0, fmt.Errorf("parse %s/%d/stat: %d fields", root, pid, len(f))
	}
	ppid, err = strconv.Atoi(f[1])
	return ppid, f[0][0], err
}

// readNulList reads a NUL-separated list such as /proc/PID/cmdline.
func readNulList(root string, pid int, name string) ([]string, error) {
	b, err := os.ReadFile(root + "/" + strconv.Itoa(pid) + "/" + name)
	if err != nil {
		return nil, err
	}
	if len(b) == 0 {
		return nil, fmt.Errorf("%s/%d/%s: empty (a zombie or a kernel thread)", root, pid, name)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00"), nil
}
