package config

import (
	"math"
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

// tokenPrefixes start the API tokens operators handle: Hugging Face (hf_),
// OpenAI and compatible servers (sk-, sk_), GitHub (ghp_, gho_, ghs_,
// github_pat_), GitLab (glpat-), Slack (xoxb-, xoxp-), AWS access keys
// (AKIA). After one, a long enough rest is a token whatever it looks like.
var tokenPrefixes = []string{"hf_", "sk-", "sk_", "ghp_", "gho_", "ghs_", "github_pat_", "glpat-", "xoxb-", "xoxp-", "AKIA"}

// TokenShaped reports whether s looks like a secret token rather than a
// name: a known token prefix followed by 12 or more characters; or a run of
// letters and digits of 16 or more that mixes cases or letters and digits
// the way random text does (names are words: tensor_parallel,
// mixtral-8x7b-instruct, VLLM_CACHE_ROOT); or 24 or more such characters
// with the entropy of random text. Used to keep tokens pasted where a key
// goes out of error messages; a name it takes for a token is only shown
// by its line.
func TokenShaped(s string) bool {
	for _, p := range tokenPrefixes {
		if rest, ok := strings.CutPrefix(s, p); ok && len(rest) >= 12 {
			return true
		}
	}
	for _, run := range strings.FieldsFunc(s, func(r rune) bool { return r == '_' || r == '-' || r == '.' }) {
		if len(run) >= 16 && classes(run) >= 2 && !oneCase(run) {
			return true
		}
		if len(run) >= 16 && classes(run) >= 2 && digits(run) >= 4 {
			return true
		}
		if len(run) >= 24 && entropy(run) >= 3.5 {
			return true
		}
	}
	return false
}

// classes counts the kinds of characters in s: lower case, upper case,
// digits.
func classes(s string) int {
	var lower, upper, digit int
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z':
			lower = 1
		case r >= 'A' && r <= 'Z':
			upper = 1
		case r >= '0' && r <= '9':
			digit = 1
		}
	}
	return lower + upper + digit
}

// oneCase: s has letters of one case only (VLLMCACHEROOT, instruct).
func oneCase(s string) bool { return s == strings.ToLower(s) || s == strings.ToUpper(s) }

func digits(s string) int {
	n := 0
	for _, r := range s {
		if r >= '0' && r <= '9' {
			n++
		}
	}
	return n
}

// entropy is the Shannon entropy of s's characters, in bits per character.
func entropy(s string) float64 {
	var count [256]int
	for i := 0; i < len(s); i++ {
		count[s[i]]++
	}
	h := 0.0
	for _, c := range count {
		if c > 0 {
			p := float64(c) / float64(len(s))
			h -= p * math.Log2(p)
		}
	}
	return h
}
