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
