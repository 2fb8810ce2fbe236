package supervisor

import (
	"bytes"
	"encoding/json"
	"reflect"
	"testing"

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
