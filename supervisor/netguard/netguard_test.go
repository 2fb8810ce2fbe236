package netguard

import (
	"errors"
	"net"
	"testing"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// TestCap: with n connections open, Accept waits; closing one lets the next in.
func TestCap(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := Limit(inner, 2, zap.NewNop())
	defer l.Close()
	accepted := make(chan net.Conn, 3)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	for range 3 {
		c, err := net.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
	}
	var got []net.Conn
	for range 2 {
		select {
		case c := <-accepted:
			got = append(got, c)
		case <-time.After(5 * time.Second):
			t.Fatal("first two connections not accepted")
		}
	}
	select {
	case <-accepted:
		t.Fatal("a third connection was accepted over the cap of 2")
	case <-time.After(200 * time.Millisecond):
	}
	got[0].Close()
	got[0].Close() // twice: the slot is given back once
	select {
	case c := <-accepted:
		c.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("the third connection was not accepted after one closed")
	}
	got[1].Close()
}

// TestShedOnEMFILE: with no descriptor left, Accept does not spin on
// EMFILE nor hand it to the server: the waiting client is refused (its
// connection closed), and once descriptors are back, Accept works again.
func TestShedOnEMFILE(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := Limit(inner, 8, zap.NewNop())
	defer l.Close()
	client, err := net.Dial("tcp", inner.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	var old unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	low := old
	low.Cur = 256
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	var held []int
	for {
		fd, err := unix.Open("/dev/null", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			if !errors.Is(err, unix.EMFILE) {
				t.Fatal(err)
			}
			break
		}
		held = append(held, fd)
	}
	release := func() {
		for _, fd := range held {
			unix.Close(fd)
		}
		held = nil
		unix.Setrlimit(unix.RLIMIT_NOFILE, &old) //nolint:errcheck // restoring
	}
	defer release()

	done := make(chan error, 1)
	go func() {
		c, err := l.Accept()
		if err == nil {
			c.Close()
		}
		done <- err
	}()
	// The shed client reads EOF (or a reset): refused, not left hanging.
	client.SetReadDeadline(time.Now().Add(5 * time.Second)) //nolint:errcheck // checked by Read
	if _, err := client.Read(make([]byte, 1)); err == nil || errors.Is(err, unix.ETIMEDOUT) || isTimeout(err) {
		t.Errorf("client under EMFILE: %v, want EOF or reset", err)
	}
	release()
	next, err := net.Dial("tcp", inner.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Accept after descriptors came back: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Accept did not return after descriptors came back")
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestPerAddressCap: one address may hold n connections; the next is
// handed to refuse and closed at once, Accept goes on, and a connection
// closed frees its address's place.
func TestPerAddressCap(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	l := Limit(inner, 16, zap.NewNop())
	refused := make(chan struct{}, 4)
	l.LimitPerAddress(2, func(c net.Conn) {
		c.Write([]byte("no\n")) //nolint:errcheck // the client reads it
		refused <- struct{}{}
	})
	defer l.Close()
	accepted := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	dial := func() net.Conn {
		c, err := net.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	dial()
	dial()
	first := <-accepted
	<-accepted
	third := dial()
	third.SetReadDeadline(time.Now().Add(5 * time.Second)) //nolint:errcheck // checked by Read
	b := make([]byte, 8)
	if n, _ := third.Read(b); string(b[:n]) != "no\n" {
		t.Errorf("the third connection read %q, want the refusal", b[:n])
	}
	if per, _ := l.Refused(); per != 1 {
		t.Errorf("refused per address: %d", per)
	}
	first.Close()
	dial()
	select {
	case c := <-accepted:
		c.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("a place freed by a close was not given to the next connection")
	}
}

// TestGatewayLimit: the cap leaves every reserve, and stays within its
// bounds.
func TestGatewayLimit(t *testing.T) {
	for _, tc := range []struct{ nofile, models, want int }{
		{65536, 7, MaxGatewayConns},
		{20000, 7, MaxGatewayConns},
		{8192, 7, (8192 - ReserveBase - 256 - 2*64 - 7*ReservePerModel) / PerGatewayConn},
		{2048, 2, (2048 - ReserveBase - 256 - 2*64 - 2*ReservePerModel) / PerGatewayConn},
		{1024, 7, 16},
	} {
		if got := GatewayLimit(tc.nofile, tc.models); got != tc.want {
			t.Errorf("GatewayLimit(%d, %d) = %d, want %d", tc.nofile, tc.models, got, tc.want)
		}
	}
	// What the gateway can hold at its cap, with every reserve, fits.
	for _, n := range []int{1024, 4096, 20000, 65536} {
		http, control := limitsFor(n)
		used := GatewayLimit(n, 7)*PerGatewayConn + ReserveBase + http + 2*control + 7*ReservePerModel
		if used > n && GatewayLimit(n, 7) > 16 {
			t.Errorf("nofile %d: %d descriptors at the cap", n, used)
		}
	}
}
