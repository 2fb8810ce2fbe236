// Package vllm is what the supervisor knows of vLLM itself, version by
// version: which of the features it drives exist in a given release (the
// table of docs/vllm.md), how to learn the release an interpreter would
// run without importing vllm, and the memory arithmetic --check uses to
// say whether a model's max_model_len fits its KV cache. It imports
// nothing of this project.
package vllm

import (
	"fmt"
	"strconv"
	"strings"
)

// Version is a vLLM release as its package metadata or GET /version spells
// it: 0.10.1, 0.10.1.post1, 0.11.0rc2, 0.7.2.dev185+g1234abcd.
type Version struct {
	Major, Minor, Patch int
	// Pre is set for a pre-release (devN, rcN, aN, bN): it comes before
	// Major.Minor.Patch, so a feature of that release is not assumed.
	Pre string
	raw string
}

// Parse reads a PEP 440 version as vLLM publishes them. Only the release
// numbers and whether it is a pre-release matter here; a local part
// (+cu121, +g1234abcd) and a post-release are ignored.
func Parse(s string) (Version, error) {
	v := Version{raw: strings.TrimSpace(s)}
	rest := strings.TrimPrefix(v.raw, "v")
	if i := strings.IndexByte(rest, '+'); i >= 0 {
		rest = rest[:i]
	}
	if rest == "" {
		return Version{}, fmt.Errorf("vLLM version %q: empty", s)
	}
	nums := make([]int, 0, 3)
	i := 0
	for len(nums) < 3 {
		j := i
		for j < len(rest) && rest[j] >= '0' && rest[j] <= '9' {
			j++
		}
		if j == i {
			break
		}
		n, err := strconv.Atoi(rest[i:j])
		if err != nil {
			return Version{}, fmt.Errorf("vLLM version %q: %w", s, err)
		}
		nums = append(nums, n)
		i = j
		if i < len(rest) && rest[i] == '.' && i+1 < len(rest) && rest[i+1] >= '0' && rest[i+1] <= '9' {
			i++
			continue
		}
		break
	}
	if len(nums) < 2 {
		return Version{}, fmt.Errorf("vLLM version %q: not MAJOR.MINOR[.PATCH]", s)
	}
	nums = append(nums, 0)
	v.Major, v.Minor, v.Patch = nums[0], nums[1], nums[2]
	suffix := strings.TrimPrefix(strings.ToLower(rest[i:]), ".")
	switch {
	case suffix == "", strings.HasPrefix(suffix, "post"):
	case strings.HasPrefix(suffix, "dev"), strings.HasPrefix(suffix, "rc"),
		strings.HasPrefix(suffix, "a"), strings.HasPrefix(suffix, "b"):
		v.Pre = suffix
	default:
		return Version{}, fmt.Errorf("vLLM version %q: unknown suffix %q", s, suffix)
	}
	return v, nil
}

// MustParse is Parse for versions written in this package's tables.
func MustParse(s string) Version {
	v, err := Parse(s)
	if err != nil {
		panic(err)
	}
	return v
}

// String is the version as it was written.
func (v Version) String() string {
	if v.raw != "" {
		return v.raw
	}
	if v.IsZero() {
		return ""
	}
	return fmt.Sprintf("%d.%d.%d", v.Major, v.Minor, v.Patch)
}

// IsZero reports whether v is no version (not learned).
func (v Version) IsZero() bool { return v == Version{} }

// Compare orders versions: -1 when v is older than w, 0 the same release,
// +1 newer. A pre-release comes before its release.
func (v Version) Compare(w Version) int {
	for _, d := range [][2]int{{v.Major, w.Major}, {v.Minor, w.Minor}, {v.Patch, w.Patch}} {
		if d[0] != d[1] {
			if d[0] < d[1] {
				return -1
			}
			return 1
		}
	}
	switch {
	case v.Pre == w.Pre:
		return 0
	case v.Pre != "" && w.Pre == "":
		return -1
	case v.Pre == "" && w.Pre != "":
		return 1
	}
	return strings.Compare(v.Pre, w.Pre)
}

// AtLeast reports whether v is release w or newer. A pre-release of w is
// not: a feature is used only where its release is known to have it.
func (v Version) AtLeast(w Version) bool { return v.Compare(w) >= 0 }
