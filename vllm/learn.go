package vllm

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// Snippet is what the interpreter runs to say which vLLM it would import:
// the installed distribution's metadata, read by importlib.metadata.
// Importing vllm itself would load torch and initialise CUDA (seconds, and
// GPU memory) just to read a string.
const Snippet = `import importlib.metadata as m; print(m.version("vllm"))`

// ErrNoInterpreter means the command's Python interpreter cannot be told
// from the command (a wrapper script in another language, a container
// runtime): the version is then learned from GET /version only.
var ErrNoInterpreter = errors.New("cannot tell which Python interpreter the command runs")

var pythonName = regexp.MustCompile(`^python[0-9.]*$`)

// Interpreter returns the Python interpreter that command runs, the way
// the kernel and env(1) would find it: command[0] itself when it is a
// python, the interpreter of its #! line (a console script such as
// .../bin/vllm, or "#!/usr/bin/env python3"), or the program env(1) is
// told to run. path is the PATH the model's process would search.
func Interpreter(command []string, path string) (string, error) {
	for depth := 0; len(command) > 0 && depth < 4; depth++ {
		prog, err := lookPath(command[0], path)
		if err != nil {
			return "", err
		}
		base := filepath.Base(prog)
		switch {
		case pythonName.MatchString(base):
			return prog, nil
		case base == "env":
			command = envProgram(command[1:])
			continue
		}
		line, err := shebang(prog)
		if err != nil {
			return "", err
		}
		if line == nil {
			return "", fmt.Errorf("%w: %s is neither a python nor a #! script", ErrNoInterpreter, prog)
		}
		command = line
	}
	return "", fmt.Errorf("%w: %q", ErrNoInterpreter, command)
}

// envProgram skips env(1)'s options and NAME=VALUE words: what is left
// starts with the program it runs. "-S" splits its argument, as a #! line
// "#!/usr/bin/env -S python3 -u" needs.
func envProgram(args []string) []string {
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "-S" || a == "--split-string":
			if i+1 < len(args) {
				return append(strings.Fields(args[i+1]), args[i+2:]...)
			}
			return nil
		case strings.HasPrefix(a, "-S"):
			return append(strings.Fields(a[2:]), args[i+1:]...)
		case a == "-u" || a == "--unset" || a == "-C" || a == "--chdir":
			i++ // takes a value
		case strings.HasPrefix(a, "-"):
		case strings.Contains(a, "="):
		default:
			return args[i:]
		}
	}
	return nil
}

// shebang returns the words of prog's #! line, nil when it has none.
func shebang(prog string) ([]string, error) {
	f, err := os.Open(prog)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	head := make([]byte, 256)
	n, _ := f.Read(head)
	head = head[:n]
	if !bytes.HasPrefix(head, []byte("#!")) {
		return nil, nil
	}
	line, _, _ := bytes.Cut(head[2:], []byte("\n"))
	words := strings.Fields(string(line))
	if len(words) == 0 {
		return nil, nil
	}
	return words, nil
}

// lookPath finds file as execvp would with PATH path; a name with a slash
// is taken as it is.
func lookPath(file, path string) (string, error) {
	if strings.Contains(file, "/") {
		return file, nil
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, file)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: not found in the model's PATH", file)
}

// ParseOutput reads Snippet's output: the version on its last line.
func ParseOutput(out []byte) (Version, error) {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	last := strings.TrimSpace(lines[len(lines)-1])
	if last == "" {
		return Version{}, errors.New("the interpreter printed nothing")
	}
	return Parse(last)
}
