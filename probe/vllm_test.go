package probe

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

func vllmServer(t *testing.T, served string, requests *int, completion int) *httptest.Server {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/models", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, `{"object":"list","data":[{"id":%q,"object":"model"}]}`, served)
	})
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, "# TYPE vllm:request_success_total counter\n")
		fmt.Fprintf(w, "vllm:request_success_total{finished_reason=\"stop\",model_name=%q} %d\n", served, *requests)
		fmt.Fprintf(w, "vllm:request_success_total{finished_reason=\"length\",model_name=%q} 1\n", served)
	})
	mux.HandleFunc("POST /v1/completions", func(w http.ResponseWriter, _ *http.Request) {
		if completion != 200 {
			w.WriteHeader(completion)
			return
		}
		*requests++
		fmt.Fprint(w, `{"choices":[{"text":" ok"}]}`)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

func TestIdentity(t *testing.T) {
	n := 0
	srv := vllmServer(t, "mixtral", &n, 200)
	p := NewHTTP()
	ctx := context.Background()
	if err := p.Identity(ctx, srv.URL, "mixtral"); err != nil {
		t.Errorf("own model: %v", err)
	}
	err := p.Identity(ctx, srv.URL, "hermes")
	var ie *IdentityError
	if !errors.As(err, &ie) || err.Error() != "the port answers for mixtral, not hermes: another server shares the port" {
		t.Errorf("foreign model: %v", err)
	}
}

func TestTrafficAndComplete(t *testing.T) {
	n := 41
	srv := vllmServer(t, "m", &n, 200)
	p := NewHTTP()
	ctx := context.Background()
	if got, err := p.Traffic(ctx, srv.URL); err != nil || got != 42 {
		t.Errorf("Traffic = %v, %v; want 42 (all finish reasons)", got, err)
	}
	if err := p.Complete(ctx, srv.URL, "m"); err != nil || n != 42 {
		t.Errorf("Complete: %v (requests %d)", err, n)
	}
	broken := vllmServer(t, "m", &n, 500)
	if err := p.Complete(ctx, broken.URL, "m"); err == nil || err.Error() != "one-token completion: HTTP 500" {
		t.Errorf("Complete on a broken engine: %v", err)
	}
}

func TestFatal(t *testing.T) {
	cases := map[error]bool{
		&StatusError{Code: 503}: true,
		&StatusError{Code: 500}: true,
		&StatusError{Code: 404}: false,
		ErrRefused:              false,
		errors.New("timeout"):   false,
	}
	for err, want := range cases {
		if Fatal(err) != want {
			t.Errorf("Fatal(%v) = %v", err, !want)
		}
	}
}

// fakeClient records what a deep probe asked.
type fakeClient struct {
	traffic     float64
	trafficErr  error
	completions int
	completeErr error
}

func (f *fakeClient) Traffic(context.Context, string) (float64, error) {
	return f.traffic, f.trafficErr
}
func (f *fakeClient) Complete(context.Context, string, string) error {
	f.completions++
	if f.completeErr == nil {
		f.traffic++
	}
	return f.completeErr
}

func TestDeepSchedule(t *testing.T) {
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	d := &Deep{Period: time.Minute, Now: func() time.Time { return now }}
	c := &fakeClient{traffic: 10}
	ctx := context.Background()
	step := func(name string, wantSkipped bool, wantCompletions int) {
		t.Helper()
		skipped, err := d.Check(ctx, c, "http://x", "m")
		if err != nil || skipped != wantSkipped || c.completions != wantCompletions {
			t.Errorf("%s: skipped=%v err=%v completions=%d; want skipped=%v completions=%d", name, skipped, err, c.completions, wantSkipped, wantCompletions)
		}
	}
	step("first check completes", false, 1)
	now = now.Add(30 * time.Second)
	step("not due yet", true, 1)
	now = now.Add(31 * time.Second)
	step("idle model: complete again", false, 2)
	now = now.Add(time.Minute)
	c.traffic += 5 // real traffic since the last deep probe
	step("served traffic: skipped", true, 2)
	now = now.Add(time.Minute)
	step("idle again: complete", false, 3)

	c.completeErr = errors.New("one-token completion: no answer within the deep probe timeout")
	now = now.Add(time.Minute)
	if _, err := d.Check(ctx, c, "http://x", "m"); err == nil {
		t.Error("a hung engine passed the deep probe")
	}
	off := &Deep{Now: func() time.Time { return now }}
	if off.Due() {
		t.Error("period 0 means off")
	}
}
