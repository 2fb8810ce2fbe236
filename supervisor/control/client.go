package control

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
	"strconv"

	"citadel-supervisor/supervisor"
)

// ErrUnreachable means no supervisor answered on the socket.
var ErrUnreachable = errors.New("daemon not reachable")

// Client talks to a supervisor's control socket.
type Client struct {
	path string
	http *http.Client
}

// NewClient returns a client of the socket at path.
func NewClient(path string) *Client {
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

func (c *Client) do(ctx context.Context, method, path string, q url.Values, body, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	u := "http://citadel" + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, rd)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%w at %s: %v", ErrUnreachable, c.path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 400 && resp.StatusCode != http.StatusServiceUnavailable {
		var e ErrorResponse
		if json.NewDecoder(resp.Body).Decode(&e) != nil || e.Error == "" {
			e.Error = resp.Status
		}
		return &RequestError{Code: resp.StatusCode, Msg: e.Error}
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("bad answer from the daemon: %w", err)
	}
	return nil
}

// Status returns every model's status, or the named ones'.
func (c *Client) Status(ctx context.Context, models ...string) ([]supervisor.Status, error) {
	var out []supervisor.Status
	err := c.do(ctx, http.MethodGet, PathStatus, url.Values{"model": models}, nil, &out)
	return out, err
}

// Op runs start, stop, restart or reset on models ("all" for every one).
func (c *Client) Op(ctx context.Context, op string, models ...string) (OpResponse, error) {
	var out OpResponse
	err := c.do(ctx, http.MethodPost, PathOp+op, nil, OpRequest{Models: models}, &out)
	return out, err
}

// Reload makes the daemon load its configuration file again.
func (c *Client) Reload(ctx context.Context) (ReloadResponse, error) {
	var out ReloadResponse
	err := c.do(ctx, http.MethodPost, PathReload, nil, nil, &out)
	return out, err
}

// Health returns the readiness summary.
func (c *Client) Health(ctx context.Context) (HealthResponse, error) {
	var out HealthResponse
	err := c.do(ctx, http.MethodGet, PathHealth, nil, nil, &out)
	return out, err
}

// GPUs lists the host's GPUs.
func (c *Client) GPUs(ctx context.Context) (GPUsResponse, error) {
	var out GPUsResponse
	err := c.do(ctx, http.MethodGet, PathGPUs, nil, nil, &out)
	return out, err
}

// Logs calls line for each of a model's last n lines and, with follow, for
// every new line until ctx ends.
func (c *Client) Logs(ctx context.Context, model string, n int, follow bool, line func(string)) error {
	q := url.Values{"model": {model}, "n": {strconv.Itoa(n)}}
	if follow {
		q.Set("follow", "1")
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://citadel"+PathLogs+"?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%w at %s: %v", ErrUnreachable, c.path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e ErrorResponse
		json.NewDecoder(resp.Body).Decode(&e) //nolint:errcheck // fall back to the status
		if e.Error == "" {
			e.Error = resp.Status
		}
		return &RequestError{Code: resp.StatusCode, Msg: e.Error}
	}
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
