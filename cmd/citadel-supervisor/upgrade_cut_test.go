//go:build e2e

package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"citadel-supervisor/supervisor/control/client"
	"citadel-supervisor/supervisor/supervisortest"
)

// TestUpgradeEndsLongStreamsWithAnEvent: a stream longer than
// gateway.upgrade_drain, in flight at an upgrade in place, ends with an SSE
// error event that says why and [DONE] (it used to be cut mid-event, like
// a crash); citadelctl is answered quickly throughout the gateway's drain
// (the control socket drains after it); a request sent during the upgrade
// waits in the backlog and is served by the new image.
func TestUpgradeEndsLongStreamsWithAnEvent(t *testing.T) {
	gwPort, httpPort := supervisortest.FreePort(t), supervisortest.FreePort(t)
	top := fmt.Sprintf("listen: 127.0.0.1:%d\ngpu: {backend: none}\ngateway: {listen: 127.0.0.1:%d, upgrade_drain: 1s}\n", httpPort, gwPort)
	s := &site{Site: supervisortest.NewSite(t, top, testModel{Name: "a", Fake: []string{"--fake-token-delay", "100ms"}}), t: t}
	in := newInstalled(t)
	sd := newFakeSystemd(t)
	d := sd.start(s, in.exe)
	gw := fmt.Sprintf("http://127.0.0.1:%d", gwPort)
	supervisortest.WaitGateway(t, d, gw)
	c := client.New(s.Socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// 200 tokens at 100 ms: 20 s, far past the 1 s drain.
	resp, err := http.Post(gw+"/v1/completions", "application/json",
		strings.NewReader(`{"model":"a","prompt":"hi","max_tokens":200,"stream":true}`))
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("stream: %v", err)
	}
	stream := make(chan string, 1)
	go func() {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		stream <- string(b)
	}()

	// Status is polled through the upgrade; each answer must come fast.
	var slow atomic.Int64
	stopPoll := make(chan struct{})
	polled := make(chan struct{})
	go func() {
		defer close(polled)
		for {
			select {
			case <-stopPoll:
				return
			case <-time.After(50 * time.Millisecond):
			}
			pc := client.New(s.Socket)
			start := time.Now()
			pctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			_, err := pc.Status(pctx)
			cancel()
			pc.Close()
			if took := time.Since(start); err != nil || took > 5*time.Second {
				slow.Add(1)
				t.Logf("status during the upgrade: %v after %s", err, took)
			}
		}
	}()

	in.install(t, "v2")
	if _, err := c.Upgrade(ctx); err != nil {
		t.Fatalf("upgrade: %v", err)
	}
	// Sent while the listeners are paused: waits for the new image.
	during := make(chan int, 1)
	go func() {
		code, _ := chat(t, gw, "a")
		during <- code
	}()
	var got string
	select {
	case got = <-stream:
	case <-time.After(30 * time.Second):
		t.Fatal("the stream did not end within 30 s of the upgrade")
	}
	lines := strings.Split(strings.TrimSpace(got), "\n")
	var data []string
	for _, l := range lines {
		if strings.HasPrefix(l, "data: ") {
			data = append(data, strings.TrimPrefix(l, "data: "))
		}
	}
	if n := len(data); n < 3 || data[n-1] != "[DONE]" || !strings.Contains(data[n-2], `"code":"gateway_upgrading"`) {
		t.Errorf("the stream's end: %q", data[max(0, len(data)-2):])
	}
	d.waitFor(t, 30*time.Second, "the new image answering", func() bool {
		dv, err := c.Daemon(ctx)
		return err == nil && dv.Version == "v2"
	})
	select {
	case code := <-during:
		if code != 200 {
			t.Errorf("the request sent during the upgrade: %d", code)
		}
	case <-time.After(30 * time.Second):
		t.Error("the request sent during the upgrade got no answer")
	}
	close(stopPoll)
	<-polled
	if slow.Load() != 0 {
		t.Errorf("%d status calls failed or took over 5 s during the upgrade", slow.Load())
	}
}
