package control

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"reflect"
	"testing"

	"go.uber.org/zap"

	"citadel-supervisor/gpu"
	"citadel-supervisor/supervisor/schedule"
)

// fill sets every field of v, recursively, to a value that is not zero, so
// a JSON comparison sees every key.
func fill(v reflect.Value) {
	switch v.Kind() {
	case reflect.Struct:
		for i := range v.NumField() {
			fill(v.Field(i))
		}
	case reflect.String:
		v.SetString("x")
	case reflect.Int, reflect.Int64:
		v.SetInt(7)
	case reflect.Uint64:
		v.SetUint(9)
	case reflect.Float64:
		v.SetFloat(0.5)
	case reflect.Bool:
		v.SetBool(true)
	case reflect.Slice:
		s := reflect.MakeSlice(v.Type(), 1, 1)
		fill(s.Index(0))
		v.Set(s)
	default:
		panic("fill: add a case for " + v.Kind().String())
	}
}

// TestWireGPU keeps the wire's GPU (what citadelctl decodes) in step with
// the supervisor's view (a gpu.Device and the placement): a field added to
// either without the other fails here.
func TestWireGPU(t *testing.T) {
	var v schedule.GPUView
	fill(reflect.ValueOf(&v).Elem())
	want, _ := json.Marshal(v)
	got, _ := json.Marshal(wireGPU(v))
	if !bytes.Equal(got, want) {
		t.Errorf("wire GPU JSON differs from the supervisor's view:\ngot  %s\nwant %s", got, want)
	}
	// No processes stays null, as before.
	v = schedule.GPUView{Device: gpu.Device{UUID: "GPU-a"}, Models: []string{}}
	want, _ = json.Marshal(v)
	got, _ = json.Marshal(wireGPU(v))
	if !bytes.Equal(got, want) {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}

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
