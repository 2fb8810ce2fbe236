package config

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/go-viper/mapstructure/v2"
	"github.com/knadh/koanf/providers/confmap"
	"github.com/knadh/koanf/providers/env/v2"
	"github.com/knadh/koanf/v2"
)

// EnvPrefix starts every environment variable that overrides a top-level key:
// CITADEL_LISTEN, CITADEL_CONTROL_SOCKET, CITADEL_LOG_LEVEL, CITADEL_GPU_BACKEND …
const EnvPrefix = "CITADEL_"

// envKeys are the keys an environment variable may override. Models are
// deliberately absent: a model's settings live in the file, where a reload
// sees them, not in the daemon's environment, which a reload cannot change.
var envKeys = []string{
	"listen", "control_socket", "control_socket_group", "control_socket_read_group", "log.level", "log.format", "log.model_dir",
	"gpu.backend", "gpu.headroom", "gpu.release_timeout", "gpu.visible_devices", "gpu.sim.state_file", "cache_dir",
	"gateway.listen", "gateway.api_keys_file",
}

// Load reads the YAML file at path, applies CITADEL_* overrides from environ
// (pass os.Environ()), merges defaults into each model and validates the
// result. The error, when not nil, lists every problem, one per line, each
// starting with its key path.
func Load(path string, environ []string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(data, environ)
}

// Parse is Load for a configuration already in memory.
//
// Every problem is found in one pass: a value of the wrong shape (an unknown
// key, a bad duration) is reported and dropped, the rest is decoded with the
// defaults in its place, and validated; problems a bad value caused are not
// reported twice. A problem every model inherits from `defaults:` is
// reported once, under defaults.
func Parse(data []byte, environ []string) (*Config, error) {
	raw, lines, shape, err := readYAML(data)
	if err != nil {
		return nil, err
	}

	// Check the file's shape first, so every unknown key and wrongly typed
	// value is reported with its path before decoding could stop at one.
	checkTree("", raw, reflect.TypeFor[fileShape](), &shape)
	names := modelNames(raw, &shape)
	for _, e := range shape {
		prune(raw, errKey(e))
	}

	file := koanf.New(".")
	if err := file.Load(confmap.Provider(raw, ""), nil); err != nil {
		return nil, fmt.Errorf("load config: %w", err)
	}
	top := koanf.New(".")
	if err := top.Load(confmap.Provider(builtin(), "."), nil); err != nil {
		return nil, fmt.Errorf("load built-in defaults: %w", err)
	}
	rest := file.Copy()
	rest.Delete("defaults")
	rest.Delete("models")
	if err := top.Merge(rest); err != nil {
		return nil, fmt.Errorf("merge config: %w", err)
	}
	if err := top.Load(env.Provider(".", env.Opt{Prefix: EnvPrefix, TransformFunc: envKey, EnvironFunc: func() []string { return environ }}), nil); err != nil {
		return nil, fmt.Errorf("read %s* environment: %w", EnvPrefix, err)
	}

	var errs []error
	cfg := &Config{file: raw}
	if err := decode(top, cfg); err != nil {
		errs = append(errs, err)
	}
	cfg.CacheDir = resolveCacheDir(cfg.CacheDir, environ)
	ephemeral := localPortRange()
	for _, name := range names {
		m, err := loadModel(file, name)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		m.DerivedVLLMPort = DefaultVLLMPort(m.Port, ephemeral)
		m.CacheRoot = filepath.Join(cfg.CacheDir, "vllm", m.Name)
		cfg.Models = append(cfg.Models, m)
	}
	for _, p := range cfg.attribute(cfg.problems()) {
		if !coveredBy(errKey(p), shape) {
			errs = append(errs, p)
		}
	}
	for _, e := range shape {
		errs = append(errs, withLine(e, lines))
	}
	if len(errs) > 0 {
		for i, e := range errs {
			errs[i] = safeError(e, lines)
		}
		return nil, joinSorted(errs)
	}
	return cfg, nil
}

// attribute reports a model's problem under defaults when the model does
// not set the key itself and so inherits it from `defaults:`: a mistake
// there is one mistake, at the key the operator wrote, not one per model
// under keys nobody wrote. Identical problems are reported once.
func (c *Config) attribute(problems []error) []error {
	seen := map[string]bool{}
	var out []error
	for _, p := range problems {
		var e *Error
		if errors.As(p, &e) {
			if sub, ok := c.inherited(e.Key); ok && c.fileSets("defaults."+sub) {
				p = &Error{Key: "defaults." + sub, Msg: e.Msg}
			}
		}
		if text := p.Error(); !seen[text] {
			seen[text] = true
			out = append(out, p)
		}
	}
	return out
}

// inherited reports whether key (models.NAME.SUB) names a value the model
// does not set itself, and returns SUB.
func (c *Config) inherited(key string) (string, bool) {
	rest, ok := strings.CutPrefix(key, "models.")
	if !ok {
		return "", false
	}
	name, sub, ok := strings.Cut(rest, ".")
	if !ok {
		return "", false
	}
	if field, _ := parseSeg(splitPath(sub)[0]); modelOnlyKeys[field] {
		return "", false
	}
	if c.fileSets("models." + name + "." + sub) {
		return "", false
	}
	return sub, true
}

// fileSets reports whether the file writes the key; for an element of a
// list (args[1]), whether it writes the list: lists replace, maps merge.
func (c *Config) fileSets(key string) bool {
	if i := strings.LastIndexByte(key, '['); i >= 0 && !strings.Contains(key[i:], ".") {
		key = key[:i]
		for strings.HasSuffix(key, "]") {
			key = key[:strings.LastIndexByte(key, '[')]
		}
	}
	_, ok := lookup(c.file, key)
	return ok
}

// coveredBy reports whether a problem at key follows from a shape problem
// already reported: the same key or one inside it.
func coveredBy(key string, shape []error) bool {
	for _, s := range shape {
		k := errKey(s)
		base, _ := parseSeg(k)
		if key == k || strings.HasPrefix(key, k+".") || strings.HasPrefix(key, k+"[") || strings.HasPrefix(key, base+"[") || key == base {
			return true
		}
	}
	return false
}

// withLine adds the line a shape problem is on: the message does not repeat
// the value, so the line is how the operator finds it.
func withLine(err error, lines lineIndex) error {
	var e *Error
	if errors.As(err, &e) {
		line, ok := lines[e.Key]
		if !ok || line == 0 || strings.Contains(e.Msg, "(line") {
			return err
		}
		// At the end, so a message still starts with what is wrong
		// ("unknown key"), and before a hint: (line 4; did you mean "delay"?).
		if msg, hint, found := strings.Cut(e.Msg, " (did you mean "); found {
			return &Error{Key: e.Key, Msg: fmt.Sprintf("%s (line %d; did you mean %s", msg, line, hint)}
		}
		return &Error{Key: e.Key, Msg: fmt.Sprintf("%s (line %d)", e.Msg, line)}
	}
	return err
}

// safeError keeps a key path that is not made of plain keys out of the
// message (see plainKey).
func safeError(err error, lines lineIndex) error {
	var e *Error
	if errors.As(err, &e) {
		return &Error{Key: safeKeyPath(e.Key, lines), Msg: e.Msg}
	}
	return err
}

// fileShape is the layout of the YAML file, for checkTree.
type fileShape struct {
	Listen        string           `koanf:"listen"`
	ControlSocket string           `koanf:"control_socket"`
	ControlGroup  string           `koanf:"control_socket_group"`
	ControlRead   string           `koanf:"control_socket_read_group"`
	Log           Log              `koanf:"log"`
	GPU           GPU              `koanf:"gpu"`
	Gateway       Gateway          `koanf:"gateway"`
	SleepHost     ByteSize         `koanf:"sleep_host_memory"`
	CacheDir      string           `koanf:"cache_dir"`
	Defaults      Model            `koanf:"defaults"`
	Models        map[string]Model `koanf:"models"`
}

func loadModel(file *koanf.Koanf, name string) (Model, error) {
	k := koanf.New(".")
	if err := k.Load(confmap.Provider(builtinModel(), "."), nil); err != nil {
		return Model{}, fmt.Errorf("models.%s: load built-in defaults: %w", name, err)
	}
	// Merge replaces lists and merges maps, so a model's args replace the
	// defaults' args while its env adds to the defaults' env.
	if err := k.Merge(file.Cut("defaults")); err != nil {
		return Model{}, fmt.Errorf("models.%s: merge defaults: %w", name, err)
	}
	if err := k.Merge(file.Cut("models." + name)); err != nil {
		return Model{}, fmt.Errorf("models.%s: merge: %w", name, err)
	}
	var m Model
	if err := decode(k, &m); err != nil {
		return Model{}, fmt.Errorf("models.%s: %w", name, err)
	}
	m.Name = name
	if m.ServedName == "" {
		m.ServedName = name
	}
	return m, nil
}

func decode(k *koanf.Koanf, out any) error {
	return k.UnmarshalWithConf("", out, koanf.UnmarshalConf{
		DecoderConfig: &mapstructure.DecoderConfig{
			DecodeHook: mapstructure.ComposeDecodeHookFunc(
				mapstructure.StringToTimeDurationHookFunc(),
				mapstructure.TextUnmarshallerHookFunc(),
				scalarToStringHook,
			),
			TagName: "koanf",
		},
	})
}

// scalarToStringHook lets a string be written as a plain YAML number or
// boolean: a pin as a bare index (gpus: [0, 1]), a flag's value unquoted
// (args: [--max-num-seqs, 256]), an env value as 1.
func scalarToStringHook(from, to reflect.Type, v any) (any, error) {
	if to.Kind() != reflect.String {
		return v, nil
	}
	switch x := v.(type) {
	case int:
		return strconv.Itoa(x), nil
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64), nil
	case bool:
		return strconv.FormatBool(x), nil
	}
	return v, nil
}

// Getenv returns key's value in environ (KEY=VALUE entries), or def when it
// is unset or empty. The binaries take their environment as a parameter, so
// tests can pass their own.
func Getenv(environ []string, key, def string) string {
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok && k == key && v != "" {
			return v
		}
	}
	return def
}

// envKey maps CITADEL_LOG_LEVEL to log.level; other variables are ignored
// (CITADEL_CONFIG and CITADEL_SOCKET name files, not keys).
func envKey(k, v string) (string, any) {
	name := strings.ToLower(strings.TrimPrefix(k, EnvPrefix))
	for _, key := range envKeys {
		if strings.ReplaceAll(key, ".", "_") == name {
			return key, v
		}
	}
	return "", nil
}

// modelNames returns the file's model names, sorted, reporting bad ones.
func modelNames(raw map[string]any, errs *[]error) []string {
	models, _ := raw["models"].(map[string]any)
	names := make([]string, 0, len(models))
	for name := range models {
		if msg := checkModelName(name); msg != "" {
			*errs = append(*errs, &Error{Key: "models." + name, Msg: msg})
			continue
		}
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

func checkModelName(name string) string {
	if name == "all" {
		return `"all" is reserved for citadelctl; rename the model`
	}
	if name == "" || len(name) > 64 {
		return "model name must be 1 to 64 characters"
	}
	for i, r := range name {
		ok := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || (i > 0 && (r == '-' || r == '_'))
		if !ok {
			return "model name may use letters, digits, '-' and '_' and must start with a letter or digit"
		}
	}
	return ""
}

// Error is one configuration problem at one key path.
type Error struct {
	Key string // e.g. models.mixtral.port
	Msg string
}

func (e *Error) Error() string { return e.Key + ": " + e.Msg }

func errorf(key, format string, args ...any) error {
	return &Error{Key: key, Msg: fmt.Sprintf(format, args...)}
}

// joinSorted joins errors ordered by key path so output is stable.
func joinSorted(errs []error) error {
	slices.SortStableFunc(errs, func(a, b error) int {
		return strings.Compare(errKey(a), errKey(b))
	})
	return errors.Join(errs...)
}

func errKey(err error) string {
	var e *Error
	if errors.As(err, &e) {
		return e.Key
	}
	return err.Error()
}
