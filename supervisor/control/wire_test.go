package control

import (
	"bytes"
	"context"
	"net/http"
	"net/http/httptest"
	"testing"

	"go.uber.org/zap"
)

func TestUnknownOp(t *testing.T) {
	s := &Server{o: Options{Logger: zap.NewNop(), Backend: okBackend{}}}
	req := httptest.NewRequest(http.MethodPost, "/v1/op/bogus", bytes.NewReader([]byte(`{"models":["a"]}`)))
	req.SetPathValue("op", "bogus")
	req = req.WithContext(context.WithValue(req.Context(), peerKey{}, Peer{UID: 0}))
	w := httptest.NewRecorder()
	s.mutating(s.op)(w, req)
	if w.Code != http.StatusNotFound || w.Body.String() != `{"error":"unknown operation \"bogus\": use start, stop, restart, reset, sleep, wake"}`+"\n" {
		t.Errorf("got %d %s", w.Code, w.Body)
	}
}
