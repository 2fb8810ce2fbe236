package config

import (
	"slices"
	"strings"
)

// Masked replaces a secret value wherever a command line is shown.
const Masked = "***"

// secretWords end a flag name that carries a secret: --api-key, --hf-token,
// --db-password, --client-secret, --openai-apikey. Whole words at the end,
// so --max-num-batched-tokens and --ssl-keyfile (a path) are left alone.
var secretWords = []string{"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"}

// SecretFlag reports whether a command-line flag (--api-key, --hf_token)
// carries a secret by its name.
func SecretFlag(flag string) bool {
	name := strings.ToLower(strings.TrimLeft(flag, "-"))
	if name == "" || name == flag {
		return false // not a flag
	}
	for _, w := range secretWords {
		switch {
		case name == w, strings.HasSuffix(name, "-"+w), strings.HasSuffix(name, "_"+w):
			return true
		case w != "key" && w != "token" && strings.HasSuffix(name, w):
			// Glued words (--apikey, --dbpassword) count, except key and
			// token, which end ordinary words too.
			return true
		}
	}
	return false
}

// MaskArgs returns a copy of a command line with the values of secret
// flags replaced by Masked: "--api-key X" and "--api-key=X" both become
// masked. The daemon logs argv this way; vLLM's own start-up banner is
// the model's output and is not rewritten (pass secrets in env_files).
func MaskArgs(argv []string) []string {
	out := slices.Clone(argv)
	for i := 0; i < len(out); i++ {
		a := out[i]
		if !strings.HasPrefix(a, "-") {
			continue
		}
		if flag, _, ok := strings.Cut(a, "="); ok {
			if SecretFlag(flag) {
				out[i] = flag + "=" + Masked
			}
			continue
		}
		if SecretFlag(a) && i+1 < len(out) && !strings.HasPrefix(out[i+1], "--") {
			i++
			out[i] = Masked
		}
	}
	return out
}
