package control

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"

	"citadel-supervisor/supervisor/control/api"
)

func TestAuthorize(t *testing.T) {
	s := &Server{uid: 990, gid: 991}
	cases := []struct {
		name string
		peer Peer
		ok   bool
	}{
		{"root", Peer{UID: 0, GID: 5}, true},
		{"the daemon's user", Peer{UID: 990, GID: 5}, true},
		{"primary group", Peer{UID: 1000, GID: 991}, true},
		{"supplementary group", Peer{UID: 1000, GID: 1000, Groups: []uint32{27, 991}}, true},
		{"anyone else", Peer{UID: 1000, GID: 1000, Groups: []uint32{27}}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := s.authorize(tc.peer)
			if (err == nil) != tc.ok {
				t.Errorf("authorize(%+v) = %v, want ok=%v", tc.peer, err, tc.ok)
			}
			if err != nil && err.Error() != "permission denied: uid 1000 is not root, the supervisor's user (uid 990) or in its control group (gid 991): you may read but not change state" {
				t.Errorf("message: %v", err)
			}
		})
	}
}

type nobackend struct{ Backend }

func (nobackend) Status(...string) ([]api.Status, error) { return nil, nil }

func listen(t *testing.T, path string) (*Server, error) {
	t.Helper()
	return Listen(Options{Path: path, Logger: zap.NewNop(), Backend: nobackend{}})
}

func TestListenSocketFile(t *testing.T) {
	dir := t.TempDir()

	t.Run("mode 0660", func(t *testing.T) {
		p := filepath.Join(dir, "a.sock")
		s, err := listen(t, p)
		if err != nil {
			t.Fatal(err)
		}
		defer s.ln.Close()
		fi, err := os.Stat(p)
		if err != nil || fi.Mode().Perm() != 0o660 || fi.Mode().Type() != os.ModeSocket {
			t.Errorf("socket mode %v, %v", fi.Mode(), err)
		}
	})
	t.Run("stale socket replaced", func(t *testing.T) {
		p := filepath.Join(dir, "stale.sock")
		ln, err := net.Listen("unix", p)
		if err != nil {
			t.Fatal(err)
		}
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close() // the file stays, nothing answers: a crashed daemon's
		s, err := listen(t, p)
		if err != nil {
			t.Fatalf("stale socket not replaced: %v", err)
		}
		s.ln.Close()
	})
	t.Run("live socket kept", func(t *testing.T) {
		p := filepath.Join(dir, "live.sock")
		ln, err := net.Listen("unix", p)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		if _, err := listen(t, p); err == nil || !strings.Contains(err.Error(), "in use by a running process") {
			t.Errorf("got %v", err)
		}
	})
	t.Run("regular file kept", func(t *testing.T) {
		p := filepath.Join(dir, "file")
		os.WriteFile(p, []byte("precious"), 0o644)
		if _, err := listen(t, p); err == nil || !strings.Contains(err.Error(), "exists and is not a socket") {
			t.Errorf("got %v", err)
		}
		if b, _ := os.ReadFile(p); string(b) != "precious" {
			t.Error("the file was touched")
		}
	})
	t.Run("removed on close", func(t *testing.T) {
		p := filepath.Join(dir, "b.sock")
		s, err := listen(t, p)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		s.Run(ctx) //nolint:errcheck // cancelled at once
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("socket file left behind: %v", err)
		}
	})
}

// TestOpGate: a peer that may only read is refused every operation, an
// unknown one included (refused before being told it does not exist).
func TestOpGate(t *testing.T) {
	s := &Server{o: Options{Logger: zap.NewNop(), Backend: nobackend{}}, uid: 990, gid: 991}
	h := s.routes()
	for _, op := range []string{"stop", "wake", "no-such-op"} {
		r := httptest.NewRequest("POST", "/v1/op/"+op, strings.NewReader(`{"models":["a"]}`))
		r = r.WithContext(context.WithValue(r.Context(), peerKey{}, Peer{UID: 1000, GID: 1000}))
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != http.StatusForbidden || !strings.Contains(w.Body.String(), "you may read but not change state") {
			t.Errorf("%s as a reader: %d %s", op, w.Code, w.Body)
		}
	}
	r := httptest.NewRequest("POST", "/v1/op/no-such-op", strings.NewReader(`{"models":["a"]}`))
	r = r.WithContext(context.WithValue(r.Context(), peerKey{}, Peer{UID: 0}))
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	if w.Code != http.StatusNotFound {
		t.Errorf("unknown op as root: %d %s", w.Code, w.Body)
	}
}
