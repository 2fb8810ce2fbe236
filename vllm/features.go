package vllm

import "fmt"

// Feature is something of vLLM the supervisor uses, and the first release
// that has it. Refs are vLLM's own issues and pull requests; docs/vllm.md
// is the same table for operators (a test keeps the two in step).
type Feature struct {
	Name  string
	Since Version
	What  string
	Refs  string
	// Inferred: the release was worked out from the pull request's merge
	// date and the release dates, not read in a release note.
	Inferred bool
}

// The features, oldest first.
var (
	// VersionEndpoint: GET /version answers {"version": "…"}.
	VersionEndpoint = Feature{"version endpoint", MustParse("0.4.0"), "GET /version", "vllm#3161", true}
	// StreamUsage: stream_options.include_usage on chat and completions.
	StreamUsage = Feature{"stream usage", MustParse("0.5.0"), "stream_options.include_usage", "vllm#5135, vllm#5319", false}
	// Base64Embeddings: encoding_format "base64" on /v1/embeddings.
	Base64Embeddings = Feature{"base64 embeddings", MustParse("0.5.1"), `/v1/embeddings encoding_format "base64"`, "vllm#5935", true}
	// SleepModeFlag: --enable-sleep-mode (the CuMem allocator); an older
	// vLLM exits at start on the unknown flag.
	SleepModeFlag = Feature{"sleep mode flag", MustParse("0.7.0"), "--enable-sleep-mode", "vllm#11743", true}
	// SleepEndpoints: POST /sleep?level=N and POST /wake_up (development
	// mode, VLLM_SERVER_DEV_MODE=1).
	SleepEndpoints = Feature{"sleep endpoints", MustParse("0.7.3"), "POST /sleep, POST /wake_up", "vllm#11743, docs in vllm#22310", true}
	// IsSleeping: GET /is_sleeping.
	IsSleeping = Feature{"is_sleeping", MustParse("0.8.0"), "GET /is_sleeping", "vllm#14312", true}
	// WakeTags: POST /wake_up?tags=weights, then ?tags=kv_cache.
	WakeTags = Feature{"wake tags", MustParse("0.8.3"), "POST /wake_up?tags=…", "vllm#15500", false}
	// NestedErrors: error bodies {"error": {"message", "type", "param",
	// "code"}} instead of a flat {"object": "error", "message", …}.
	NestedErrors = Feature{"nested errors", MustParse("0.10.1"), `error bodies {"error": {…}}`, "vllm#22099", false}
	// CollectiveRPC: POST /collective_rpc, which level 2 needs to reload
	// the weights after a wake.
	CollectiveRPC = Feature{"collective_rpc", MustParse("0.10.2"), "POST /collective_rpc", "vllm#23075", true}
	// ShutdownTimeout: --shutdown-timeout N: at SIGTERM the API server
	// refuses new requests and lets those in flight finish for up to N
	// seconds; before it (and with 0, its default), SIGTERM aborts them.
	ShutdownTimeout = Feature{"shutdown timeout", MustParse("0.18.0"), "--shutdown-timeout", "vllm#34730, vllm#36666", false}
	// UUIDDevices: GPU and MIG UUIDs in CUDA_VISIBLE_DEVICES; before it,
	// vLLM calls int() on every entry and dies at start.
	UUIDDevices = Feature{"UUIDs in CUDA_VISIBLE_DEVICES", MustParse("0.24.0"), "CUDA_VISIBLE_DEVICES=GPU-…", "vllm#45026 (bugs vllm#13815, #20939, #41848)", false}
)

// Features lists every feature, oldest first.
var Features = []Feature{VersionEndpoint, StreamUsage, Base64Embeddings, SleepModeFlag, SleepEndpoints, IsSleeping, WakeTags, NestedErrors, CollectiveRPC, ShutdownTimeout, UUIDDevices}

// Oldest is the oldest release the supervisor is built for (docs/vllm.md).
var Oldest = MustParse("0.6.0")

// Newest is the newest release the table knows. A model whose version
// cannot be learned is taken to be this one (with a warning) until its
// GET /version answers.
var Newest = MustParse("0.33.0")

// Has reports whether v has f.
func (v Version) Has(f Feature) bool { return v.AtLeast(f.Since) }

// MaxSleepLevel is the deepest sleep level v can be driven to: 2 needs
// /collective_rpc (the weights are reloaded through it) and wake tags; 1
// needs /sleep and /wake_up; 0 means no sleep mode (stop, cold start).
func (v Version) MaxSleepLevel() int {
	switch {
	case v.Has(CollectiveRPC) && v.Has(WakeTags):
		return 2
	case v.Has(SleepEndpoints):
		return 1
	}
	return 0
}

// SleepLevel is the level a model configured with want sleeps at on v, and
// why it is less when it is ("" when it is want).
func (v Version) SleepLevel(want int) (int, string) {
	got := min(want, v.MaxSleepLevel())
	switch {
	case got == want:
		return want, ""
	case got == 1:
		return 1, fmt.Sprintf("sleep_level %d needs vLLM %s (%s); %s has it not: level 1", want, CollectiveRPC.Since, CollectiveRPC.What, v)
	}
	return 0, fmt.Sprintf("sleep_level %d needs vLLM %s (%s); %s has no sleep mode: stopped and cold-started instead", want, SleepEndpoints.Since, SleepEndpoints.What, v)
}
