package gateway

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
)

func TestBodyScan(t *testing.T) {
	for _, tc := range []struct {
		name, body, model, err string
	}{
		{"first", `{"model":"m","messages":[]}`, "m", ""},
		{"after nested values", `{"messages":[{"role":"user","content":[{"type":"text","text":"{\"model\":\"x\"}"}]}],"n":1,"model":"m"}`, "m", ""},
		{"spaces", "{ \"stream\" : true ,\n \"model\" :\t\"org/m-7b\" }\n", "org/m-7b", ""},
		{"escaped", `{"model":"a\u002fb"}`, "a/b", ""},
		{"nested model is not the model", `{"x":{"model":"y"}}`, "", "no \"model\""},
		{"not a string", `{"model":7}`, "", "not a string"},
		{"array", `[{"model":"m"}]`, "", "not a JSON object"},
		{"not JSON", `model=m`, "", "not a JSON object"},
		{"empty", ``, "", "not a JSON object"},
		{"truncated", `{"messages":[{"content":"a\"`, "", "ended inside"},
		{"truncated after the model", `{"model":"m",`, "", "ended inside"},
		{"escaped quote in a skipped string", `{"prompt":"say \"model\": \\","model":"m"}`, "m", ""},
		{"literals skipped", `{"stream":true,"n":2,"x":null,"t":-1.5e3,"model":"m"}`, "m", ""},
		{"key missing its colon", `{"model" "m"}`, "", "not valid JSON"},
		{"two models", `{"model":"a","messages":[],"model":"b"}`, "", "more than once"},
		{"two models, one escaped", `{"model":"a","mod\u0065l":"b"}`, "", "more than once"},
		{"two models, every letter escaped", `{"\u006d\u006f\u0064\u0065\u006c":"a","model":"b"}`, "", "more than once"},
		{"escaped key alone", `{"mod\u0065l":"b"}`, "b", ""},
		{"a model key in a value is not a key", `{"model":"a","prompt":"\"model\":\"b\""}`, "a", ""},
		{"data after the object", `{"model":"m"} {"model":"n"}`, "", "more after"},
		{"name too long", `{"model":"` + strings.Repeat("x", maxModelName+1) + `"}`, "", "longer than"},
		{"long key", `{"` + strings.Repeat("k", 200) + `":1,"model":"m"}`, "m", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Whole, and byte by byte: where the writes split the body
			// must not matter.
			for _, step := range []int{len(tc.body) + 1, 1, 3} {
				var s bodyScan
				var err error
				for i := 0; i < len(tc.body) && err == nil; i += step {
					err = s.write([]byte(tc.body[i:min(i+step, len(tc.body))]))
				}
				m, ferr := s.finish()
				if err == nil {
					err = ferr
				}
				if tc.err != "" {
					if err == nil || !strings.Contains(err.Error(), tc.err) {
						t.Fatalf("step %d: error %v, want %q", step, err, tc.err)
					}
					continue
				}
				if err != nil || m != tc.model {
					t.Fatalf("step %d: %q, %v", step, m, err)
				}
				var raw string
				if err := json.Unmarshal([]byte(tc.body[s.at:s.end]), &raw); err != nil || raw != tc.model {
					t.Errorf("step %d: body[%d:%d] = %q is not the model's string", step, s.at, s.end, tc.body[s.at:s.end])
				}
			}
		})
	}
}

// TestBodyScanStream: the scan notes a top-level "stream": true as it
// finds the model, so a streaming request of any size is told why it waits
// (held.go) and asked for its usage; the last "stream" wins, as in vLLM's
// parser, and a nested one is not the request's.
func TestBodyScanStream(t *testing.T) {
	for _, tc := range []struct {
		name, body string
		stream     bool
	}{
		{"true", `{"model":"m","stream":true}`, true},
		{"before the model", `{"stream":true,"messages":[],"model":"m"}`, true},
		{"false", `{"model":"m","stream":false}`, false},
		{"absent", `{"model":"m"}`, false},
		{"null", `{"model":"m","stream":null}`, false},
		{"escaped key", `{"model":"m","str\u0065am":true}`, true},
		{"the last one wins", `{"stream":true,"model":"m","stream":false}`, false},
		{"nested is not the request's", `{"model":"m","x":{"stream":true}}`, false},
		{"in a string is not a key", `{"model":"m","prompt":"\"stream\":true"}`, false},
		{"a string value is not true", `{"model":"m","stream":"true"}`, false},
	} {
		for _, step := range []int{len(tc.body) + 1, 1} {
			var s bodyScan
			for i := 0; i < len(tc.body); i += step {
				if err := s.write([]byte(tc.body[i:min(i+step, len(tc.body))])); err != nil {
					t.Fatalf("%s: %v", tc.name, err)
				}
			}
			if _, err := s.finish(); err != nil || s.stream != tc.stream {
				t.Errorf("%s (step %d): stream %v (%v), want %v", tc.name, step, s.stream, err, tc.stream)
			}
		}
	}
}

// topModels decodes body with encoding/json and returns its top-level
// "model" values, raw, in order (duplicates kept), or ok=false when body is
// not one valid JSON object.
func topModels(body []byte) (models []json.RawMessage, ok bool) {
	if !json.Valid(body) {
		return nil, false
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, false
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, false
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, false
		}
		if tok == "model" {
			models = append(models, v)
		}
	}
	return models, true
}

// FuzzBodyScan holds the scanner to encoding/json: for a valid JSON object
// it finds the one top-level "model" json finds, where json finds it, and
// refuses an object that has more than one (after unescaping); whatever
// the split of the body into writes.
func FuzzBodyScan(f *testing.F) {
	for _, s := range []string{
		`{"model":"m"}`, `{"messages":[{"role":"user","content":"{\"model\":\"x\"}"}],"model":"m"}`,
		`{"a":{"b":[1,2,{"c":"]}"}]},"model":"m\u00e9"}`, `{"prompt":"\\\\","model":"a\\"b"}`, `[]`, `{}`,
		`{"model":"a","mod\u0065l":"b"}`, `{"model":1}`,
	} {
		f.Add([]byte(s), uint8(0))
	}
	f.Fuzz(func(t *testing.T, body []byte, split uint8) {
		var s bodyScan
		var err error
		step := int(split)%7 + 1
		if split == 0 {
			step = len(body) + 1
		}
		for i := 0; i < len(body) && err == nil; i += step {
			err = s.write(body[i:min(i+step, len(body))])
		}
		m, ferr := s.finish()
		if err == nil {
			err = ferr
		}
		models, ok := topModels(body)
		if !ok {
			return
		}
		switch {
		case len(models) > 1:
			if err == nil {
				t.Fatalf("%q names %d models and was taken as %q", body, len(models), m)
			}
		case len(models) == 0:
			if err == nil {
				t.Fatalf("found model %q in %q, which has none", m, body)
			}
		default:
			var want string
			if json.Unmarshal(models[0], &want) != nil {
				if err == nil {
					t.Fatalf("%q: a model that is not a string taken as %q", body, m)
				}
				return
			}
			if len(models[0]) > maxModelName+2 {
				return
			}
			if err != nil || m != want {
				t.Fatalf("scan(%q) = %q, %v; want %q", body, m, err, want)
			}
			if string(body[s.at:s.end]) != string(models[0]) {
				t.Fatalf("model at %d:%d is %q, want %q", s.at, s.end, body[s.at:s.end], models[0])
			}
		}
	})
}

// BenchmarkBodyScan: the scan of a 4 MiB body whose model comes last (a
// base64 image first, as the OpenAI SDKs order a vision request), in the
// 32 KiB pieces the gateway reads.
func BenchmarkBodyScan(b *testing.B) {
	image := strings.Repeat("iVBORw0KGgoAAAANSUhEUgAA", 4<<20/24)
	body := []byte(`{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,` + image + `"}}]}],"model":"vision"}`)
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		var s bodyScan
		for i := 0; i < len(body); i += 32 << 10 {
			if err := s.write(body[i:min(i+32<<10, len(body))]); err != nil {
				b.Fatal(err)
			}
		}
		if m, err := s.finish(); err != nil || m != "vision" {
			b.Fatal(m, err)
		}
	}
}
