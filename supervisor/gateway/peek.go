package gateway

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"unicode/utf8"
)

// errNoModel: the body is JSON but names no model.
var errNoModel = errors.New(`the JSON body has no "model"`)

// peekModel reads body only as far as the top-level "model" string and
// returns it with every byte read so far, and where in those bytes the
// model's JSON string lies (read[at:end]). The caller sends those bytes and
// then the rest of body upstream, so the model receives the body exactly as
// the client sent it, and a large body (base64 images) is never decoded:
// values before "model" are skipped by a scan for their end, without
// building them (OpenAI's SDKs put "messages" first).
//
// The scan does not validate what it skips; the model does that, and
// answers a malformed body itself.
func peekModel(body io.Reader) (model string, read []byte, at, end int, err error) {
	s := &scanner{r: body, buf: make([]byte, 0, 4096)}
	fail := func(err error) (string, []byte, int, int, error) { return "", s.buf, 0, 0, err }
	c, err := s.next()
	if err != nil {
		return fail(err)
	}
	if c != '{' {
		return fail(errors.New("the body is not a JSON object"))
	}
	for {
		c, err := s.next()
		if err != nil {
			return fail(err)
		}
		if c == '}' {
			return fail(errNoModel)
		}
		if c == ',' {
			continue
		}
		if c != '"' {
			return fail(errSyntax)
		}
		kStart := s.i - 1
		if err := s.skipString(); err != nil {
			return fail(err)
		}
		key := s.buf[kStart:s.i]
		if c, err := s.next(); err != nil || c != ':' {
			return fail(orSyntax(err))
		}
		if string(key) != `"model"` {
			if err := s.skipValue(); err != nil {
				return fail(err)
			}
			continue
		}
		c, err = s.next()
		if err != nil {
			return fail(err)
		}
		if c != '"' {
			return fail(errors.New(`"model" is not a string`))
		}
		at = s.i - 1
		if err := s.skipString(); err != nil {
			return fail(err)
		}
		end = s.i
		raw := s.buf[at:end]
		if bytes.IndexByte(raw, '\\') < 0 && utf8.Valid(raw) {
			return string(raw[1 : len(raw)-1]), s.buf, at, end, nil
		}
		var name string
		if err := json.Unmarshal(raw, &name); err != nil {
			return fail(err)
		}
		return name, s.buf, at, end, nil
	}
}

var errSyntax = errors.New("the body is not valid JSON")

func orSyntax(err error) error {
	if err != nil {
		return err
	}
	return errSyntax
}

// scanner reads a JSON text incrementally, keeping every byte it read.
type scanner struct {
	r   io.Reader
	buf []byte
	i   int // next byte to look at
	err error
}

// fill reads more; false at the end of the body or on an error.
func (s *scanner) fill() bool {
	if s.err != nil {
		return false
	}
	if len(s.buf) == cap(s.buf) {
		s.buf = append(s.buf, 0)[:len(s.buf)] // grow
	}
	n, err := s.r.Read(s.buf[len(s.buf):cap(s.buf)])
	s.buf = s.buf[:len(s.buf)+n]
	if err != nil {
		s.err = err
	}
	return n > 0 || err == nil
}

func (s *scanner) eof() error {
	if s.err != nil && !errors.Is(s.err, io.EOF) {
		return s.err
	}
	return io.ErrUnexpectedEOF
}

// next returns the next byte that is not white space.
func (s *scanner) next() (byte, error) {
	for {
		for s.i < len(s.buf) {
			c := s.buf[s.i]
			s.i++
			if c != ' ' && c != '\t' && c != '\n' && c != '\r' {
				return c, nil
			}
		}
		if !s.fill() {
			return 0, s.eof()
		}
	}
}

// skipString moves past the string whose opening quote was just read.
func (s *scanner) skipString() error {
	for {
		for s.i < len(s.buf) {
			j := bytes.IndexAny(s.buf[s.i:], `"\`)
			if j < 0 {
				s.i = len(s.buf)
				break
			}
			s.i += j + 1
			if s.buf[s.i-1] == '"' {
				return nil
			}
			// A backslash escapes the next byte, which may not be read yet.
			for s.i >= len(s.buf) {
				if !s.fill() {
					return s.eof()
				}
			}
			s.i++
		}
		if !s.fill() {
			return s.eof()
		}
	}
}

// skipValue moves past one value: a string, an object or array (nesting
// counted, strings skipped whole), or a literal.
func (s *scanner) skipValue() error {
	c, err := s.next()
	if err != nil {
		return err
	}
	switch c {
	case '"':
		return s.skipString()
	case '{', '[':
		depth := 1
		for depth > 0 {
			c, err := s.next()
			if err != nil {
				return err
			}
			switch c {
			case '"':
				if err := s.skipString(); err != nil {
					return err
				}
			case '{', '[':
				depth++
			case '}', ']':
				depth--
			}
		}
		return nil
	default: // number, true, false, null: up to the next delimiter
		for {
			for s.i < len(s.buf) {
				switch s.buf[s.i] {
				case ',', '}', ']', ' ', '\t', '\n', '\r':
					return nil
				}
				s.i++
			}
			if !s.fill() {
				return s.eof()
			}
		}
	}
}

// withModel replaces the model string read[at:end] with name.
func withModel(read []byte, at, end int, name string) []byte {
	out := make([]byte, 0, len(read)+len(name)+2)
	out = append(out, read[:at]...)
	out = append(out, jsonString(name)...)
	return append(out, read[end:]...)
}
