package control

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	"go.uber.org/zap"

	"citadel-supervisor/supervisor/control/api"
)

// okBackend accepts every operation on models a and b.
type okBackend struct{ nobackend }

func (okBackend) Do(_ context.Context, _ api.Op, names ...string) (map[string]error, error) {
	out := map[string]error{}
	for _, n := range names {
		if n != "a" && n != "b" && n != "all" {
			return nil, api.ErrUnknownModel
		}
		out[n] = nil
	}
	return out, nil
}

// FuzzOpRequest sends arbitrary bodies and operations to the control API.
// It must answer every one with a status (never panic), and only 200, 400
// or 404.
func FuzzOpRequest(f *testing.F) {
	f.Add("stop", []byte(`{"models":["a"]}`))
	f.Add("start", []byte(`{"models":["all"]}`))
	f.Add("reset", []byte(`{"models":[]}`))
	f.Add("bogus", []byte(`{"models":["a"]}`))
	f.Add("stop", []byte(`{"models":"a"}`))
	f.Add("stop", []byte(`{"models":["a"],"extra":1}`))
	f.Add("restart", []byte("\x00\xff{"))
	s := &Server{o: Options{Logger: zap.NewNop(), Backend: okBackend{}}}
	f.Fuzz(func(t *testing.T, op string, body []byte) {
		req := httptest.NewRequest(http.MethodPost, "/v1/op/x", bytes.NewReader(body))
		req.SetPathValue("op", op)
		req = req.WithContext(context.WithValue(req.Context(), peerKey{}, Peer{UID: 0}))
		w := httptest.NewRecorder()
		// Call the handler directly: the router would reject odd paths
		// before the decoding under test.
		s.mutating(s.op)(w, req)
		switch w.Code {
		case http.StatusOK, http.StatusBadRequest, http.StatusNotFound:
		default:
			t.Fatalf("op %q body %q: status %d: %s", op, body, w.Code, w.Body)
		}
	})
}
