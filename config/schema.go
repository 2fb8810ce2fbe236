package config

import (
	"fmt"
	"reflect"
	"strings"
	"time"
)

var (
	durationType = reflect.TypeFor[time.Duration]()
	sizeType     = reflect.TypeFor[ByteSize]()
	gpuRefType   = reflect.TypeFor[GPURef]()
	modelType    = reflect.TypeFor[Model]()
)

// checkTree walks a parsed YAML value against the Go type it will decode
// into and reports, with its key path, every unknown key and every value of
// the wrong kind. Decoding would stop at the first such problem; an operator
// fixing a file wants all of them at once.
func checkTree(path string, v any, t reflect.Type, errs *[]error) {
	if v == nil {
		return // an empty key ("env:") keeps the default
	}
	add := func(format string, args ...any) { *errs = append(*errs, errorf(path, format, args...)) }
	switch t {
	case durationType:
		switch x := v.(type) {
		case string:
			if _, err := time.ParseDuration(x); err != nil {
				add("not a duration: write it like 30s, 5m or 1h")
			}
		case int:
			if x != 0 {
				add("%d has no unit: write a duration such as %ds", x, x)
			}
		default:
			add("expected a duration such as 30s, got %s", describe(v))
		}
		return
	case sizeType:
		switch x := v.(type) {
		case string:
			if _, err := ParseByteSize(x); err != nil {
				add("not a size: use a number with KiB, MiB, GiB or TiB, e.g. 1GiB")
			}
		case int:
			if x < 0 {
				add("size must not be negative")
			}
		default:
			add("expected a size such as 1GiB, got %s", describe(v))
		}
		return
	case gpuRefType:
		switch x := v.(type) {
		case string:
		case int:
			if x < 0 {
				add("GPU index must not be negative")
			}
		default:
			add("expected a GPU index or UUID, got %s", describe(v))
		}
		return
	}

	switch t.Kind() {
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			add("expected a mapping, got %s", describe(v))
			return
		}
		fields := structFields(t)
		for key, val := range m {
			sub := join(path, key)
			ft, ok := fields[key]
			if !ok {
				*errs = append(*errs, errorf(sub, "unknown key%s", hint(key, fields)))
				continue
			}
			if path == "defaults" && t == modelType && modelOnlyKeys[key] {
				*errs = append(*errs, errorf(sub, "belongs to one model: set it under models.<name>.%s", key))
				continue
			}
			checkTree(sub, val, ft, errs)
		}
	case reflect.Map:
		m, ok := v.(map[string]any)
		if !ok {
			add("expected a mapping, got %s", describe(v))
			return
		}
		for key, val := range m {
			checkTree(join(path, key), val, t.Elem(), errs)
		}
	case reflect.Slice:
		s, ok := v.([]any)
		if !ok {
			add("expected a list, got %s", describe(v))
			return
		}
		for i, val := range s {
			checkTree(fmt.Sprintf("%s[%d]", path, i), val, t.Elem(), errs)
		}
	case reflect.String:
		switch v.(type) {
		case string, int, float64, bool: // args: [--max-num-seqs, 256] reads naturally
		default:
			add("expected a string, got %s", describe(v))
		}
	case reflect.Int:
		if _, ok := v.(int); !ok {
			add("expected a whole number, got %s", describe(v))
		}
	case reflect.Float64:
		switch v.(type) {
		case int, float64:
		default:
			add("expected a number, got %s", describe(v))
		}
	case reflect.Bool:
		if _, ok := v.(bool); !ok {
			add("expected true or false, got %s", describe(v))
		}
	default:
		add("internal: no shape check for %s", t)
	}
}

// structFields maps a struct's koanf tags to field types.
func structFields(t reflect.Type) map[string]reflect.Type {
	out := make(map[string]reflect.Type, t.NumField())
	for i := range t.NumField() {
		f := t.Field(i)
		tag := f.Tag.Get("koanf")
		if tag == "" || tag == "-" {
			continue
		}
		out[tag] = f.Type
	}
	return out
}

// hint suggests the known key that differs from key by one edit or case.
func hint(key string, fields map[string]reflect.Type) string {
	for k := range fields {
		if strings.EqualFold(k, key) || strings.ReplaceAll(k, "_", "") == strings.ReplaceAll(strings.ToLower(key), "-", "") || oneEdit(k, key) {
			return fmt.Sprintf(" (did you mean %q?)", k)
		}
	}
	return ""
}

// oneEdit reports whether a and b differ by one insertion, deletion,
// substitution or swap of neighbours.
func oneEdit(a, b string) bool {
	if len(a) < len(b) {
		a, b = b, a
	}
	if len(a)-len(b) > 1 || a == b {
		return false
	}
	i := 0
	for i < len(b) && a[i] == b[i] {
		i++
	}
	if len(a) == len(b) {
		swapped := i+1 < len(a) && a[i] == b[i+1] && a[i+1] == b[i] && a[i+2:] == b[i+2:]
		return a[i+1:] == b[i+1:] || swapped
	}
	return a[i+1:] == b[i:]
}

// describe names a value's kind, never the value: it may be a secret (an
// env value, a token in args) or a line of a file that is not a config.
func describe(v any) string {
	switch x := v.(type) {
	case string:
		return "a string"
	case map[string]any:
		return "a mapping"
	case []any:
		return "a list"
	default:
		return fmt.Sprintf("%v", x)
	}
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}
