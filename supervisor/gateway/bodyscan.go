package gateway

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"unicode/utf8"
)

// bodyScan finds the top-level "model" of a JSON object as the body's bytes
// arrive, in constant memory: the body itself is kept elsewhere (bodies.go)
// and never decoded. It reports where the model's JSON string lies in the
// body (at, end), so the gateway can put the served name in its place, and
// it refuses a body that names a model twice: the gateway would route by
// one occurrence and vLLM (Python's json, the last key wins) serve the
// other, so queues, limits and keys would follow one model while the
// engine served another. Keys are compared after unescaping, so
// "mod\u0065l" is "model" too.
//
// It does not validate what it skips (numbers, nested values); the model
// does that, and answers a malformed body itself.
type bodyScan struct {
	state scanState
	pos   int64 // offset of the next byte
	depth int   // nesting inside the current top-level value
	inStr bool  // inside a string within a nested value
	esc   bool  // the previous byte was a backslash inside a string

	key     []byte // the current top-level key, raw, up to maxKeyScan bytes
	keyLong bool   // longer than that: not "model" however it is escaped

	model   []byte // the model's JSON string, raw, quotes included
	models  int    // top-level "model" keys seen
	at, end int64  // where the model's string lies in the body
	name    string // the model, decoded
	// stream: the top-level "stream" is true (the last one, as vLLM's
	// parser reads a duplicate): a streaming chat or completion, whose
	// client is sent comments while it waits (held.go).
	stream bool
	err    error

	keyBuf   [maxKeyScan]byte
	modelBuf [64]byte
}

type scanState uint8

const (
	scanStart    scanState = iota // before the object
	scanKey                       // expecting a key, '}' (or a stray ',')
	scanInKey                     // inside a key
	scanColon                     // after a key
	scanValue                     // expecting a value
	scanInModel                   // inside the model's string
	scanInString                  // inside a top-level string value
	scanNested                    // inside a top-level object or array value
	scanLiteral                   // inside a number, true, false or null
	scanAfter                     // after a value: ',' or '}'
	scanDone                      // after the object: white space only
)

// maxKeyScan: a key longer than this cannot be "model", even with every
// letter escaped (`"\u006d\u006f\u0064\u0065\u006c"` is 32 bytes).
const maxKeyScan = 64

// maxModelName bounds the model's name as sent; a name longer than this
// names no model (the longest served names are a few dozen bytes).
const maxModelName = 1024

var (
	errNoModel       = errors.New(`the JSON body has no "model"`)
	errSyntax        = errors.New("the body is not valid JSON")
	errNotObject     = errors.New("the body is not a JSON object")
	errModelNotStr   = errors.New(`"model" is not a string`)
	errDuplicate     = errors.New(`the body names "model" more than once; name it once`)
	errModelTooLong  = fmt.Errorf("the model name is longer than %d bytes", maxModelName)
	errTrailing      = errors.New("the body has more after its JSON object")
	errUnexpectedEnd = errors.New("the body ended inside its JSON object")
)

func isSpace(c byte) bool { return c == ' ' || c == '\t' || c == '\n' || c == '\r' }

// write scans the next bytes of the body. Once it returns an error, the
// body is refused and further bytes are not looked at.
func (s *bodyScan) write(p []byte) error {
	if s.err != nil {
		return s.err
	}
	if s.key == nil {
		// Most keys and models fit these: no allocation per body.
		s.key, s.model = s.keyBuf[:0], s.modelBuf[:0]
	}
	for i := 0; i < len(p); {
		c := p[i]
		switch s.state {
		case scanStart:
			if !isSpace(c) {
				if c != '{' {
					return s.fail(errNotObject)
				}
				s.state = scanKey
			}
		case scanKey:
			switch {
			case isSpace(c), c == ',':
			case c == '}':
				s.state = scanDone
			case c == '"':
				s.key, s.keyLong = s.key[:0], false
				s.key = append(s.key, c)
				s.state = scanInKey
			default:
				return s.fail(errSyntax)
			}
		case scanInKey:
			if len(s.key) >= maxKeyScan {
				s.keyLong = true
			} else {
				s.key = append(s.key, c)
			}
			switch {
			case s.esc:
				s.esc = false
			case c == '\\':
				s.esc = true
			case c == '"':
				s.state = scanColon
			}
		case scanColon:
			if !isSpace(c) {
				if c != ':' {
					return s.fail(errSyntax)
				}
				s.state = scanValue
			}
		case scanValue:
			if isSpace(c) {
				break
			}
			if s.isModelKey() {
				s.models++
				if s.models > 1 {
					return s.fail(errDuplicate)
				}
				if c != '"' {
					return s.fail(errModelNotStr)
				}
				s.at = s.pos + int64(i)
				s.model = append(s.model[:0], c)
				s.state = scanInModel
				break
			}
			if s.isKey("stream") {
				s.stream = c == 't'
			}
			switch c {
			case '"':
				s.state = scanInString
			case '{', '[':
				s.depth, s.inStr = 1, false
				s.state = scanNested
			default:
				s.state = scanLiteral
			}
		case scanInModel:
			if len(s.model) >= maxModelName+2 {
				return s.fail(errModelTooLong)
			}
			s.model = append(s.model, c)
			switch {
			case s.esc:
				s.esc = false
			case c == '\\':
				s.esc = true
			case c == '"':
				s.end = s.pos + int64(i) + 1
				name, err := decodeString(s.model)
				if err != nil {
					return s.fail(err)
				}
				s.name = name
				s.state = scanAfter
			}
		case scanInString:
			// Strings are most of a body (messages, base64 images): jump
			// to the next quote or backslash.
			if j := s.skipString(p[i:]); j >= 0 {
				i += j + 1
				s.state = scanAfter
				continue
			}
			i = len(p)
			continue
		case scanNested:
			if s.inStr {
				if j := s.skipString(p[i:]); j >= 0 {
					i += j + 1
					s.inStr = false
					continue
				}
				i = len(p)
				continue
			}
			switch c {
			case '"':
				s.inStr = true
			case '{', '[':
				s.depth++
			case '}', ']':
				s.depth--
				if s.depth == 0 {
					s.state = scanAfter
				}
			}
		case scanLiteral:
			switch {
			case c == ',':
				s.state = scanKey
			case c == '}':
				s.state = scanDone
			case isSpace(c):
				s.state = scanAfter
			}
		case scanAfter:
			switch {
			case isSpace(c):
			case c == ',':
				s.state = scanKey
			case c == '}':
				s.state = scanDone
			default:
				return s.fail(errSyntax)
			}
		case scanDone:
			if !isSpace(c) {
				return s.fail(errTrailing)
			}
		}
		i++
	}
	s.pos += int64(len(p))
	return nil
}

// skipString moves through a string's bytes (its opening quote already
// read) and returns the index in p of its closing quote, or -1 when p ends
// first (the escape state is kept for the next bytes).
func (s *bodyScan) skipString(p []byte) int {
	i := 0
	if s.esc {
		if len(p) == 0 {
			return -1
		}
		s.esc = false
		i = 1
	}
	for i < len(p) {
		j := bytes.IndexAny(p[i:], `"\`)
		if j < 0 {
			return -1
		}
		i += j
		if p[i] == '"' {
			return i
		}
		// A backslash escapes the next byte, which may be in the next write.
		if i+1 >= len(p) {
			s.esc = true
			return -1
		}
		i += 2
	}
	return -1
}

func (s *bodyScan) fail(err error) error {
	s.err = err
	return err
}

// isModelKey reports whether the key just read is "model", escaped or not.
func (s *bodyScan) isModelKey() bool { return s.isKey("model") }

// isKey reports whether the key just read is name, escaped or not.
func (s *bodyScan) isKey(name string) bool {
	if s.keyLong {
		return false
	}
	if len(s.key) == len(name)+2 && string(s.key[1:len(s.key)-1]) == name {
		return true
	}
	if bytes.IndexByte(s.key, '\\') < 0 {
		return false
	}
	k, err := decodeString(s.key)
	return err == nil && k == name
}

// finish is called at the end of the body: the model, or why there is none.
func (s *bodyScan) finish() (string, error) {
	if s.err != nil {
		return "", s.err
	}
	switch s.state {
	case scanDone:
	case scanStart:
		return "", errNotObject
	default:
		return "", errUnexpectedEnd
	}
	if s.models == 0 {
		return "", errNoModel
	}
	return s.name, nil
}

// decodeString decodes a JSON string, quotes included.
func decodeString(raw []byte) (string, error) {
	if bytes.IndexByte(raw, '\\') < 0 && utf8.Valid(raw) {
		return string(raw[1 : len(raw)-1]), nil
	}
	var out string
	if err := json.Unmarshal(raw, &out); err != nil {
		return "", errSyntax
	}
	return out, nil
}
