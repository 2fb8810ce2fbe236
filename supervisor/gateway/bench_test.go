package gateway

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
)

// BenchmarkGatewayRequest is one small, non-streamed chat completion
// through a real gateway (net/http's server running its handler, its hop
// to the model) on loopback, the client's connection kept alive. The model
// and the client are raw loopback connections that allocate next to
// nothing, so allocs/op and B/op are the gateway's own: a figure that
// holds on a busy machine where the timings do not (docs/performance.md,
// "The gateway's own work per request").
func BenchmarkGatewayRequest(b *testing.B) {
	b.Run("plain", func(b *testing.B) { benchGatewayRequest(b, false) })
	b.Run("keys-and-limits", func(b *testing.B) { benchGatewayRequest(b, true) })
}

// benchAnswer is what vLLM answers to a small chat completion, headers
// included.
var benchAnswer = func() []byte {
	body := `{"id":"chatcmpl-0123456789abcdef","object":"chat.completion","created":1733400000,"model":"m",` +
		`"choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help?"},"logprobs":null,"finish_reason":"stop","stop_reason":null}],` +
		`"usage":{"prompt_tokens":12,"total_tokens":19,"completion_tokens":7,"prompt_tokens_details":null},"prompt_logprobs":null}`
	return []byte("HTTP/1.1 200 OK\r\ndate: Sun, 06 Dec 2026 06:00:00 GMT\r\nserver: uvicorn\r\ncontent-length: " +
		strconv.Itoa(len(body)) + "\r\ncontent-type: application/json\r\n\r\n" + body)
}()

const benchBody = `{"model":"m","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}`

func benchGatewayRequest(b *testing.B, keys bool) {
	model := benchModel(b)
	s := Settings{MaxQueue: 64, MaxWait: time.Minute, MaxBody: 32 << 20}
	auth := ""
	if keys {
		k, err := LoadKeys(writeKeys(b, 0o600, "bench "+aliceToken+"\nother "+bobToken+"\n"))
		if err != nil {
			b.Fatal(err)
		}
		s.Keys = k
		s.Policies = map[string]Policy{
			"bench": {Models: []string{"m"}, RequestsPerMinute: 1 << 30, TokensPerMinute: 1 << 30, MaxConcurrency: 64, Weight: 2},
			"other": {RequestsPerMinute: 60},
		}
		auth = "Authorization: Bearer " + aliceToken + "\r\n"
	}
	gw, err := Listen("127.0.0.1:0", Options{
		Models: newStub(ready("m", "m", model)), Logger: zap.NewNop(), Registerer: prometheus.NewRegistry(), Settings: s,
	})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- gw.Run(ctx) }()
	b.Cleanup(func() { cancel(); <-done })

	conn, err := net.Dial("tcp", gw.Addr())
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	req := []byte("POST /v1/chat/completions HTTP/1.1\r\nHost: " + gw.Addr() + "\r\nUser-Agent: OpenAI/Python 1.54.0\r\n" +
		"Content-Type: application/json\r\nAccept: application/json\r\n" + auth +
		"Content-Length: " + strconv.Itoa(len(benchBody)) + "\r\n\r\n" + benchBody)
	br := bufio.NewReaderSize(conn, 16<<10)
	one := func() {
		if _, err := conn.Write(req); err != nil {
			b.Fatal(err)
		}
		if err := readAnswer(br); err != nil {
			b.Fatal(err)
		}
	}
	for range 100 { // the connections, pools and metrics' series made
		one()
	}
	b.ReportAllocs()
	cpu0 := processCPU(b)
	b.ResetTimer()
	for b.Loop() {
		one()
	}
	b.StopTimer()
	// The process's CPU time (user and system: the gateway's and its
	// collector's, the raw client's and model's small share), a figure
	// less moved than ns/op by others' load on a shared machine.
	b.ReportMetric(float64(processCPU(b)-cpu0)/float64(b.N), "cpu-ns/op")
}

func processCPU(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// benchModel is a model on loopback that answers every request on a
// connection with benchAnswer, allocating nothing per request.
func benchModel(b *testing.B) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				br := bufio.NewReaderSize(c, 16<<10)
				for {
					n, err := readHead(br)
					if err != nil {
						return
					}
					if _, err := br.Discard(n); err != nil {
						return
					}
					if _, err := c.Write(benchAnswer); err != nil {
						return
					}
				}
			}()
		}
	}()
	return "http://" + ln.Addr().String()
}

// readHead reads an HTTP/1.1 head and returns its Content-Length.
func readHead(br *bufio.Reader) (int, error) {
	n := -1
	for first := true; ; first = false {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return 0, err
		}
		line = bytes.TrimRight(line, "\r\n")
		if len(line) == 0 {
			break
		}
		if first {
			continue
		}
		k, v, ok := bytes.Cut(line, []byte(":"))
		if ok && bytes.EqualFold(k, []byte("Content-Length")) {
			n = 0
			for _, c := range bytes.TrimSpace(v) {
				n = 10*n + int(c-'0')
			}
		}
	}
	if n < 0 {
		return 0, errors.New("no Content-Length")
	}
	return n, nil
}

// readAnswer reads an answer whole and checks it is a 200.
func readAnswer(br *bufio.Reader) error {
	status, err := br.Peek(12)
	if err != nil {
		return err
	}
	if !bytes.Equal(status[9:12], []byte("200")) {
		return errors.New("status " + string(status[9:12]))
	}
	n, err := readHead(br)
	if err != nil {
		return err
	}
	_, err = br.Discard(n)
	if err == nil && n == 0 {
		err = io.ErrUnexpectedEOF
	}
	return err
}
