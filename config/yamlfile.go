package config

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// readYAML parses a configuration file into the plain tree koanf takes
// (maps, lists, scalars) and the line of every key path in it. A syntax
// error is returned as err; problems within a well-formed file (a key set
// twice, a value that cannot be read) come back in problems, with the tree
// of everything else, so that they are reported with the rest.
//
// It walks yaml's node tree itself, rather than letting the YAML decoder
// build maps, for three reasons:
//   - the decoder checks a mapping's keys for duplicates pairwise, so a
//     100 000-entry env took about a minute; a Go map makes it linear;
//   - the decoder's errors quote the offending text ("cannot unmarshal !!str
//     `hf_abc...`"), which for a config symlinked to another file, or an
//     env value, prints what must not be printed; ours name the line;
//   - the lines let a problem name where it is without repeating the value.
func readYAML(data []byte) (tree map[string]any, lines lineIndex, problems []error, err error) {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, nil, nil, fmt.Errorf("parse config: %s", scrubYAMLError(err))
	}
	lines = lineIndex{}
	if doc.Kind == 0 || len(doc.Content) == 0 {
		return map[string]any{}, lines, nil, nil // empty, or only comments
	}
	root := doc.Content[0]
	if root.Kind == yaml.ScalarNode && root.Tag == "!!null" {
		return map[string]any{}, lines, nil, nil
	}
	if root.Kind != yaml.MappingNode {
		return nil, nil, nil, fmt.Errorf("parse config: line %d: the file must be a mapping of keys (listen:, gpu:, models: ...), not %s", root.Line, kindName(root))
	}
	w := &yamlWalker{lines: lines, budget: 16*len(data) + 10000}
	v, problems := w.value("", root, 0)
	tree, _ = v.(map[string]any)
	if tree == nil {
		tree = map[string]any{}
	}
	return tree, lines, problems, nil
}

// lineIndex maps a key path (models.mixtral.port, models.mixtral.args[0])
// to the line it is written on.
type lineIndex map[string]int

// maxDepth bounds nesting; the deepest real key is four levels down.
const maxDepth = 64

type yamlWalker struct {
	lines  lineIndex
	budget int // nodes left to build: aliases must not expand without bound
}

func (w *yamlWalker) value(path string, n *yaml.Node, depth int) (any, []error) {
	w.budget--
	if w.budget < 0 || depth > maxDepth {
		return nil, []error{errorf(keyOrTop(path), "too deeply nested or too many aliases (line %d)", n.Line)}
	}
	if path != "" {
		if _, ok := w.lines[path]; !ok {
			w.lines[path] = n.Line
		}
	}
	switch n.Kind {
	case yaml.AliasNode:
		return w.value(path, n.Alias, depth+1)
	case yaml.ScalarNode:
		var v any
		if err := n.Decode(&v); err != nil {
			// The decoder's message quotes the value: say where instead.
			return nil, []error{errorf(keyOrTop(path), "this %s value cannot be read (line %d)", strings.TrimPrefix(n.Tag, "!!"), n.Line)}
		}
		return v, nil
	case yaml.SequenceNode:
		out := make([]any, 0, len(n.Content))
		var errs []error
		for i, c := range n.Content {
			v, e := w.value(fmt.Sprintf("%s[%d]", path, i), c, depth+1)
			errs = append(errs, e...)
			out = append(out, v)
		}
		return out, errs
	case yaml.MappingNode:
		out := make(map[string]any, len(n.Content)/2)
		first := map[string]int{}
		var errs []error
		var merges []*yaml.Node
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, val := n.Content[i], n.Content[i+1]
			if k.Kind == yaml.ScalarNode && k.Tag == "!!merge" {
				merges = append(merges, val)
				continue
			}
			if k.Kind != yaml.ScalarNode {
				errs = append(errs, errorf(keyOrTop(path), "a key must be a plain word, not %s (line %d)", kindName(k), k.Line))
				continue
			}
			sub := join(path, k.Value)
			if line, dup := first[k.Value]; dup {
				errs = append(errs, errorf(sub, "set twice (lines %d and %d)", line, k.Line))
				continue
			}
			first[k.Value] = k.Line
			w.lines[sub] = k.Line
			v, e := w.value(sub, val, depth+1)
			errs = append(errs, e...)
			out[k.Value] = v
		}
		// "<<: *base" merges an anchored mapping: keys written here win.
		for _, m := range merges {
			srcs := []*yaml.Node{m}
			if m.Kind == yaml.SequenceNode {
				srcs = m.Content
			}
			for _, s := range srcs {
				v, e := w.value(path, s, depth+1)
				errs = append(errs, e...)
				mm, ok := v.(map[string]any)
				if !ok && len(e) == 0 {
					errs = append(errs, errorf(keyOrTop(path), "<< must merge a mapping (line %d)", s.Line))
				}
				for key, val := range mm {
					if _, set := out[key]; !set {
						out[key] = val
					}
				}
			}
		}
		return out, errs
	}
	return nil, []error{errorf(keyOrTop(path), "unexpected YAML node (line %d)", n.Line)}
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.SequenceNode:
		return "a list"
	case yaml.MappingNode:
		return "a mapping"
	case yaml.AliasNode:
		return "an alias"
	}
	return "a single value"
}

func keyOrTop(path string) string {
	if path == "" {
		return "(top level)"
	}
	return path
}

// quoted matches what YAML's messages quote: `text`, "text" and 'text'.
var quoted = regexp.MustCompile("`[^`]*`|\"[^\"]*\"|'[^']*'")

// scrubYAMLError keeps a YAML syntax error's line and explanation and drops
// any text it quotes from the file. Some parser messages quote a token
// ("found unknown escape character" does not, "did not find expected key"
// does not, but decoder errors quote whole values); keeping none is the
// rule that cannot leak. The punctuation they name (',' or ']') stays.
func scrubYAMLError(err error) string {
	msg := err.Error()
	var te *yaml.TypeError
	if errors.As(err, &te) {
		msg = strings.Join(te.Errors, "; ")
	}
	return quoted.ReplaceAllStringFunc(msg, func(q string) string {
		if len(q) == 3 { // a quoted punctuation character: ',' or ']'
			return q
		}
		return "(text not shown)"
	})
}

// plainKey is what a configuration key looks like. A key that does not is
// not echoed in a message: a file that is not a citadel configuration (a
// symlink to another file) would otherwise have its lines printed as
// "unknown key" errors, and a token pasted where a key goes (a mis-indented
// env: block) would be printed by --check and in the reload's errors.
// Tokens are made of the same characters as keys (hf_…, sk-…), so their
// shape is checked too (TokenShaped).
var plainKey = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// shownKey reports whether a key may be named in a message.
func shownKey(name string) bool { return plainKey.MatchString(name) && !TokenShaped(name) }

// safeKeyPath returns path with every segment that is not a plain key
// replaced by a mention of its line, for messages.
func safeKeyPath(path string, lines lineIndex) string {
	segs := splitPath(path)
	out := make([]string, 0, len(segs))
	for i, s := range segs {
		name, _ := parseSeg(s)
		if !shownKey(name) {
			// The key may itself hold dots: its line is under the longest
			// prefix of the path that was indexed.
			line := 0
			for j := len(segs); j > i && line == 0; j-- {
				line = lines[strings.Join(segs[:j], ".")]
			}
			out = append(out, "<key on line "+strconv.Itoa(line)+">")
			return strings.Join(out, ".")
		}
		out = append(out, s)
	}
	return strings.Join(out, ".")
}

// splitPath splits a key path at its dots. Keys never contain dots that
// reach here as separators: koanf splits on them too.
func splitPath(path string) []string { return strings.Split(path, ".") }

// parseSeg splits one path segment, "args[0]", into its key and indexes.
func parseSeg(s string) (string, []int) {
	j := strings.IndexByte(s, '[')
	if j < 0 {
		return s, nil
	}
	var idx []int
	for _, part := range strings.Split(strings.TrimSuffix(s[j+1:], "]"), "][") {
		n, err := strconv.Atoi(part)
		if err != nil {
			return s, nil
		}
		idx = append(idx, n)
	}
	return s[:j], idx
}

// lookup returns the value at path in a parsed tree, and whether the file
// sets it.
func lookup(tree map[string]any, path string) (any, bool) {
	var cur any = tree
	for _, s := range splitPath(path) {
		name, idx := parseSeg(s)
		m, ok := cur.(map[string]any)
		if !ok {
			return nil, false
		}
		if cur, ok = m[name]; !ok {
			return nil, false
		}
		for _, i := range idx {
			l, ok := cur.([]any)
			if !ok || i >= len(l) {
				return nil, false
			}
			cur = l[i]
		}
	}
	return cur, true
}

// prune deletes the key at path from the tree, so that decoding falls back
// to the default and every other problem can still be found. A problem
// inside a list drops the list's key: a half list would mean something else.
func prune(tree map[string]any, path string) {
	segs := splitPath(path)
	var cur any = tree
	for i, s := range segs {
		name, idx := parseSeg(s)
		m, ok := cur.(map[string]any)
		if !ok {
			return
		}
		if i == len(segs)-1 {
			delete(m, name)
			return
		}
		next, ok := m[name]
		if !ok {
			return
		}
		for _, j := range idx {
			l, ok := next.([]any)
			if !ok || j >= len(l) {
				return
			}
			next = l[j]
		}
		cur = next
	}
}
