package gateway

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
)

// errNoModel: the body is JSON but names no model.
var errNoModel = errors.New(`the JSON body has no "model"`)

// peekModel reads body only as far as the top-level "model" string and
// returns it with every byte read so far, and where in those bytes the
// model's JSON string lies (read[at:end]). The caller sends those bytes and
// then the rest of body upstream, so the model receives the body exactly as
// the client sent it, and a large body (base64 images) that names its model
// early is streamed rather than held.
func peekModel(body io.Reader) (model string, read []byte, at, end int, err error) {
	var buf bytes.Buffer
	dec := json.NewDecoder(io.TeeReader(body, &buf))
	if tok, err := dec.Token(); err != nil {
		return "", buf.Bytes(), 0, 0, err
	} else if tok != json.Delim('{') {
		return "", buf.Bytes(), 0, 0, errors.New("the body is not a JSON object")
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return "", buf.Bytes(), 0, 0, err
		}
		if key, _ := tok.(string); key == "model" {
			keyEnd := dec.InputOffset()
			tok, err := dec.Token()
			if err != nil {
				return "", buf.Bytes(), 0, 0, err
			}
			s, ok := tok.(string)
			if !ok {
				return "", buf.Bytes(), 0, 0, errors.New(`"model" is not a string`)
			}
			end := int(dec.InputOffset())
			at := int(keyEnd) + bytes.IndexByte(buf.Bytes()[keyEnd:end], '"')
			return s, buf.Bytes(), at, end, nil
		}
		// OpenAI's SDKs put "messages" before "model": skip the value
		// whole rather than token by token.
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			return "", buf.Bytes(), 0, 0, err
		}
	}
	return "", buf.Bytes(), 0, 0, errNoModel
}

// withModel replaces the model string read[at:end] with name.
func withModel(read []byte, at, end int, name string) []byte {
	out := make([]byte, 0, len(read)+len(name)+2)
	out = append(out, read[:at]...)
	out = append(out, jsonString(name)...)
	return append(out, read[end:]...)
}
