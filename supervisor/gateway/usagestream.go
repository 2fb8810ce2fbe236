package gateway

import (
	"encoding/json"
	"io"
	"sync/atomic"
)

// usageAppender asks a large streaming body (one held in a mapping or a
// file, over heapBody: images) for its stream's usage as it is sent, by
// adding `,"stream_options":{"include_usage":true}` before the body's
// closing brace when the body says "stream": true and does not ask for
// usage itself. Everything else passes unchanged. It cannot edit what
// passed already, so a stream_options without include_usage true is
// overridden by the added one (JSON's last duplicate wins in vLLM's
// parser, Python's json); its other options are lost. askUsage edits
// bodies in memory more finely.
//
// It follows the JSON as a small state machine: strings and escapes,
// nesting, the top level's keys and the values' first bytes.
type usageAppender struct {
	r   io.Reader
	out []byte // processed, not yet read
	err error

	stack      []byte // open containers, '{' or '['
	inStr, esc bool
	wantKey    bool   // the next string of the innermost object is a key
	key        []byte // the key being read (raw, with its quotes)
	capturing  bool
	afterColon bool
	key1, key2 string // the last key at the top level, and in stream_options
	soDepth    bool   // stream_options' object is open at depth 2
	stream     bool   // "stream": true
	usage      bool   // stream_options.include_usage: true
	closed     bool   // the top level's closing brace passed

	asked atomic.Bool // the addition was made
}

func (u *usageAppender) Read(p []byte) (int, error) {
	for len(u.out) == 0 && u.err == nil {
		n, err := u.r.Read(p)
		u.feed(p[:n])
		u.err = err
	}
	n := copy(p, u.out)
	u.out = u.out[n:]
	if len(u.out) == 0 {
		u.out = nil
		return n, u.err
	}
	return n, nil
}

func (u *usageAppender) feed(b []byte) {
	start := 0
	for i := 0; i < len(b); i++ {
		if u.closed {
			break
		}
		c := b[i]
		if u.inStr {
			switch {
			case u.esc:
				u.esc = false
			case c == '\\':
				u.esc = true
			case c == '"':
				u.inStr = false
			}
			if u.capturing {
				if len(u.key) < 64 {
					u.key = append(u.key, c)
				}
				if !u.inStr {
					u.capturing = false
					u.gotKey()
				}
			}
			continue
		}
		switch c {
		case ' ', '\t', '\n', '\r':
		case '"':
			u.inStr = true
			if len(u.stack) > 0 && u.stack[len(u.stack)-1] == '{' && u.wantKey {
				u.capturing, u.wantKey = true, false
				u.key = append(u.key[:0], c)
			} else {
				u.value(c)
			}
		case ':':
			u.afterColon = true
		case ',':
			if len(u.stack) > 0 && u.stack[len(u.stack)-1] == '{' {
				u.wantKey = true
			}
		case '{', '[':
			soOpens := u.afterColon && len(u.stack) == 1 && u.key1 == "stream_options" && c == '{'
			u.value(c)
			u.stack = append(u.stack, c)
			u.wantKey = c == '{'
			if soOpens {
				u.soDepth = true
			}
		case '}', ']':
			if len(u.stack) == 0 {
				break
			}
			u.stack = u.stack[:len(u.stack)-1]
			u.wantKey = false
			if len(u.stack) == 1 {
				u.soDepth = false
			}
			if len(u.stack) == 0 {
				u.closed = true
				if u.stream && !u.usage {
					u.out = append(u.out, b[start:i]...)
					u.out = append(u.out, `,"stream_options":{"include_usage":true}`...)
					start = i
					u.asked.Store(true)
				}
			}
		default:
			u.value(c)
		}
	}
	u.out = append(u.out, b[start:]...)
}

// gotKey records a key just read, if it is one that matters.
func (u *usageAppender) gotKey() {
	k := string(u.key[1 : len(u.key)-1])
	for _, c := range u.key {
		if c == '\\' { // escaped: decode it (a key cut at 64 bytes stays unknown)
			if json.Unmarshal(u.key, &k) != nil {
				k = ""
			}
			break
		}
	}
	switch {
	case len(u.stack) == 1:
		u.key1 = k
	case len(u.stack) == 2 && u.soDepth:
		u.key2 = k
	}
}

// value notes the first byte of a value.
func (u *usageAppender) value(c byte) {
	if !u.afterColon {
		return
	}
	u.afterColon = false
	switch {
	case len(u.stack) == 1 && u.key1 == "stream":
		u.stream = c == 't'
	case len(u.stack) == 2 && u.soDepth && u.key2 == "include_usage":
		u.usage = c == 't'
	}
}
