package gateway

import (
	"bytes"
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

// scanner walks a JSON text held whole in buf.
type scanner struct {
	buf []byte
	i   int // next byte to look at
}

// next returns the next byte that is not white space.
func (s *scanner) next() (byte, error) {
	for s.i < len(s.buf) {
		c := s.buf[s.i]
		s.i++
		if c != ' ' && c != '\t' && c != '\n' && c != '\r' {
			return c, nil
		}
	}
	return 0, io.ErrUnexpectedEOF
}

// skipString moves past the string whose opening quote was just read.
func (s *scanner) skipString() error {
	for s.i < len(s.buf) {
		j := bytes.IndexAny(s.buf[s.i:], `"\`)
		if j < 0 {
			break
		}
		s.i += j + 1
		if s.buf[s.i-1] == '"' {
			return nil
		}
		s.i++ // a backslash escapes the next byte
	}
	s.i = len(s.buf)
	return io.ErrUnexpectedEOF
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
		for ; s.i < len(s.buf); s.i++ {
			switch s.buf[s.i] {
			case ',', '}', ']', ' ', '\t', '\n', '\r':
				return nil
			}
		}
		return io.ErrUnexpectedEOF
	}
}
