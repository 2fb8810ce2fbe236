package gateway

import (
	"bytes"
	"errors"
	"io"
)

// The scanner below walks a JSON text held in memory for askUsage
// (usage.go), which edits a small body's top-level members in place. The
// body's model is found earlier, as the body arrives (bodyscan.go).

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
