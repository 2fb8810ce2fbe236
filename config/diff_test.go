package config

import "testing"

// TestSpawnDigest: the digest changes exactly when Diff says Respawn, so a
// daemon adopting a predecessor's process keeps it for the same
// configuration or a policy change, and restarts it for anything the
// process sees.
func TestSpawnDigest(t *testing.T) {
	base := `
gpu: {backend: none}
models:
  a: {model: /m/a, port: 11400}
  b: {model: /m/b, port: 11401}
  c: {model: /m/c, port: 11402, env: {X: "1"}}
  d: {model: /m/d, port: 11403, args: []}
`
	next := `
gpu: {backend: none}
models:
  a: {model: /m/a, port: 11400}
  b: {model: /m/b, port: 11401, probe: {period: 3s}, priority: 5, stop_timeout: 1m}
  c: {model: /m/c, port: 11402, env: {X: "2"}}
  d: {model: /m/d, port: 11403}
`
	old, err := Parse([]byte(base), nil)
	if err != nil {
		t.Fatal(err)
	}
	nw, err := Parse([]byte(next), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range Diff(old, nw) {
		o, _ := old.Model(c.Name)
		n, _ := nw.Model(c.Name)
		same := o.SpawnDigest() == n.SpawnDigest()
		if same != (c.Kind != Respawn) {
			t.Errorf("%s: Diff says %s %v, but the digests are the same: %v", c.Name, c.Kind, c.Fields, same)
		}
		if o.SpawnDigest() != o.SpawnDigest() {
			t.Errorf("%s: the digest is not stable", c.Name)
		}
	}
}
