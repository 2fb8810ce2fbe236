package vllm

import (
	"encoding/json"
	"fmt"
	"math"
	"strings"
)

// ModelConfig is what the KV-cache arithmetic reads of a model directory's
// config.json (Hugging Face transformers' format). A multimodal model keeps
// its language model's keys under text_config (or at the top, as
// Qwen2.5-VL does); the text model is what the KV cache holds.
type ModelConfig struct {
	Architectures         []string       `json:"architectures"`
	HiddenSize            int            `json:"hidden_size"`
	NumLayers             int            `json:"num_hidden_layers"`
	NumHeads              int            `json:"num_attention_heads"`
	NumKVHeads            int            `json:"num_key_value_heads"`
	HeadDim               int            `json:"head_dim"`
	IntermediateSize      int            `json:"intermediate_size"`
	VocabSize             int            `json:"vocab_size"`
	TorchDtype            string         `json:"torch_dtype"`
	Dtype                 string         `json:"dtype"` // transformers 5 renamed torch_dtype
	SlidingWindow         *int           `json:"sliding_window"`
	UseSlidingWindow      *bool          `json:"use_sliding_window"`
	LayerTypes            []string       `json:"layer_types"`
	SlidingWindowPattern  int            `json:"sliding_window_pattern"`
	MaxPositionEmbeddings int            `json:"max_position_embeddings"`
	RopeScaling           map[string]any `json:"rope_scaling"`
	TieWordEmbeddings     bool           `json:"tie_word_embeddings"`
	NumLocalExperts       int            `json:"num_local_experts"`
	NumRoutedExperts      int            `json:"n_routed_experts"`
	NumExperts            int            `json:"num_experts"`
	MoEIntermediateSize   int            `json:"moe_intermediate_size"`
	KVLoRARank            int            `json:"kv_lora_rank"`
	QKRopeHeadDim         int            `json:"qk_rope_head_dim"`
	TextConfig            *ModelConfig   `json:"text_config"`
	Quantization          map[string]any `json:"quantization_config"`
}

// ParseModelConfig reads config.json. A multimodal model's text_config, when
// the top level has no layers of its own, is the one that counts.
func ParseModelConfig(b []byte) (*ModelConfig, error) {
	var c ModelConfig
	if err := json.Unmarshal(b, &c); err != nil {
		return nil, fmt.Errorf("config.json: %w", err)
	}
	if c.NumLayers == 0 && c.TextConfig != nil {
		t := *c.TextConfig
		if t.TorchDtype == "" && t.Dtype == "" {
			t.TorchDtype, t.Dtype = c.TorchDtype, c.Dtype
		}
		if t.MaxPositionEmbeddings == 0 {
			t.MaxPositionEmbeddings = c.MaxPositionEmbeddings
		}
		t.Architectures = c.Architectures
		c = t
	}
	if c.NumLayers <= 0 || c.NumHeads <= 0 || c.HiddenSize <= 0 {
		return nil, fmt.Errorf("config.json: no num_hidden_layers, num_attention_heads and hidden_size to size the KV cache by")
	}
	if c.NumKVHeads == 0 {
		c.NumKVHeads = c.NumHeads // multi-head attention: one KV head per head
	}
	if c.HeadDim == 0 {
		c.HeadDim = c.HiddenSize / c.NumHeads
	}
	return &c, nil
}

// DtypeBytes is the size of one value of the model's dtype (vLLM's
// --dtype auto keeps it; float32 checkpoints are served in 16 bits).
func (c *ModelConfig) DtypeBytes() int {
	switch strings.ToLower(cmpOr(c.TorchDtype, c.Dtype)) {
	case "float8_e4m3fn", "float8", "fp8":
		return 1
	}
	return 2
}

func cmpOr(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// MaxLen is the longest max_model_len vLLM accepts for the model without
// VLLM_ALLOW_LONG_MAX_MODEL_LEN: max_position_embeddings, scaled by a
// RoPE scaling factor of the types vLLM scales by (not su, longrope or
// llama3, whose max_position_embeddings already is the long one).
func (c *ModelConfig) MaxLen() int {
	n := c.MaxPositionEmbeddings
	if n <= 0 {
		return 0
	}
	typ, _ := c.RopeScaling["rope_type"].(string)
	if typ == "" {
		typ, _ = c.RopeScaling["type"].(string)
	}
	f, _ := c.RopeScaling["factor"].(float64)
	switch typ {
	case "", "su", "longrope", "llama3", "default", "mrope":
		return n
	}
	if f > 1 {
		return int(float64(n) * f)
	}
	return n
}

// slidingLayers is how many layers attend within a sliding window, and the
// window; 0 layers when none does (or the window is switched off).
func (c *ModelConfig) slidingLayers() (layers, window int) {
	if c.SlidingWindow == nil || *c.SlidingWindow <= 0 || (c.UseSlidingWindow != nil && !*c.UseSlidingWindow) {
		return 0, 0
	}
	w := *c.SlidingWindow
	switch {
	case len(c.LayerTypes) > 0:
		for _, t := range c.LayerTypes {
			if t == "sliding_attention" {
				layers++
			}
		}
		return layers, w
	case c.SlidingWindowPattern > 1:
		// Every pattern-th layer is global, the others slide (Gemma 2/3).
		return c.NumLayers - c.NumLayers/c.SlidingWindowPattern, w
	}
	return c.NumLayers, w
}

// KVBytes is the KV cache one sequence of n tokens takes on each of tp
// GPUs. Each GPU holds its share of the KV heads (at least one: vLLM
// replicates heads when there are fewer than GPUs); layers with a sliding
// window hold at most the window; MLA models (kv_lora_rank) hold one
// compressed latent per layer on every GPU.
func (c *ModelConfig) KVBytes(n, tp int, kvDtypeBytes int) uint64 {
	if kvDtypeBytes <= 0 {
		kvDtypeBytes = c.DtypeBytes()
	}
	slide, window := c.slidingLayers()
	full := c.NumLayers - slide
	tokens := func(layers int, w int) uint64 {
		t := n
		if w > 0 && w < n {
			t = w
		}
		return uint64(layers) * uint64(t)
	}
	layerTokens := tokens(full, 0) + tokens(slide, window)
	if c.KVLoRARank > 0 {
		return layerTokens * uint64(c.KVLoRARank+c.QKRopeHeadDim) * uint64(kvDtypeBytes)
	}
	heads := max(1, c.NumKVHeads/max(tp, 1))
	return layerTokens * 2 * uint64(heads) * uint64(c.HeadDim) * uint64(kvDtypeBytes)
}

// Params estimates the text model's parameters from config.json, for a
// directory whose weights are not there yet: embeddings (and the output
// layer unless tied), attention and the gated MLP (every expert of a MoE).
func (c *ModelConfig) Params() uint64 {
	h, v := uint64(c.HiddenSize), uint64(c.VocabSize)
	q := uint64(c.NumHeads * c.HeadDim)
	kv := uint64(c.NumKVHeads * c.HeadDim)
	attn := h*q + 2*h*kv + q*h
	experts := uint64(max(c.NumLocalExperts, c.NumRoutedExperts, c.NumExperts, 1))
	inter := uint64(c.IntermediateSize)
	if experts > 1 && c.MoEIntermediateSize > 0 {
		inter = uint64(c.MoEIntermediateSize)
	}
	mlp := 3 * h * inter * experts
	embed := v * h
	if !c.TieWordEmbeddings {
		embed *= 2
	}
	return embed + uint64(c.NumLayers)*(attn+mlp)
}

// Overhead is what --check keeps aside on each GPU besides the weights and
// the KV cache: the activation peak of vLLM's profiling run at its default
// batch, CUDA graphs, and the CUDA context (and NCCL with tensor
// parallelism). vLLM measures these at start; 3 GiB is what its profile
// typically reports for the 7B-70B models of a host like the reference one.
const Overhead = 3 << 30

// Fit is whether one sequence of max_model_len fits a model's KV cache.
type Fit struct {
	MaxModelLen int    // the length checked (the configured one, or the model's own)
	PerGPU      uint64 // gpu_memory_utilization × the GPU's total
	Weights     uint64 // the weights on each GPU
	Overhead    uint64
	KVBudget    int64  // what is left for the KV cache on each GPU (may be negative)
	KVNeed      uint64 // one sequence of MaxModelLen, on each GPU
	Fits        bool
	// LargestLen is the longest max_model_len whose one sequence fits the
	// budget (0: not even a few tokens); SmallestUtil the least
	// gpu_memory_utilization at which MaxModelLen fits (> 1: no
	// utilization does, on GPUs of this size).
	LargestLen   int
	SmallestUtil float64
}

// CheckFit works out whether maxLen tokens of one sequence fit the KV cache
// of a model with config c and weights bytes in all (split over tp GPUs),
// at gpu_memory_utilization util of GPUs with total bytes each.
func CheckFit(c *ModelConfig, weights uint64, maxLen, tp int, util float64, total uint64, kvDtypeBytes int) Fit {
	tp = max(tp, 1)
	f := Fit{MaxModelLen: maxLen, Weights: weights / uint64(tp), Overhead: Overhead}
	f.PerGPU = uint64(math.Floor(util * float64(total)))
	f.KVBudget = int64(f.PerGPU) - int64(f.Weights) - int64(f.Overhead)
	f.KVNeed = c.KVBytes(maxLen, tp, kvDtypeBytes)
	f.Fits = f.KVBudget >= int64(f.KVNeed)
	perToken := float64(c.KVBytes(1, tp, kvDtypeBytes))
	if f.KVBudget > 0 && perToken > 0 {
		// Sliding layers make the need flatten past the window: search.
		lo, hi := 0, max(maxLen, 1)
		for c.KVBytes(hi, tp, kvDtypeBytes) <= uint64(f.KVBudget) && hi < 1<<24 {
			hi *= 2
		}
		for lo < hi {
			mid := (lo + hi + 1) / 2
			if c.KVBytes(mid, tp, kvDtypeBytes) <= uint64(f.KVBudget) {
				lo = mid
			} else {
				hi = mid - 1
			}
		}
		f.LargestLen = lo
	}
	need := float64(f.Weights + f.Overhead + f.KVNeed)
	f.SmallestUtil = math.Ceil(need/float64(total)*100) / 100
	return f
}
