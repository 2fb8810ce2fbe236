package supervisor

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"regexp"
	"strings"
)

var envKeyRe = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// readEnvFile parses a KEY=VALUE file of secrets (HF_TOKEN and the like), the
// format of systemd's EnvironmentFile: blank lines and # comments are
// skipped, "export " is allowed, and one pair of matching outer quotes is
// removed from a value.
//
// The values are secrets. An error names the file and the line number, never
// the line's text, so a typo in a token cannot leak through a log or status.
// (General .env parsers quote the offending text in their errors, which is
// why this small parser is ours.)
func readEnvFile(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("env_files: %w", err)
	}
	out := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for n := 1; sc.Scan(); n++ {
		// execve takes NUL-terminated strings: a NUL in a value would fail
		// the spawn ("invalid argument") and mark the model failed. Said
		// here, the model waits as pending, naming the file and line.
		if strings.IndexByte(sc.Text(), 0) >= 0 {
			return nil, fmt.Errorf("env_files: %s line %d: contains a NUL byte, which an environment variable cannot hold", path, n)
		}
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";") {
			continue
		}
		line = strings.TrimPrefix(line, "export ")
		k, v, ok := strings.Cut(line, "=")
		k = strings.TrimSpace(k)
		if !ok || !envKeyRe.MatchString(k) {
			return nil, fmt.Errorf("env_files: %s line %d: expected KEY=VALUE", path, n)
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && (v[0] == '"' || v[0] == '\'') && v[len(v)-1] == v[0] {
			v = v[1 : len(v)-1]
		}
		out[k] = v
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("env_files: %s: %w", path, err)
	}
	return out, nil
}

// envDigest fingerprints env file contents so a reload can tell whether a
// secret changed without keeping or comparing the secret itself in the open.
func envDigest(vars map[string]string) string {
	h := sha256.New()
	for _, k := range sortedKeys(vars) {
		fmt.Fprintf(h, "%s=%s\x00", k, vars[k])
	}
	return fmt.Sprintf("%x", h.Sum(nil))
}

// envFilesChanged reports whether the contents of files now differ from
// those fingerprinted by digest (what a process was started with). A file
// that cannot be read is an error, not a change.
func envFilesChanged(files []string, digest string) (bool, error) {
	secrets, err := loadEnvFiles(files)
	if err != nil {
		return false, err
	}
	return envDigest(secrets) != digest, nil
}

// EnvFileKeys lists the variables an env file sets, never their values.
// For `citadel-supervisor --check`.
func EnvFileKeys(path string) ([]string, error) {
	vars, err := readEnvFile(path)
	if err != nil {
		return nil, err
	}
	return sortedKeys(vars), nil
}

// CheckEnvFile reads an env file the way a start does and says what would
// keep a model pending, naming the file and line, never a value. For
// `citadel-supervisor --check`.
func CheckEnvFile(path string) error {
	_, err := readEnvFile(path)
	return err
}
