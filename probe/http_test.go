package probe

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

func TestHTTPProbe(t *testing.T) {
	block := make(chan struct{})
	defer close(block)
	mux := http.NewServeMux()
	mux.HandleFunc("/ok", func(w http.ResponseWriter, _ *http.Request) {})
	mux.HandleFunc("/dead", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusServiceUnavailable) })
	mux.HandleFunc("/redirect", func(w http.ResponseWriter, r *http.Request) { http.Redirect(w, r, "/ok", http.StatusFound) })
	mux.HandleFunc("/hang", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-block:
		case <-r.Context().Done():
		}
	})
	srv := httptest.NewServer(mux)
	defer srv.Close()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "http://" + ln.Addr().String() + "/health"
	ln.Close()

	cases := []struct {
		name   string
		target string
		check  func(error) bool
	}{
		{"2xx is healthy", srv.URL + "/ok", func(err error) bool { return err == nil }},
		{"503 is a failure with its code", srv.URL + "/dead", func(err error) bool {
			var se *StatusError
			return errors.As(err, &se) && se.Code == 503 && err.Error() == "HTTP 503"
		}},
		{"a redirect is not followed", srv.URL + "/redirect", func(err error) bool {
			var se *StatusError
			return errors.As(err, &se) && se.Code == 302
		}},
		{"closed port is ErrRefused", closed, func(err error) bool { return errors.Is(err, ErrRefused) }},
		{"hang ends at the deadline", srv.URL + "/hang", func(err error) bool {
			return err != nil && err.Error() == "no answer within the probe timeout"
		}},
	}
	p := NewHTTP()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
			defer cancel()
			if err := p.Probe(ctx, tc.target); !tc.check(err) {
				t.Errorf("Probe(%s) = %v", tc.target, err)
			}
		})
	}
}
