package gateway

import (
	"fmt"
	"math"
	"net/http"
	"strconv"
	"time"
	"unicode/utf8"
)

// apiError is an answer the gateway gives itself, in OpenAI's shape
// ({"error":{"message","type","param","code"}}), so OpenAI clients raise
// their usual exceptions (RateLimitError, APIStatusError …).
type apiError struct {
	status     int
	typ        string // OpenAI's error type
	code       string // machine-readable cause
	msg        string
	retryAfter time.Duration // Retry-After, when > 0
	// reject is citadel_gateway_rejected_total's reason; "" counts none.
	reject string
	// final: only an operator can fix it (the model failed, is held
	// stopped, disabled or removed): the answer says x-should-retry:
	// false, which OpenAI's SDKs obey instead of retrying a 503 in vain.
	final bool
}

func (e *apiError) Error() string { return e.msg }

// Rejection reasons, the values of citadel_gateway_rejected_total's reason.
const (
	RejectUnauthorized = "unauthorized"  // no listed bearer token
	RejectUnknownModel = "unknown_model" // no model of that name
	RejectQueueFull    = "queue_full"    // max_concurrency reached and max_queue waiting
	RejectMaxWait      = "max_wait"      // waited gateway.max_wait
	RejectUnavailable  = "unavailable"   // failed, held stopped, disabled or removed
	RejectBadRequest   = "bad_request"   // no JSON body naming a model, a path never forwarded, a body too large
	RejectRateLimit    = "rate_limit"    // the key's requests_per_minute or tokens_per_minute
	RejectScope        = "scope"         // the key may not use the model (gateway.keys.NAME.models)
	RejectClientStall  = "client_stall"  // the client stopped sending its body (408)
	RejectBodyBudget   = "body_budget"   // the gateway holds as many bodies as gateway.body_memory and body_spool allow
)

// retryBusy is the Retry-After for a ready model that is busy: it frees a
// slot as soon as one request ends. A model that is not ready says how
// long it will likely take (eta.go).
const retryBusy = time.Second

// errClientGone marks a request whose client went away; nothing is written.
var errClientGone = &apiError{status: statusClientGone, msg: "client closed the request"}

// statusClientGone is nginx's 499, the code metrics and logs record for a
// request its client abandoned.
const statusClientGone = 499

func errUnavailable(reason string) *apiError {
	return &apiError{status: http.StatusServiceUnavailable, typ: "server_error", code: "model_unavailable", msg: reason, reject: RejectUnavailable, final: true}
}

// errQueueFull: retry is how long the model will likely take to be ready
// (eta.go), or a second when it is only busy.
func errQueueFull(maxQueue int, busy bool, retry time.Duration) *apiError {
	what := "is not ready"
	if busy {
		what = "is at max_concurrency"
	}
	return &apiError{status: http.StatusTooManyRequests, typ: "rate_limit_error", code: "queue_full",
		msg:        fmt.Sprintf("the model %s and %d requests are already waiting (gateway.max_queue); retry later", what, maxQueue),
		retryAfter: retry, reject: RejectQueueFull}
}

func errMaxWait(d time.Duration, loading bool, reason string, retry time.Duration) *apiError {
	e := &apiError{status: http.StatusServiceUnavailable, typ: "server_error", code: "max_wait_exceeded",
		retryAfter: retry, reject: RejectMaxWait}
	if loading {
		e.msg = fmt.Sprintf("waited %s (gateway.max_wait) for the model: %s", d, reason)
	} else {
		e.msg = fmt.Sprintf("waited %s (gateway.max_wait) for a free slot (max_concurrency)", d)
	}
	return e
}

func errUnknownModel(name string) *apiError {
	return &apiError{status: http.StatusNotFound, typ: "invalid_request_error", code: "model_not_found",
		msg: fmt.Sprintf("The model `%s` does not exist; GET /v1/models lists the models", clientText(name)), reject: RejectUnknownModel}
}

// maxQuoted bounds what an answer quotes of the client's own input: enough
// to recognise a typo, never a megabyte echoed back.
const maxQuoted = 80

// clientText is s as an answer may quote it: at most maxQuoted bytes, cut
// on a character boundary, and marked when cut.
func clientText(s string) string {
	if len(s) <= maxQuoted {
		return s
	}
	cut := maxQuoted
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + fmt.Sprintf("… (%d bytes)", len(s))
}

func errUnauthorized() *apiError {
	return &apiError{status: http.StatusUnauthorized, typ: "invalid_request_error", code: "invalid_api_key",
		msg: "missing or unknown API key: send Authorization: Bearer <key>", reject: RejectUnauthorized}
}

func errBadRequest(status int, code, msg string) *apiError {
	return &apiError{status: status, typ: "invalid_request_error", code: code, msg: msg, reject: RejectBadRequest}
}

func errUpstream(msg string) *apiError {
	return &apiError{status: http.StatusBadGateway, typ: "server_error", code: "upstream_error", msg: msg}
}

// write sends e as OpenAI does. The message holds a model's reason (what
// `citadelctl status` shows), never a header or a key.
func (e *apiError) write(w http.ResponseWriter) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	if e.retryAfter > 0 {
		// Whole seconds, rounded up, as RFC 9110 has it; retry-after-ms is
		// the precise figure, read first by OpenAI's SDKs.
		h.Set("Retry-After", strconv.Itoa(int(math.Ceil(e.retryAfter.Seconds()))))
		h.Set("Retry-After-Ms", strconv.FormatInt(e.retryAfter.Milliseconds(), 10))
	}
	if e.final {
		h.Set("X-Should-Retry", "false")
	}
	w.WriteHeader(e.status)
	w.Write(e.body()) //nolint:errcheck // the client went away
}

func (e *apiError) body() []byte {
	return fmt.Appendf(nil, `{"error":{"message":%s,"type":%q,"param":null,"code":%q}}`+"\n", jsonString(e.msg), e.typ, e.code)
}
