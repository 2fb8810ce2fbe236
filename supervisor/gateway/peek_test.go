package gateway

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

func TestPeekModel(t *testing.T) {
	for _, tc := range []struct {
		name, body, model, err string
	}{
		{"first", `{"model":"m","messages":[]}`, "m", ""},
		{"after nested values", `{"messages":[{"role":"user","content":[{"type":"text","text":"{\"model\":\"x\"}"}]}],"n":1,"model":"m"}`, "m", ""},
		{"spaces", "{ \"stream\" : true ,\n \"model\" :\t\"org/m-7b\" }", "org/m-7b", ""},
		{"escaped", `{"model":"a\u002fb"}`, "a/b", ""},
		{"nested model is not the model", `{"x":{"model":"y"}}`, "", "no \"model\""},
		{"not a string", `{"model":7}`, "", "not a string"},
		{"array", `[{"model":"m"}]`, "", "not a JSON object"},
		{"not JSON", `model=m`, "", "not a JSON object"},
		{"truncated", `{"messages":[{"content":"a\"`, "", "unexpected EOF"},
		{"escaped quote in a skipped string", `{"prompt":"say \"model\": \\","model":"m"}`, "m", ""},
		{"literals skipped", `{"stream":true,"n":2,"x":null,"t":-1.5e3,"model":"m"}`, "m", ""},
		{"key missing its colon", `{"model" "m"}`, "", "not valid JSON"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, read, at, end, err := peekModel(strings.NewReader(tc.body))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || m != tc.model {
				t.Fatalf("%q, %v", m, err)
			}
			if !bytes.HasPrefix([]byte(tc.body), read) {
				t.Errorf("read %q is not a prefix of the body", read)
			}
			if got := string(withModel(read, at, end, "Z")); !strings.Contains(got, `"Z"`) || strings.Count(got, "\"Z\"") != 1 {
				t.Errorf("rewritten %q", got)
			}
		})
	}
}

// The body reaches the model byte for byte, wherever the model is named and
// however large the body, and nothing over max_body passes.
func TestBodyUnchanged(t *testing.T) {
	got := make(chan string, 1)
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- fmt.Sprintf("%x %d", sha256.Sum256(b), r.ContentLength)
		w.Write([]byte(`{}`)) //nolint:errcheck // test
	}))
	defer up.Close()
	set := defaultSettings()
	set.MaxBody = 4 << 20
	s := startGateway(t, newStub(ready("vision", "org/vision", up.URL)), set, nil)
	image := base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{0xfe, 0x01, 0x7f}, 512<<10)) // 2 MiB of base64
	for _, body := range []string{
		`{"model":"org/vision","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,` + image + `"}}]}]}`,
		`{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,` + image + `"}}]}],"model":"org/vision"}`,
	} {
		resp := post(t, context.Background(), s.url+"/v1/chat/completions", body, "")
		readAll(t, resp)
		if resp.StatusCode != 200 {
			t.Fatalf("%d", resp.StatusCode)
		}
		// A large chat body read only as far as its model is sent chunked:
		// it is asked for its stream's usage as it passes (usagestream.go),
		// which may lengthen it. This one does not stream: not one byte
		// changes.
		sum := fmt.Sprintf("%x", sha256.Sum256([]byte(body)))
		if g := <-got; g != fmt.Sprintf("%s %d", sum, len(body)) && g != sum+" -1" {
			t.Errorf("the model received %s, want %s and its length, or chunked", g, sum)
		}
	}
	big := `{"model":"org/vision","prompt":"` + strings.Repeat("x", 4<<20) + `"}`
	resp := post(t, context.Background(), s.url+"/v1/completions", big, "")
	if b := readAll(t, resp); resp.StatusCode != 413 {
		t.Errorf("body over max_body: %d %s", resp.StatusCode, b)
	}
	// Unknown length (chunked): cut at max_body all the same.
	req, _ := http.NewRequest(http.MethodPost, s.url+"/v1/completions", io.MultiReader(strings.NewReader(big)))
	req.ContentLength = -1
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if b := readAll(t, resp); resp.StatusCode != 413 {
		t.Errorf("chunked body over max_body: %d %s", resp.StatusCode, b)
	}
	select {
	case <-got:
		t.Error("a body over max_body reached the model")
	default:
	}
}

// FuzzPeekModel holds the scanner to encoding/json: for a valid JSON object
// it finds the model json.Unmarshal finds (the last "model" key wins there,
// the first here: a body naming two is refused by neither, so only bodies
// with one are compared), and what it read is a prefix of the body.
func FuzzPeekModel(f *testing.F) {
	for _, s := range []string{
		`{"model":"m"}`, `{"messages":[{"role":"user","content":"{\"model\":\"x\"}"}],"model":"m"}`,
		`{"a":{"b":[1,2,{"c":"]}"}]},"model":"m\u00e9"}`, `{"prompt":"\\\\","model":"a\\"b"}`, `[]`, `{}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		m, read, at, end, err := peekModel(bytes.NewReader(body))
		if !bytes.HasPrefix(body, read) {
			t.Fatalf("read %q is not a prefix of %q", read, body)
		}
		var want struct {
			Model *string `json:"model"`
		}
		var obj map[string]json.RawMessage
		if !json.Valid(body) || json.Unmarshal(body, &obj) != nil || bytes.Count(body, []byte(`"model"`)) != 1 {
			return
		}
		if json.Unmarshal(body, &want) != nil || want.Model == nil {
			if err == nil && obj["model"] == nil {
				t.Fatalf("found model %q in %q, which has none", m, body)
			}
			return
		}
		if err != nil || m != *want.Model {
			t.Fatalf("peekModel(%q) = %q, %v; want %q", body, m, err, *want.Model)
		}
		if string(read[at:end]) != string(obj["model"]) {
			t.Fatalf("model at %d:%d is %q, want %q", at, end, read[at:end], obj["model"])
		}
	})
}
