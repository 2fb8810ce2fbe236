package gateway

import (
	"crypto/rand"
	"encoding/hex"
	"strconv"
	"sync/atomic"
)

// Every answer carries X-Request-Id: the client's own when it sent a
// usable one, else a new one. The same id goes to the model (vLLM takes
// X-Request-Id as its own request id, in its logs, since its
// _base_request_id) and into the gateway's log lines, so one id follows a
// request through the client, the gateway and vLLM. OpenAI's SDKs show it
// as the response's request id (`_request_id`, `requestID` on errors).

// maxRequestID bounds a client's id; a longer one is replaced.
const maxRequestID = 128

// requestIDs makes new ids: a random prefix drawn at start and a counter,
// unique across restarts without a random draw per request.
type requestIDs struct {
	prefix string
	n      atomic.Uint64
}

func newIDPrefix() string {
	var b [6]byte
	rand.Read(b[:]) //nolint:errcheck // crypto/rand.Read never fails (Go 1.24)
	return "req_" + hex.EncodeToString(b[:])
}

func (r *requestIDs) next() string {
	var b [64]byte
	return string(strconv.AppendUint(append(b[:0], r.prefix...), r.n.Add(1), 36))
}

// requestID is the client's id if it is usable (printable ASCII without
// spaces or quotes, at most maxRequestID bytes: it is written into log
// lines and headers), else a new one.
func (r *requestIDs) requestID(client string) string {
	if client == "" || len(client) > maxRequestID {
		return r.next()
	}
	for i := 0; i < len(client); i++ {
		if c := client[i]; c <= ' ' || c > '~' || c == '"' || c == '\\' {
			return r.next()
		}
	}
	return client
}
