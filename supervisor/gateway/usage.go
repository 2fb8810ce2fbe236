package gateway

import (
	"bytes"
	"encoding/json"
	"io"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

// Token accounting. A key's tokens_per_minute, citadel_gateway_tokens_total
// and `citadelctl usage` count what the models report in each answer's
// `usage`: a JSON answer carries it; a stream carries it in a last chunk
// (choices empty, usage set) only when the request asks with
// stream_options.include_usage, which vLLM honours since 0.4 (its
// serving_chat.py and serving_completion.py). A stream that did not ask is
// asked for it upstream, and that chunk is kept from the client: every
// other byte of the stream reaches the client as vLLM wrote it.

// tokenUsage is one answer's usage.
type tokenUsage struct {
	Prompt     int `json:"prompt_tokens"`
	Completion int `json:"completion_tokens"`
}

// askUsage returns body asking for the stream's usage when it is a
// streaming request that does not ask (stream true, no
// stream_options.include_usage true), and whether it changed it. stream
// reports "stream": true. Other bodies come back as they are.
//
// Edits, each the smallest that works: no stream_options (or null, or
// {}) → `"stream_options":{"include_usage":true}` added; stream_options
// without include_usage → `"include_usage":true,` put first in it;
// include_usage false → true.
func askUsage(body []byte) (out []byte, asked, stream bool) {
	type span struct{ at, end int }
	var so, st span
	closeAt, err := members(body, func(key string, at, end int) {
		switch key {
		case "stream":
			st = span{at, end}
		case "stream_options":
			so = span{at, end}
		}
	})
	if err != nil || st.end == 0 || string(body[st.at:st.end]) != "true" {
		return body, false, false
	}
	const want = `{"include_usage":true}`
	value := bytes.TrimSpace(body[so.at:so.end])
	switch {
	case so.end == 0:
		return splice(body, closeAt, closeAt, `,"stream_options":`+want), true, true
	case string(value) == "null" || (len(value) > 1 && value[0] == '{' && len(bytes.TrimSpace(value[1:len(value)-1])) == 0):
		return splice(body, so.at, so.end, want), true, true
	case value[0] != '{':
		return body, false, true // not an object: vLLM refuses it itself
	}
	inner := body[so.at:so.end]
	var iu span
	if _, err := members(inner, func(key string, at, end int) {
		if key == "include_usage" {
			iu = span{so.at + at, so.at + end}
		}
	}); err != nil {
		return body, false, true
	}
	switch {
	case iu.end == 0:
		open := so.at + bytes.IndexByte(inner, '{') + 1
		return splice(body, open, open, `"include_usage":true,`), true, true
	case string(body[iu.at:iu.end]) == "true":
		return body, false, true // the client asked: its chunk is its own
	}
	return splice(body, iu.at, iu.end, "true"), true, true
}

// members calls fn with each key of the JSON object in b and where its
// value lies (b[at:end], white space trimmed), and returns where the
// object's closing brace is.
func members(b []byte, fn func(key string, at, end int)) (closeAt int, err error) {
	return rawMembers(b, func(raw []byte, at, end int) error {
		var key string
		if err := json.Unmarshal(raw, &key); err != nil {
			return err
		}
		fn(key, at, end)
		return nil
	})
}

// rawMembers is members with each key as it is written, quotes included.
func rawMembers(b []byte, fn func(key []byte, at, end int) error) (closeAt int, err error) {
	s := scanner{buf: b}
	if c, err := s.next(); err != nil || c != '{' {
		return 0, orSyntax(err)
	}
	for {
		c, err := s.next()
		if err != nil {
			return 0, err
		}
		switch c {
		case '}':
			return s.i - 1, nil
		case ',':
			continue
		case '"':
		default:
			return 0, errSyntax
		}
		kStart := s.i - 1
		if err := s.skipString(); err != nil {
			return 0, err
		}
		key := b[kStart:s.i]
		if c, err := s.next(); err != nil || c != ':' {
			return 0, orSyntax(err)
		}
		if _, err := s.next(); err != nil {
			return 0, err
		}
		s.i-- // skipValue reads the value's first byte itself
		at := s.i
		if err := s.skipValue(); err != nil {
			return 0, err
		}
		if err := fn(key, at, s.i); err != nil {
			return 0, err
		}
	}
}

func splice(b []byte, at, end int, with string) []byte {
	out := make([]byte, 0, len(b)-(end-at)+len(with))
	out = append(out, b[:at]...)
	out = append(out, with...)
	return append(out, b[end:]...)
}

// usageTap reads an answer's usage as it passes, changing nothing.
type usageTap interface {
	io.ReadCloser
	// result is the usage (ok false: none seen) and, for a stream, the
	// times of its first and last events and how many it had.
	result() (u tokenUsage, ok bool, s streamTimes)
}

type streamTimes struct {
	first, last time.Time
	events      int
}

// jsonTap keeps the tail of a JSON answer, where vLLM writes "usage"
// (after "choices" or "data"; only prompt_logprobs and
// kv_transfer_params may follow it), and reads it at the end.
type jsonTap struct {
	src    io.ReadCloser
	tail   []byte // from tails (pooled), until result
	pooled *[]byte

	done bool
	u    tokenUsage
	ok   bool
}

// tails are the JSON taps' tails: most answers are small, and one slice
// per answer would be garbage on every request.
var tails = sync.Pool{New: func() any { b := make([]byte, 0, 4<<10); return &b }}

// maxPooledTail: a larger tail (a long answer's) is not kept for another.
const maxPooledTail = 16 << 10

// jsonTail bounds what a JSON answer's tap keeps.
const jsonTail = 64 << 10

func (t *jsonTap) Read(p []byte) (int, error) {
	n, err := t.src.Read(p)
	if n > 0 && !t.done {
		if t.pooled == nil {
			t.pooled = tails.Get().(*[]byte)
			t.tail = (*t.pooled)[:0]
		}
		if n >= jsonTail {
			t.tail = append(t.tail[:0], p[n-jsonTail:n]...)
		} else {
			if over := len(t.tail) + n - jsonTail; over > 0 {
				t.tail = t.tail[:copy(t.tail, t.tail[over:])]
			}
			t.tail = append(t.tail, p[:n]...)
		}
	}
	return n, err
}

func (t *jsonTap) Close() error { return t.src.Close() }

// result reads the usage in the tail, and gives the tail back: call it
// once the answer was read.
func (t *jsonTap) result() (tokenUsage, bool, streamTimes) {
	if !t.done {
		t.done = true
		t.u, t.ok = lastUsage(t.tail)
		if t.pooled != nil && cap(t.tail) <= maxPooledTail {
			*t.pooled = t.tail[:0]
			tails.Put(t.pooled)
		}
		t.tail, t.pooled = nil, nil
	}
	return t.u, t.ok, streamTimes{}
}

// lastUsage finds the last "usage" member in b and decodes it. Inside a
// JSON string a quote is escaped, so `"usage"` followed by a colon is
// always a key; the last one of an OpenAI answer is the top level's.
func lastUsage(b []byte) (tokenUsage, bool) {
	for end := len(b); ; {
		i := bytes.LastIndex(b[:end], []byte(`"usage"`))
		if i < 0 {
			return tokenUsage{}, false
		}
		end = i
		rest := bytes.TrimLeft(b[i+len(`"usage"`):], " \t\r\n")
		if len(rest) == 0 || rest[0] != ':' {
			continue
		}
		// Only the usage object is decoded: find its end first.
		sc := scanner{buf: rest[1:]}
		if sc.skipValue() != nil {
			continue
		}
		obj := rest[1 : 1+sc.i]
		if u, ok, sure := plainUsage(obj); sure {
			if !ok {
				continue
			}
			return u, true
		}
		var u *tokenUsage
		if err := json.Unmarshal(obj, &u); err != nil || u == nil {
			continue
		}
		return *u, true
	}
}

// plainUsage reads a usage object as json.Unmarshal into *tokenUsage
// would, without its reflection and allocations, when the object is the
// plain one vLLM writes: valid JSON whose members' keys have no escapes
// and whose two counts, when present, are plain integers. sure false:
// anything else (a key that matches a count's but for its case, a count
// that is a float, null or out of range), left to json.Unmarshal.
func plainUsage(obj []byte) (u tokenUsage, ok, sure bool) {
	v := bytes.TrimLeft(obj, " \t\r\n")
	if len(v) == 0 || v[0] != '{' || !json.Valid(obj) {
		return tokenUsage{}, false, false
	}
	sure = true
	_, err := rawMembers(v, func(key []byte, at, end int) error {
		var dst *int
		switch {
		case string(key) == `"prompt_tokens"`:
			dst = &u.Prompt
		case string(key) == `"completion_tokens"`:
			dst = &u.Completion
		case bytes.IndexByte(key, '\\') >= 0 || bytes.EqualFold(key, []byte(`"prompt_tokens"`)) || bytes.EqualFold(key, []byte(`"completion_tokens"`)):
			sure = false
			return nil
		default:
			return nil
		}
		n, isInt := plainInt(v[at:end])
		if !isInt {
			sure = false
			return nil
		}
		*dst = n
		return nil
	})
	if err != nil {
		return tokenUsage{}, false, false
	}
	return u, sure, sure
}

// plainInt reads a JSON integer of at most 18 digits, sign allowed.
func plainInt(b []byte) (int, bool) {
	neg := len(b) > 0 && b[0] == '-'
	if neg {
		b = b[1:]
	}
	if len(b) == 0 || len(b) > 18 {
		return 0, false
	}
	n := 0
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = 10*n + int(c-'0')
	}
	if neg {
		n = -n
	}
	return n, true
}

// sseTap passes a stream's events through as they come, reads the usage
// chunk, and drops it when the gateway asked for it (strip). It frames
// events (vLLM ends each with a blank line, "\n\n") so the usage chunk
// is dropped whole; an event is held only until its end arrives, and one
// too large to be a usage chunk is passed on without waiting for its end.
type sseTap struct {
	src   io.ReadCloser
	strip bool
	now   func() time.Time

	buf     []byte // read, not yet framed
	out     []byte // framed, to give out from outPos
	outPos  int
	passing bool // in an event too large to be a usage chunk
	prevNL  bool // the last byte passed on in passing mode was '\n'
	err     error

	usage tokenUsage
	ok    bool
	times streamTimes
}

// maxUsageEvent: a usage chunk (id, object, created, model, empty
// choices, usage) is a few hundred bytes.
const maxUsageEvent = 4 << 10

func (t *sseTap) Read(p []byte) (int, error) {
	for t.outPos == len(t.out) && t.err == nil {
		// The buffers keep their capacity between reads.
		t.out, t.outPos = t.out[:0], 0
		// p is the read buffer too: feed copies what it keeps.
		n, err := t.src.Read(p)
		t.feed(p[:n])
		if err != nil {
			t.err = err
			if len(t.buf) > 0 { // a last event without its blank line
				t.out = append(t.out, t.buf...)
				t.buf = t.buf[:0]
			}
		}
	}
	n := copy(p, t.out[t.outPos:])
	t.outPos += n
	if t.outPos == len(t.out) && t.err != nil {
		return n, t.err
	}
	return n, nil
}

func (t *sseTap) feed(b []byte) {
	for len(b) > 0 {
		if t.passing {
			end := -1
			if t.prevNL && b[0] == '\n' {
				end = 1
			} else if i := bytes.Index(b, []byte("\n\n")); i >= 0 {
				end = i + 2
			}
			if end < 0 {
				t.out = append(t.out, b...)
				t.prevNL = b[len(b)-1] == '\n'
				return
			}
			t.out = append(t.out, b[:end]...)
			b = b[end:]
			t.passing, t.prevNL = false, false
			t.event(nil) // its content counts as an event
			continue
		}
		t.buf = append(t.buf, b...)
		b = nil
		rest := t.buf
		for {
			i := bytes.Index(rest, []byte("\n\n"))
			if i < 0 {
				break
			}
			ev := rest[:i+2]
			if t.event(ev) {
				t.out = append(t.out, ev...)
			}
			rest = rest[i+2:]
		}
		// What is left of an event moves to the front: the buffer keeps
		// its capacity, at most an event's worth.
		t.buf = t.buf[:copy(t.buf, rest)]
		if len(t.buf) > maxUsageEvent {
			t.out = append(t.out, t.buf...)
			t.prevNL = t.buf[len(t.buf)-1] == '\n'
			t.buf = t.buf[:0]
			t.passing = true
		}
	}
}

// event looks at one whole event (nil: a large one already passed on)
// and reports whether it goes to the client.
func (t *sseTap) event(ev []byte) bool {
	now := t.now()
	data, isData := bytes.CutPrefix(ev, []byte("data:"))
	data = bytes.TrimSpace(data)
	if ev != nil && (!isData || bytes.Equal(data, []byte("[DONE]"))) {
		return true
	}
	if ev != nil && bytes.Contains(data, []byte(`"usage"`)) {
		var c struct {
			Choices []json.RawMessage `json:"choices"`
			Usage   *tokenUsage       `json:"usage"`
		}
		if json.Unmarshal(data, &c) == nil && c.Usage != nil {
			t.usage, t.ok = *c.Usage, true
			if len(c.Choices) == 0 {
				return !t.strip // the usage chunk: the client's only if it asked
			}
		}
	}
	if t.times.events == 0 {
		t.times.first = now
	}
	t.times.last = now
	t.times.events++
	return true
}

func (t *sseTap) Close() error { return t.src.Close() }

func (t *sseTap) result() (tokenUsage, bool, streamTimes) { return t.usage, t.ok, t.times }

// usageTable counts each (model, key)'s requests and tokens since the
// daemon started, for `citadelctl usage`. Its rows are bounded by models
// times keys, and outlive a model's removal (its metrics do not).
type usageTable struct {
	rows sync.Map // usageKey → *usageRow
}

type usageKey struct{ model, key string }

type usageRow struct {
	requests, prompt, completion atomic.Int64
}

func (t *usageTable) row(model, key string) *usageRow {
	k := usageKey{model, key}
	if r, ok := t.rows.Load(k); ok {
		return r.(*usageRow)
	}
	r, _ := t.rows.LoadOrStore(k, &usageRow{})
	return r.(*usageRow)
}

// UsageRow is one model's and key's totals since the daemon started.
type UsageRow struct {
	Model, Key                   string
	Requests, Prompt, Completion int64
}

// Usage lists every (model, key) that had a request, sorted.
func (g *Gateway) Usage() []UsageRow {
	var out []UsageRow
	g.usage.rows.Range(func(k, v any) bool {
		uk, r := k.(usageKey), v.(*usageRow)
		out = append(out, UsageRow{Model: uk.model, Key: uk.key, Requests: r.requests.Load(), Prompt: r.prompt.Load(), Completion: r.completion.Load()})
		return true
	})
	sort.Slice(out, func(i, j int) bool {
		if out[i].Model != out[j].Model {
			return out[i].Model < out[j].Model
		}
		return out[i].Key < out[j].Key
	})
	return out
}

// account charges an answer's tokens to its key and counts them. A stream
// whose usage never came (the client left, the model died) is charged its
// events as completion tokens: vLLM sends one per token.
func (g *Gateway) account(req *reqInfo, u tokenUsage, ok bool, st streamTimes) {
	if !ok {
		if st.events == 0 {
			return
		}
		u = tokenUsage{Completion: st.events}
	}
	if u.Prompt < 0 || u.Completion < 0 {
		return
	}
	req.keyState.charge(g.now(), u.Prompt+u.Completion)
	row := g.usage.row(req.model, req.key)
	row.prompt.Add(int64(u.Prompt))
	row.completion.Add(int64(u.Completion))
	m := g.metrics
	s, routed := g.seriesOf(req.model)
	if !routed {
		return // removed by a reload meanwhile: no series may come back
	}
	s.counter(m, req.model, famPrompt, 0, req.key).Add(float64(u.Prompt))
	s.counter(m, req.model, famCompletion, 0, req.key).Add(float64(u.Completion))
	if ok && u.Completion > 1 && st.events > 1 {
		s.observer(m, req.model, famTPOT).Observe(st.last.Sub(st.first).Seconds() / float64(u.Completion-1))
	}
}
