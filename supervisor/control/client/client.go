// Package client is the control socket's client, what citadelctl uses. It
// links only the wire (package api), never the daemon.
package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"

	"citadel-supervisor/supervisor/control/api"
)

// ErrUnreachable means no supervisor answered on the socket.
var ErrUnreachable = errors.New("daemon not reachable")

// Client talks to a supervisor's control socket.
type Client struct {
	path string
	http *http.Client
}

// New returns a client of the socket at path.
func New(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}
	return &Client{path: path, http: &http.Client{Transport: tr}}
}

// Close drops the client's idle connections.
func (c *Client) Close() { c.http.CloseIdleConnections() }

// RequestError is an answer other than success: Code is the HTTP status.
type RequestError struct {
	Code int
	Msg  string
}

func (e *RequestError) Error() string { return e.Msg }

// send makes one request and returns the response for a success (2xx, or
// one of also); any other answer becomes a *RequestError with the daemon's
// message, a failure to connect wraps ErrUnreachable.
func (c *Client) send(ctx context.Context, method, path string, q url.Values, body any, also ...int) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		rd = bytes.NewReader(b)
	}
	u := "http://citadel" + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%w at %s: %w", ErrUnreachable, c.path, err)
	}
	if resp.StatusCode/100 == 2 || slices.Contains(also, resp.StatusCode) {
		return resp, nil
	}
	defer resp.Body.Close()
	var e api.ErrorResponse
	if json.NewDecoder(resp.Body).Decode(&e) != nil || e.Error == "" {
		e.Error = resp.Status
	}
	return nil, &RequestError{Code: resp.StatusCode, Msg: e.Error}
}

// do sends a request and decodes its JSON answer into out. A 503 carries a
// body too (health: not every model is ready).
func (c *Client) do(ctx context.Context, method, path string, q url.Values, body, out any) error {
	resp, err := c.send(ctx, method, path, q, body, http.StatusServiceUnavailable)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("bad answer from the daemon: %w", err)
	}
	return nil
}

// Status returns every model's status, or the named ones'.
func (c *Client) Status(ctx context.Context, models ...string) ([]api.Status, error) {
	var out []api.Status
	err := c.do(ctx, http.MethodGet, api.PathStatus, url.Values{"model": models}, nil, &out)
	return out, err
}

// Op runs start, stop, restart or reset on models ("all" for every one).
func (c *Client) Op(ctx context.Context, op api.Op, models ...string) (api.OpResponse, error) {
	var out api.OpResponse
	err := c.do(ctx, http.MethodPost, api.PathOp+string(op), nil, api.OpRequest{Models: models}, &out)
	return out, err
}

// Reload makes the daemon load its configuration file again.
func (c *Client) Reload(ctx context.Context) (api.ReloadResponse, error) {
	var out api.ReloadResponse
	err := c.do(ctx, http.MethodPost, api.PathReload, nil, nil, &out)
	return out, err
}

// Upgrade asks the daemon to re-execute its binary in place. It answers
// just before the exec; Daemon tells when the new image serves.
func (c *Client) Upgrade(ctx context.Context) (api.UpgradeResponse, error) {
	var out api.UpgradeResponse
	err := c.do(ctx, http.MethodPost, api.PathUpgrade, nil, nil, &out)
	return out, err
}

// Health returns the readiness summary.
func (c *Client) Health(ctx context.Context) (api.Health, error) {
	var out api.Health
	err := c.do(ctx, http.MethodGet, api.PathHealth, nil, nil, &out)
	return out, err
}

// GPUs lists the host's GPUs.
func (c *Client) GPUs(ctx context.Context) (api.GPUsResponse, error) {
	var out api.GPUsResponse
	err := c.do(ctx, http.MethodGet, api.PathGPUs, nil, nil, &out)
	return out, err
}

// Logs calls line for each of a model's last n lines and, with follow, for
// every new line until ctx ends.
func (c *Client) Logs(ctx context.Context, model string, n int, follow bool, line func(string)) error {
	q := url.Values{"model": {model}, "n": {strconv.Itoa(n)}}
	if follow {
		q.Set("follow", "1")
	}
	resp, err := c.send(ctx, http.MethodGet, api.PathLogs, q, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		line(sc.Text())
	}
	if err := sc.Err(); err != nil && ctx.Err() == nil {
		return err
	}
	return nil
}

// Daemon describes the daemon: how it owns the models' processes.
func (c *Client) Daemon(ctx context.Context) (api.Daemon, error) {
	var out api.Daemon
	err := c.do(ctx, http.MethodGet, api.PathDaemon, nil, nil, &out)
	return out, err
}

// Usage returns the gateway's requests and tokens since the daemon started.
func (c *Client) Usage(ctx context.Context) (api.Usage, error) {
	var out api.Usage
	err := c.do(ctx, http.MethodGet, api.PathUsage, nil, nil, &out)
	return out, err
}
