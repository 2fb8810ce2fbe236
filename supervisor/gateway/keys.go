package gateway

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"
)

// Keys are the gateway's API keys: which token belongs to which NAME. Only
// a digest of each token is kept, so the tokens are never in a map that a
// debugger, a panic or a careless log line could print, and a lookup does
// not compare secrets byte by byte.
type Keys struct {
	byDigest map[[sha256.Size]byte]string
}

// minTokenLen refuses tokens short enough to guess.
const minTokenLen = 16

var keyName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$`)

// ErrKeysFileAccess: the keys file can be read by others than its owner.
var ErrKeysFileAccess = errors.New("readable or writable by group or others")

// LoadKeys reads an api_keys_file: one `NAME TOKEN` per line, `#` comments
// and blank lines ignored. The file must give no access to group or others
// (mode 0600 or 0400, owned by the daemon's user): only its owner and root
// can read it. Errors name the file and the line, never a token.
func LoadKeys(path string) (*Keys, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("api_keys_file: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("api_keys_file: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("api_keys_file %s: mode %04o is %w; chmod 0600 it", path, fi.Mode().Perm(), ErrKeysFileAccess)
	}
	k := &Keys{byDigest: map[[sha256.Size]byte]string{}}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 4096), 64*1024)
	var errs []error
	for n := 1; sc.Scan(); n++ {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 || line[0] == '#' {
			continue
		}
		fields := strings.Fields(string(line))
		switch {
		case len(fields) != 2:
			errs = append(errs, fmt.Errorf("api_keys_file %s:%d: want NAME TOKEN", path, n))
		case !keyName.MatchString(fields[0]):
			errs = append(errs, fmt.Errorf("api_keys_file %s:%d: NAME must be letters, digits, '_', '.', '@' or '-' (at most 64)", path, n))
		case len(fields[1]) < minTokenLen:
			errs = append(errs, fmt.Errorf("api_keys_file %s:%d: %s's token is shorter than %d characters", path, n, fields[0], minTokenLen))
		default:
			d := sha256.Sum256([]byte(fields[1]))
			if other, ok := k.byDigest[d]; ok {
				errs = append(errs, fmt.Errorf("api_keys_file %s:%d: %s has the same token as %s", path, n, fields[0], other))
				continue
			}
			k.byDigest[d] = fields[0]
		}
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, fmt.Errorf("api_keys_file %s: %w", path, err))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return k, nil
}

// Len is the number of keys.
func (k *Keys) Len() int { return len(k.byDigest) }

// lookup returns the NAME of the bearer token in an Authorization header.
func (k *Keys) lookup(authorization string) (string, bool) {
	scheme, token, ok := strings.Cut(authorization, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	name, ok := k.byDigest[sha256.Sum256([]byte(strings.TrimSpace(token)))]
	return name, ok
}

// Names lists the keys' NAMEs.
func (k *Keys) Names() []string {
	out := make([]string, 0, len(k.byDigest))
	for _, n := range k.byDigest {
		out = append(out, n)
	}
	return out
}
