package vllm

import (
	"math"
	"os"
	"path/filepath"
	"testing"
)

const gib = 1 << 30

func loadRef(t *testing.T, dir string) *ModelConfig {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "models", dir, "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := ParseModelConfig(b)
	if err != nil {
		t.Fatalf("%s: %v", dir, err)
	}
	return c
}

// TestReferenceParams: the parameter estimate from config.json alone is
// within 3% of each reference model's published size (what --check uses
// when the weights are not there yet).
func TestReferenceParams(t *testing.T) {
	for dir, published := range map[string]float64{
		"mixtral-8x7b-instruct":  46.7e9,
		"nous-hermes-2-mixtral":  46.7e9,
		"openchat-3.5":           7.24e9,
		"phi-3-mini-128k":        3.82e9,
		"yi-34b-chat":            34.4e9,
		"deepcoder-14b-instruct": 14.8e9,
		"mimo-vl-7b-rl":          7.6e9, // the language model, without its vision tower
	} {
		got := float64(loadRef(t, dir).Params())
		if math.Abs(got-published)/published > 0.03 {
			t.Errorf("%s: %.2fB parameters estimated, published %.2fB", dir, got/1e9, published/1e9)
		}
	}
}

// TestPhi3At128k is the case the shipped configuration had: phi3 at
// max_model_len 128000 and utilization 0.50 of an 80 GiB GPU needs 46.9 GiB
// of KV cache for one sequence (384 KiB a token: 32 layers, 32 KV heads of
// 96, bf16) and has about 30 GiB after its weights.
func TestPhi3At128k(t *testing.T) {
	c := loadRef(t, "phi-3-mini-128k")
	if got := c.KVBytes(1, 1, 0); got != 384<<10 {
		t.Fatalf("KV per token %d, want 384 KiB", got)
	}
	f := CheckFit(c, 7_642_159_104, 128000, 1, 0.50, 80*gib, 0)
	if f.Fits {
		t.Fatalf("fits: %+v", f)
	}
	if need := float64(f.KVNeed) / gib; math.Abs(need-46.9) > 0.1 {
		t.Errorf("need %.1f GiB, want 46.9", need)
	}
	if budget := float64(f.KVBudget) / gib; budget < 29 || budget > 31 {
		t.Errorf("KV budget %.1f GiB, want about 30", budget)
	}
	if f.LargestLen < 80000 || f.LargestLen > 83000 {
		t.Errorf("largest max_model_len %d, want about 81700", f.LargestLen)
	}
	if f.SmallestUtil != 0.72 {
		t.Errorf("smallest utilization %.2f, want 0.72", f.SmallestUtil)
	}
	if g := CheckFit(c, 7_642_159_104, 128000, 1, 0.75, 80*gib, 0); !g.Fits {
		t.Errorf("at 0.75 it should fit: %+v", g)
	}
}

// TestKVArithmetic: tensor parallelism splits the KV heads (never below
// one per GPU), a sliding window caps its layers, fp8 halves it.
func TestKVArithmetic(t *testing.T) {
	mixtral := loadRef(t, "mixtral-8x7b-instruct")
	if got, want := mixtral.KVBytes(1, 2, 0), uint64(32*2*4*128*2); got != want {
		t.Errorf("mixtral TP2 per token %d, want %d", got, want)
	}
	if got, want := mixtral.KVBytes(1, 16, 0), uint64(32*2*1*128*2); got != want {
		t.Errorf("mixtral TP16 per token %d, want %d (one head per GPU at least)", got, want)
	}
	if got, want := mixtral.KVBytes(1, 1, 1), uint64(32*2*8*128*1); got != want {
		t.Errorf("fp8 per token %d, want %d", got, want)
	}
	openchat := loadRef(t, "openchat-3.5")
	if a, b := openchat.KVBytes(4096, 1, 0), openchat.KVBytes(8192, 1, 0); a != b {
		t.Errorf("sliding window 4096: %d bytes at 4096 tokens, %d at 8192", a, b)
	}
	coder := loadRef(t, "deepcoder-14b-instruct") // use_sliding_window: false
	if a, b := coder.KVBytes(1000, 1, 0), coder.KVBytes(2000, 1, 0); 2*a != b {
		t.Errorf("a switched-off window still capped: %d, %d", a, b)
	}
	if l := loadRef(t, "yi-34b-chat").MaxLen(); l != 4096 {
		t.Errorf("yi MaxLen %d", l)
	}
	if l := loadRef(t, "phi-3-mini-128k").MaxLen(); l != 131072 {
		t.Errorf("phi3 MaxLen %d (longrope is not scaled again)", l)
	}
	yarn := &ModelConfig{MaxPositionEmbeddings: 32768, RopeScaling: map[string]any{"type": "yarn", "factor": 4.0}}
	if l := yarn.MaxLen(); l != 131072 {
		t.Errorf("yarn ×4: MaxLen %d", l)
	}
}

func TestParseModelConfig(t *testing.T) {
	nested := []byte(`{"architectures":["Gemma3ForConditionalGeneration"],"torch_dtype":"bfloat16",
		"text_config":{"hidden_size":2560,"num_hidden_layers":34,"num_attention_heads":8,"num_key_value_heads":4,"head_dim":256,
		"max_position_embeddings":131072,"sliding_window":1024,"sliding_window_pattern":6}}`)
	c, err := ParseModelConfig(nested)
	if err != nil {
		t.Fatal(err)
	}
	if c.NumLayers != 34 || c.HeadDim != 256 || c.DtypeBytes() != 2 || c.MaxLen() != 131072 {
		t.Errorf("text_config not taken: %+v", c)
	}
	// 34 layers, every 6th global: 29 sliding, 5 full.
	if got, want := c.KVBytes(8192, 1, 0), uint64(5*8192+29*1024)*2*4*256*2; got != want {
		t.Errorf("interleaved window: %d, want %d", got, want)
	}
	for _, bad := range []string{`{`, `{"hidden_size": 1}`, `{}`} {
		if _, err := ParseModelConfig([]byte(bad)); err == nil {
			t.Errorf("%s parsed", bad)
		}
	}
}
