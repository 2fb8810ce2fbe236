package gateway

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

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
		if want := fmt.Sprintf("%x %d", sha256.Sum256([]byte(body)), len(body)); <-got != want {
			t.Errorf("the model received another body")
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
