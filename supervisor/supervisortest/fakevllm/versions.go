package fakevllm

import (
	"bufio"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// fake-vllm plays one vLLM release at a time (--fake-vllm-version X.Y.Z,
// else the version in package-style metadata next to it, else
// defaultVersion), with the behaviours of that release the supervisor
// meets. Each is vLLM's own, as docs/vllm.md cites it; the releases are
// written out here rather than taken from package vllm, so a wrong belief
// there is not copied into the stand-in that tests it.
//
//   - CUDA_VISIBLE_DEVICES: before 0.24.0 vLLM calls int() on every entry
//     and dies at start on a GPU UUID (vllm#13815, fixed by vllm#45026).
//   - --enable-sleep-mode: unknown before 0.7.0 (vllm#11743): argparse
//     exits 2. POST /sleep and /wake_up from 0.7.3, GET /is_sleeping from
//     0.8.0 (vllm#14312), wake_up tags from 0.8.3 (vllm#15500; before, the
//     query is ignored and everything wakes), POST /collective_rpc from
//     0.10.2 (vllm#23075). Earlier, those routes are 404.
//   - GET /version (every release since 0.4.0, vllm#3161).
//   - --api-key / VLLM_API_KEY: every /v1 route wants Authorization:
//     Bearer KEY, else 401 {"error": "Unauthorized"}; /health, /version
//     and /metrics do not.
//   - --disable-log-stats: /metrics has no vllm:* series.
//   - Error bodies nested {"error": {...}} from 0.10.1 (vllm#22099), flat
//     {"object": "error", ...} before.
//   - Chat streams start with a chunk carrying the role; with
//     stream_options.include_usage the last chunk before [DONE] has empty
//     choices and the usage (vllm#5135, #5319).
//   - /v1/embeddings answers encoding_format "base64" with little-endian
//     float32 bytes, base64-encoded (vllm#5935), as the OpenAI SDK asks by
//     default.
//   - While loading, the port is bound but not listening: connections are
//     refused (vLLM binds before loading and listens after, vllm#8204),
//     with or without --fake-bind-early.
//   - Once loaded, before it listens, it prints what vLLM and uvicorn
//     print then: "Starting vLLM API server on http://HOST:PORT" ("… API
//     server 0 on …" from 0.10, inferred from logs of those releases),
//     then uvicorn's "Application startup complete." on stderr.

// defaultVersion is the release a fake-vllm plays when nothing says which.
const defaultVersion = "0.33.0"

// release is a vLLM version as the fake compares them.
type release struct{ major, minor, patch int }

func parseRelease(s string) (release, error) {
	s = strings.TrimPrefix(strings.TrimSpace(s), "v")
	if i := strings.IndexByte(s, '+'); i >= 0 {
		s = s[:i]
	}
	parts := strings.SplitN(s, ".", 4)
	if len(parts) < 2 {
		return release{}, fmt.Errorf("vLLM version %q: not X.Y.Z", s)
	}
	var n [3]int
	for i := 0; i < 3 && i < len(parts); i++ {
		j := 0
		for j < len(parts[i]) && parts[i][j] >= '0' && parts[i][j] <= '9' {
			j++
		}
		if j == 0 {
			if i < 2 {
				return release{}, fmt.Errorf("vLLM version %q: not X.Y.Z", s)
			}
			break
		}
		n[i], _ = strconv.Atoi(parts[i][:j])
		if j < len(parts[i]) {
			break // a pre-release suffix (rc1, dev2)
		}
	}
	return release{n[0], n[1], n[2]}, nil
}

// atLeast reports whether r is the release s or newer.
func (r release) atLeast(s string) bool {
	o, err := parseRelease(s)
	if err != nil {
		panic(err)
	}
	switch {
	case r.major != o.major:
		return r.major > o.major
	case r.minor != o.minor:
		return r.minor > o.minor
	}
	return r.patch >= o.patch
}

func (r release) String() string { return fmt.Sprintf("%d.%d.%d", r.major, r.minor, r.patch) }

// metadataVersion finds vllm's package metadata (vllm-X.Y.Z.dist-info/
// METADATA) the way an interpreter's sys.path would: in PYTHONPATH, then
// in the virtualenv around argv0 (<venv>/bin/python →
// <venv>/lib/python*/site-packages).
func metadataVersion(argv0 string) (string, bool) {
	var dirs []string
	for _, d := range filepath.SplitList(os.Getenv("PYTHONPATH")) {
		if d != "" {
			dirs = append(dirs, d)
		}
	}
	venv := filepath.Dir(filepath.Dir(argv0))
	if m, _ := filepath.Glob(filepath.Join(venv, "lib", "python*", "site-packages")); len(m) > 0 {
		dirs = append(dirs, m...)
	}
	for _, d := range dirs {
		infos, _ := filepath.Glob(filepath.Join(d, "vllm-*.dist-info", "METADATA"))
		for _, p := range infos {
			if v, ok := readMetadataVersion(p); ok {
				return v, true
			}
		}
	}
	return "", false
}

func readMetadataVersion(path string) (string, bool) {
	f, err := os.Open(path)
	if err != nil {
		return "", false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "Version: "); ok {
			return strings.TrimSpace(v), true
		}
	}
	return "", false
}

// asInterpreter plays `python -c CODE` when fake-vllm is run as its
// model's interpreter (a link named python in a fake virtualenv): the
// daemon reads the vLLM version that way before a spawn. It prints what
// importlib.metadata.version("vllm") would, or fails as Python does.
func asInterpreter(code string) int {
	if !strings.Contains(code, "importlib.metadata") || !strings.Contains(code, "vllm") {
		fmt.Fprintf(os.Stderr, "fake-vllm as python: only the vLLM version lookup is played, not %q\n", code)
		return 2
	}
	if v, ok := metadataVersion(os.Args[0]); ok {
		fmt.Println(v)
		return 0
	}
	fmt.Fprintln(os.Stderr, "Traceback (most recent call last):")
	fmt.Fprintln(os.Stderr, "importlib.metadata.PackageNotFoundError: No package metadata was found for vllm")
	return 1
}

// checkVisibleDevices dies as vLLM before 0.24 does at start on a
// non-integer CUDA_VISIBLE_DEVICES entry (vllm#13815, #20939, #41848).
func checkVisibleDevices(v release) (string, bool) {
	if v.atLeast("0.24.0") {
		return "", true
	}
	for _, e := range strings.Split(os.Getenv("CUDA_VISIBLE_DEVICES"), ",") {
		if e = strings.TrimSpace(e); e == "" {
			continue
		}
		if _, err := strconv.Atoi(e); err != nil {
			return fmt.Sprintf("Traceback (most recent call last):\n"+
				"  File \"vllm/platforms/interface.py\", line 215, in device_id_to_physical_device_id\n"+
				"    return int(physical_device_id)\n"+
				"ValueError: invalid literal for int() with base 10: '%s'\n", e), false
		}
	}
	return "", true
}

// gate answers, in the release played, what the routes below it do not
// model: an API key on /v1, and the development routes a release lacks.
func gate(o *options, next http.Handler) http.Handler {
	v := o.release
	missing := map[string]string{
		"/sleep": "0.7.3", "/wake_up": "0.7.3", "/is_sleeping": "0.8.0", "/collective_rpc": "0.10.2",
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if since, ok := missing[r.URL.Path]; ok && !v.atLeast(since) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			fmt.Fprint(w, `{"detail":"Not Found"}`)
			return
		}
		if r.URL.Path == "/wake_up" && !v.atLeast("0.8.3") && r.URL.RawQuery != "" {
			r.URL.RawQuery = "" // no tags before 0.8.3: everything wakes
		}
		if len(o.apiKeys) > 0 && (r.URL.Path == "/v1" || strings.HasPrefix(r.URL.Path, "/v1/")) && r.Method != http.MethodOptions {
			ok := false
			for _, k := range o.apiKeys {
				if r.Header.Get("Authorization") == "Bearer "+k {
					ok = true
				}
			}
			if !ok {
				o.stats.unauthorized.Add(1)
				writeJSONStatus(w, http.StatusUnauthorized, map[string]string{"error": "Unauthorized"})
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

func writeJSONStatus(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	writeJSONBody(w, v)
}

// base64Embedding encodes an embedding as vLLM does for encoding_format
// "base64": little-endian float32, base64.
func base64Embedding(v []float64) string {
	b := make([]byte, 4*len(v))
	for i, f := range v {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(float32(f)))
	}
	return base64.StdEncoding.EncodeToString(b)
}
