package config

import (
	"slices"
	"testing"
)

func TestMaskArgs(t *testing.T) {
	cases := map[string]struct{ in, want []string }{
		"separate value": {
			[]string{"/py", "-m", "vllm", "--port", "11400", "--api-key", "sk-1"},
			[]string{"/py", "-m", "vllm", "--port", "11400", "--api-key", Masked},
		},
		"equals value": {
			[]string{"--api-key=sk-1", "--hf-token=hf_2", "--trust-remote-code"},
			[]string{"--api-key=" + Masked, "--hf-token=" + Masked, "--trust-remote-code"},
		},
		"names that look like secrets": {
			[]string{"--hf_token", "a", "--db-password", "b", "--client-secret", "c", "--openai-apikey", "d", "--apikey", "e", "--aws-credentials", "f", "-api-key", "g"},
			[]string{"--hf_token", Masked, "--db-password", Masked, "--client-secret", Masked, "--openai-apikey", Masked, "--apikey", Masked, "--aws-credentials", Masked, "-api-key", Masked},
		},
		"names that do not": {
			[]string{"--max-num-batched-tokens", "8192", "--ssl-keyfile", "/k.pem", "--tokenizer", "/tok", "--tokenizer-mode", "auto", "--key-value", "x"},
			[]string{"--max-num-batched-tokens", "8192", "--ssl-keyfile", "/k.pem", "--tokenizer", "/tok", "--tokenizer-mode", "auto", "--key-value", "x"},
		},
		"a secret flag without a value": {
			[]string{"--api-key", "--port", "1"},
			[]string{"--api-key", "--port", "1"},
		},
		"a value that looks like a flag": {
			[]string{"--api-key", "-starts-with-dash"},
			[]string{"--api-key", Masked},
		},
		"uppercase": {
			[]string{"--API-KEY", "x"},
			[]string{"--API-KEY", Masked},
		},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			in := slices.Clone(tc.in)
			if got := MaskArgs(tc.in); !slices.Equal(got, tc.want) {
				t.Errorf("got  %q\nwant %q", got, tc.want)
			}
			if !slices.Equal(in, tc.in) {
				t.Error("MaskArgs changed its argument")
			}
		})
	}
}

// TestTokenShaped: tokens are told from names by their shape, not their
// characters: the keys, model names and variables of a configuration are
// names; the tokens operators paste are not.
func TestTokenShaped(t *testing.T) {
	names := []string{
		"tensor_parallel", "gpu_memory_utilization", "max_connections_per_address", "mixtral",
		"mixtral-8x7b-instruct", "deepcoder-14b-instruct", "phi-3-mini-128k", "yi34b", "mimo-vl-7b-rl",
		"HF_HOME", "VLLM_CACHE_ROOT", "PYTORCH_CUDA_ALLOC_CONF", "CUDA_VISIBLE_DEVICES", "HF_TOKEN",
		"VLLM_API_KEY", "Meta-Llama-3.1-70B-Instruct", "Qwen2.5-Coder-32B-Instruct", "nous-hermes-2-mixtral",
		"x-common", "openchat_3.5", "sk", "hf_home",
	}
	tokens := []string{
		"hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567", "hf_abcdefghijklmnopqrstuvwxyz", "sk-proj-Ab12Cd34Ef56Gh78Ij90",
		"sk-0123456789abcdefghijklmn", "sk_live_abcdefghijklmnop", "ghp_0123456789abcdefghijABCDEFGHIJ012345",
		"AKIAIOSFODNN7EXAMPLE", "glpat-xxxxxxxxxxxxxxxxxxxx", "Zm9vYmFyYmF6cXV4MTIzNDU2", "0123456789abcdef0123456789abcdef",
		"k3J9xQ2mP8vL4nR7", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
	}
	for _, n := range names {
		if TokenShaped(n) {
			t.Errorf("%q taken for a token", n)
		}
	}
	for _, tok := range tokens {
		if !TokenShaped(tok) {
			t.Errorf("%q taken for a name", tok)
		}
	}
}
