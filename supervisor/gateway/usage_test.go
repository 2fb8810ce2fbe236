package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestAskUsage(t *testing.T) {
	for _, tc := range []struct {
		name, in, out string
		asked, stream bool
	}{
		{"not a stream", `{"model":"m","max_tokens":3}`, `{"model":"m","max_tokens":3}`, false, false},
		{"stream false", `{"model":"m","stream":false}`, `{"model":"m","stream":false}`, false, false},
		{"no stream_options", `{"model":"m","stream":true}`, `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`, true, true},
		{"white space kept", "{ \"model\": \"m\",\n  \"stream\": true\n}", "{ \"model\": \"m\",\n  \"stream\": true\n,\"stream_options\":{\"include_usage\":true}}", true, true},
		{"null", `{"stream_options":null,"model":"m","stream":true}`, `{"stream_options":{"include_usage":true},"model":"m","stream":true}`, true, true},
		{"empty object", `{"model":"m","stream":true,"stream_options": { } }`, `{"model":"m","stream":true,"stream_options": {"include_usage":true} }`, true, true},
		{"other options kept", `{"model":"m","stream":true,"stream_options":{"continuous_usage_stats":true}}`, `{"model":"m","stream":true,"stream_options":{"include_usage":true,"continuous_usage_stats":true}}`, true, true},
		{"include_usage false", `{"model":"m","stream":true,"stream_options":{"include_usage":false}}`, `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`, true, true},
		{"the client asked", `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`, `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`, false, true},
		{"a string in stream_options' place", `{"model":"m","stream":true,"stream_options":"x"}`, `{"model":"m","stream":true,"stream_options":"x"}`, false, true},
		{"nested stream is not the top level's", `{"model":"m","messages":[{"stream":true}]}`, `{"model":"m","messages":[{"stream":true}]}`, false, false},
		{"escaped key", `{"model":"m","str\u0065am":true}`, `{"model":"m","str\u0065am":true,"stream_options":{"include_usage":true}}`, true, true},
		{"not JSON", `{"model":"m","stream":true`, `{"model":"m","stream":true`, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, asked, stream := askUsage([]byte(tc.in))
			if string(out) != tc.out || asked != tc.asked || stream != tc.stream {
				t.Errorf("askUsage(%s) = %s asked %v stream %v; want %s %v %v", tc.in, out, asked, stream, tc.out, tc.asked, tc.stream)
			}
		})
	}
}

func TestLastUsage(t *testing.T) {
	for _, tc := range []struct {
		name, in string
		want     tokenUsage
		ok       bool
	}{
		{"chat", `{"id":"x","choices":[{"message":{"content":"the \"usage\": {\"prompt_tokens\": 9}"}}],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8},"prompt_logprobs":null}`, tokenUsage{3, 5}, true},
		{"embeddings", `{"data":[{"embedding":[0.1]}],"usage" : {"prompt_tokens":7,"total_tokens":7}}`, tokenUsage{7, 0}, true},
		{"none", `{"choices":[]}`, tokenUsage{}, false},
		{"null", `{"choices":[],"usage":null}`, tokenUsage{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tap := &jsonTap{src: io.NopCloser(strings.NewReader(tc.in))}
			// Small reads, to cross the tail's bound in pieces.
			buf := make([]byte, 7)
			for {
				if _, err := tap.Read(buf); err != nil {
					break
				}
			}
			u, ok, _ := tap.result()
			if u != tc.want || ok != tc.ok {
				t.Errorf("got %+v %v, want %+v %v", u, ok, tc.want, tc.ok)
			}
		})
	}
	// A large answer: only its tail is kept, and the usage is in it.
	big := `{"choices":[{"text":"` + strings.Repeat("x", 3*jsonTail) + `"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}`
	tap := &jsonTap{src: io.NopCloser(strings.NewReader(big))}
	if n, _ := io.Copy(io.Discard, tap); n != int64(len(big)) || len(tap.tail) > jsonTail {
		t.Fatalf("copied %d, kept %d", n, len(tap.tail))
	}
	if u, ok, _ := tap.result(); !ok || u != (tokenUsage{1, 2}) {
		t.Errorf("large answer: %+v %v", u, ok)
	}
}

// vllmStream is a stream as vLLM writes it for a chat request asking for
// usage: the role chunk, content chunks, the finish chunk, the usage chunk
// (choices empty) and [DONE]. One big content chunk is over the size a
// usage chunk can have.
var vllmStream = []string{
	`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}` + "\n\n",
	`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":null,"finish_reason":null}]}` + "\n\n",
	`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":"` + strings.Repeat("lo", 3000) + `"},"logprobs":null,"finish_reason":null}]}` + "\n\n",
	`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" \"usage\": x"},"logprobs":null,"finish_reason":"length"}]}` + "\n\n",
	`data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":9,"total_tokens":13,"completion_tokens":4}}` + "\n\n",
	"data: [DONE]\n\n",
}

// TestStreamUsageKeptFromClient: a stream that did not ask for usage is
// asked upstream; the client receives every other byte exactly as the
// model wrote it, whatever the model's write boundaries, and the tokens
// are counted. One that asked receives the whole stream.
func TestStreamUsageKeptFromClient(t *testing.T) {
	var mu sync.Mutex
	var bodies []string
	up := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		mu.Lock()
		bodies = append(bodies, string(b))
		mu.Unlock()
		w.Header().Set("Content-Type", "text/event-stream")
		all := strings.Join(vllmStream, "")
		if !strings.Contains(string(b), `"include_usage":true`) {
			all = strings.Replace(all, vllmStream[4], "", 1)
		}
		// Writes cut across events: 1, 2, 3, … bytes, flushed each time.
		for i, n := 0, 1; i < len(all); i, n = i+n, n%97+1 {
			io.WriteString(w, all[i:min(i+n, len(all))]) //nolint:errcheck // test
			w.(http.Flusher).Flush()
		}
	}))
	defer up.Close()
	s := startGateway(t, newStub(ready("m", "m", up.URL)), defaultSettings(), nil)

	for _, tc := range []struct {
		name, body string
		want       string
	}{
		{"not asked", `{"model":"m","messages":[],"stream":true}`, strings.Join(vllmStream[:4], "") + vllmStream[5]},
		{"asked", `{"model":"m","messages":[],"stream":true,"stream_options":{"include_usage":true}}`, strings.Join(vllmStream, "")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp := post(t, context.Background(), s.url+"/v1/chat/completions", tc.body, "")
			got := readAll(t, resp)
			if got != tc.want {
				t.Errorf("the client got:\n%q\nwant:\n%q", got, tc.want)
			}
			mu.Lock()
			sent := bodies[len(bodies)-1]
			mu.Unlock()
			if !strings.Contains(sent, `"include_usage":true`) {
				t.Errorf("the model was not asked for usage: %s", sent)
			}
		})
	}
	m := map[string]string{"model": "m", "key": ""}
	for kind, want := range map[string]float64{"prompt": 18, "completion": 8} {
		m["kind"] = kind
		if got := s.value(t, "citadel_gateway_tokens_total", m); got != want {
			t.Errorf("tokens_total{kind=%s} = %v, want %v", kind, got, want)
		}
	}
	rows := s.gw.Usage()
	if len(rows) != 1 || rows[0] != (UsageRow{Model: "m", Requests: 2, Prompt: 18, Completion: 8}) {
		t.Errorf("usage %+v", rows)
	}
}

// TestStreamClientLeavesCharged: a stream the client abandons before the
// usage chunk is charged the events it received.
func TestStreamClientLeavesCharged(t *testing.T) {
	up := startFake(t, "alpha", "--fake-token-delay", "50ms")
	s := startGateway(t, newStub(ready("alpha", "alpha", up.base)), defaultSettings(), nil)
	ctx, cancel := context.WithCancel(context.Background())
	resp := post(t, ctx, s.url+"/v1/completions", `{"model":"alpha","max_tokens":1000,"stream":true}`, "")
	buf := make([]byte, 4096)
	var got bytes.Buffer
	for strings.Count(got.String(), "data: ") < 3 {
		n, err := resp.Body.Read(buf)
		got.Write(buf[:n])
		if err != nil {
			t.Fatal(err)
		}
	}
	cancel()
	resp.Body.Close()
	up.waitLine(t, "cancelled by the client", 10*time.Second)
	waitFor(t, 10*time.Second, "the abandoned stream charged", func() bool {
		return s.value(t, "citadel_gateway_tokens_total", map[string]string{"model": "alpha", "key": "", "kind": "completion"}) >= 3
	})
	if p := s.value(t, "citadel_gateway_tokens_total", map[string]string{"model": "alpha", "key": "", "kind": "prompt"}); p != 0 {
		t.Errorf("prompt tokens of an abandoned stream: %v (unknown: 0)", p)
	}
}

// BenchmarkSSETap is the cost of reading a stream's usage as it passes.
func BenchmarkSSETap(b *testing.B) {
	var stream []byte
	for i := range 200 {
		stream = fmt.Appendf(stream, `data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"content":" tok%d"},"finish_reason":null}]}`+"\n\n", i)
	}
	stream = append(stream, vllmStream[4]...)
	stream = append(stream, "data: [DONE]\n\n"...)
	buf := make([]byte, 32<<10)
	b.SetBytes(int64(len(stream)))
	b.ReportAllocs()
	for b.Loop() {
		tap := &sseTap{src: io.NopCloser(bytes.NewReader(stream)), strip: true, now: time.Now}
		for {
			if _, err := tap.Read(buf); err != nil {
				break
			}
		}
	}
}

// TestUsageAppender: a large streaming body asked for its usage as it
// passes, whatever its read boundaries.
func TestUsageAppender(t *testing.T) {
	const add = `,"stream_options":{"include_usage":true}`
	for _, tc := range []struct {
		name, in string
		asked    bool
	}{
		{"a stream", `{"model":"m","messages":[{"role":"user","content":"x } \" {"}],"stream":true}`, true},
		{"stream first", `{"stream" : true, "model":"m","messages":[{"content":[{"type":"image_url","image_url":{"url":"data:,"}}]}]}` + "\n", true},
		{"not a stream", `{"model":"m","stream":false}`, false},
		{"no stream key", `{"model":"m","messages":[{"stream":true}]}`, false},
		{"asks itself", `{"model":"m","stream":true,"stream_options":{"include_usage":true}}`, false},
		{"asks not", `{"model":"m","stream":true,"stream_options":{"include_usage":false}}`, true},
		{"other options", `{"stream_options":{"continuous_usage_stats":true},"model":"m","stream":true}`, true},
		{"nested include_usage is not the options'", `{"model":"m","stream":true,"metadata":{"include_usage":true}}`, true},
		{"escaped key", `{"model":"m","str\u0065am":true}`, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := tc.in
			if tc.asked {
				i := strings.LastIndexByte(tc.in, '}')
				want = tc.in[:i] + add + tc.in[i:]
			}
			for _, size := range []int{1, 2, 3, 7, 4096} {
				u := &usageAppender{r: io.LimitReader(&chunked{s: tc.in, n: size}, 1<<20)}
				got, err := io.ReadAll(u)
				if err != nil || string(got) != want || u.asked.Load() != tc.asked {
					t.Fatalf("reads of %d: %q asked %v (%v), want %q", size, got, u.asked.Load(), err, want)
				}
			}
		})
	}
}

// chunked reads s n bytes at a time.
type chunked struct {
	s string
	n int
}

func (c *chunked) Read(p []byte) (int, error) {
	if c.s == "" {
		return 0, io.EOF
	}
	n := copy(p[:min(len(p), c.n)], c.s)
	c.s = c.s[n:]
	return n, nil
}

// TestLargeStreamAskedForUsage: a streaming request too large to be held on
// the heap (an image: its body is in a mapping or a file) is asked for its
// usage too, as it is sent; its usage chunk is kept
// from the client and its tokens counted.
func TestLargeStreamAskedForUsage(t *testing.T) {
	up := startFake(t, "alpha")
	s := startGateway(t, newStub(ready("alpha", "alpha", up.base)), defaultSettings(), nil)
	image := strings.Repeat("A", heapBody+1000)
	body := `{"model":"alpha","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,` + image + `"}}]}],"max_tokens":5,"stream":true}`
	got := readAll(t, post(t, context.Background(), s.url+"/v1/chat/completions", body, ""))
	if strings.Count(got, "data: ") != 7 || strings.Contains(got, `"usage"`) {
		t.Fatalf("the role chunk, five events and [DONE], no usage chunk:\n%.500s", got)
	}
	if c := s.value(t, "citadel_gateway_tokens_total", map[string]string{"model": "alpha", "key": "", "kind": "completion"}); c != 5 {
		t.Errorf("completion tokens %v, want 5 (from the usage chunk)", c)
	}
	if p := s.value(t, "citadel_gateway_tokens_total", map[string]string{"model": "alpha", "key": "", "kind": "prompt"}); p != 1 {
		t.Errorf("prompt tokens %v, want 1: the usage chunk's, not an estimate", p)
	}
}

// unmarshalUsage is lastUsage as it was, every usage object decoded by
// json.Unmarshal: the reference plainUsage must agree with.
func unmarshalUsage(b []byte) (tokenUsage, bool) {
	for end := len(b); ; {
		i := bytes.LastIndex(b[:end], []byte(`"usage"`))
		if i < 0 {
			return tokenUsage{}, false
		}
		end = i
		rest := bytes.TrimLeft(b[i+len(`"usage"`):], " \t\r\n")
		if len(rest) == 0 || rest[0] != ':' {
			continue
		}
		sc := scanner{buf: rest[1:]}
		if sc.skipValue() != nil {
			continue
		}
		var u *tokenUsage
		if err := json.Unmarshal(rest[1:1+sc.i], &u); err != nil || u == nil {
			continue
		}
		return *u, true
	}
}

var usageCases = []string{
	`{"usage":{"prompt_tokens":12,"total_tokens":19,"completion_tokens":7,"prompt_tokens_details":null}}`,
	`{"usage": { "prompt_tokens" : 3 , "completion_tokens" :5 } }`,
	`{"usage":{}}`,
	`{"usage":{"prompt_tokens":-4,"completion_tokens":0}}`,
	`{"usage":{"prompt_tokens":1,"prompt_tokens":2}}`,
	`{"usage":{"Prompt_Tokens":5,"completion_tokens":1}}`,
	`{"usage":{"prompt_tokens":5,"PROMPT_TOKENS":6}}`,
	`{"usage":{"prompt\u005ftokens":5}}`,
	`{"usage":{"prompt_tokens":5.0}}`,
	`{"usage":{"prompt_tokens":5e2}}`,
	`{"usage":{"prompt_tokens":null,"completion_tokens":2}}`,
	`{"usage":{"prompt_tokens":"5"}}`,
	`{"usage":{"prompt_tokens":99999999999999999999999}}`,
	`{"usage":{"prompt_tokens":123456789012345678}}`,
	`{"usage":{"prompt_tokens":012}}`,
	`{"usage":{"prompt_tokens":-}}`,
	`{"usage":{"prompt_tokens":1,}}`,
	`{"usage":{"prompt_tokens":1 2}}`,
	`{"usage":{"details":{"prompt_tokens":9},"completion_tokens":[1]}}`,
	`{"usage":{"completion_tokens":2},"x":{"usage":{"prompt_tokens":1}}}`,
	`{"usage":[1,2]}`,
	`{"usage":"x"}`,
	`{"usage":{"prompt_tokens":1,"completion_tokens":2}`,
}

// TestPlainUsageAsUnmarshal: the usage read by hand is what json.Unmarshal
// reads, whatever the object.
func TestPlainUsageAsUnmarshal(t *testing.T) {
	for _, in := range usageCases {
		u, ok := lastUsage([]byte(in))
		wu, wok := unmarshalUsage([]byte(in))
		if u != wu || ok != wok {
			t.Errorf("%s: got %+v %v, json.Unmarshal reads %+v %v", in, u, ok, wu, wok)
		}
	}
}

func FuzzPlainUsage(f *testing.F) {
	for _, in := range usageCases {
		f.Add([]byte(in))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		u, ok := lastUsage(in)
		wu, wok := unmarshalUsage(in)
		if u != wu || ok != wok {
			t.Errorf("%q: got %+v %v, json.Unmarshal reads %+v %v", in, u, ok, wu, wok)
		}
	})
}
