package gateway

import (
	"fmt"
	"math"
	"net/http"
	"strconv"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
)

// Policy is one API key's scope and limits (gateway.keys.NAME).
type Policy struct {
	// Models the key may use, by configured or served name; empty: all.
	Models []string
	// RequestsPerMinute and TokensPerMinute: 0 = no limit.
	RequestsPerMinute int
	TokensPerMinute   int
	// MaxConcurrency caps the key's requests in flight across every
	// model; beyond it they wait in the model's queue. 0 = no cap.
	MaxConcurrency int
	// Weight is the key's share of a model's queue; 0 means 1.
	Weight int
}

// keyState is what the gateway keeps of one key across reloads: its
// limiters' buckets and its requests in flight. The policy is swapped
// whole at a reload; the buckets keep what was spent.
type keyState struct {
	name     string
	pol      atomic.Pointer[keyPolicy]
	inFlight atomic.Int64
	// blocked: a queue skipped this key's waiter because the key was at
	// max_concurrency; the key's next release then asks every queue to
	// look again (see admission.release).
	blocked atomic.Bool
	poke    func()
}

// keyPolicy is a Policy ready to use. Immutable; the limiters are safe
// for concurrent use and carried over from one policy to the next.
type keyPolicy struct {
	scope    map[string]bool // nil: every model
	rpm, tpm int
	maxConc  int64
	weight   int
	requests *rate.Limiter // nil without requests_per_minute
	tokens   *rate.Limiter // nil without tokens_per_minute
}

// newPolicy builds p's policy, reusing old's buckets: a reload that keeps
// or changes a limit does not hand the key a fresh minute.
func newPolicy(p Policy, old *keyPolicy, now time.Time) *keyPolicy {
	kp := &keyPolicy{rpm: p.RequestsPerMinute, tpm: p.TokensPerMinute, maxConc: int64(p.MaxConcurrency), weight: max(p.Weight, 1)}
	if len(p.Models) > 0 {
		kp.scope = make(map[string]bool, len(p.Models))
		for _, m := range p.Models {
			kp.scope[m] = true
		}
	}
	var oldReq, oldTok *rate.Limiter
	if old != nil {
		oldReq, oldTok = old.requests, old.tokens
	}
	kp.requests = perMinute(p.RequestsPerMinute, oldReq, now)
	kp.tokens = perMinute(p.TokensPerMinute, oldTok, now)
	return kp
}

// perMinute is a token bucket of n per minute holding at most n: a key may
// spend its minute at once, then n/60 a second.
func perMinute(n int, old *rate.Limiter, now time.Time) *rate.Limiter {
	if n <= 0 {
		return nil
	}
	if old == nil {
		return rate.NewLimiter(rate.Limit(float64(n)/60), n)
	}
	old.SetLimitAt(now, rate.Limit(float64(n)/60))
	old.SetBurstAt(now, n)
	return old
}

func (k *keyState) policy() *keyPolicy { return k.pol.Load() }

func (k *keyState) weight() int { return k.policy().weight }

// allows reports whether the key may use m.
func (k *keyState) allows(m Model) bool {
	s := k.policy().scope
	return s == nil || s[m.Name] || s[m.ServedName]
}

// tryAcquire takes one of the key's max_concurrency slots.
func (k *keyState) tryAcquire() bool {
	limit := k.policy().maxConc
	for {
		n := k.inFlight.Load()
		if limit > 0 && n >= limit {
			return false
		}
		if k.inFlight.CompareAndSwap(n, n+1) {
			return true
		}
	}
}

// tryOrBlock is tryAcquire for a queue: when the key is full it marks it
// blocked, then tries once more, so a release between the two is never
// missed (the release lowers the count before it reads blocked).
func (k *keyState) tryOrBlock() bool {
	if k.tryAcquire() {
		return true
	}
	k.blocked.Store(true)
	return k.tryAcquire()
}

// unblock follows a release of one of the key's slots (the count already
// lowered): if a queue skipped the key meanwhile, every queue looks again.
// Called without any admission's mutex held.
func (k *keyState) unblock() {
	if k.blocked.Swap(false) && k.poke != nil {
		k.poke()
	}
}

// admit checks the key's rate limits for one more request at now, takes
// the request from its bucket, and writes OpenAI's x-ratelimit-* headers
// for the limits the key has (on every answer, the 429 included).
//
// Tokens are charged after the answer, from its usage, so a request is
// admitted while the key's token budget is positive: the request that
// overdraws it is served, the next waits for the refill.
func (k *keyState) admit(now time.Time, h http.Header) *apiError {
	p := k.policy()
	var err *apiError
	if p.tokens != nil {
		if left := p.tokens.TokensAt(now); left <= 0 {
			err = errRateLimit("tokens", k.name, p.tpm, refill(p.tokens, -left))
		}
	}
	if err == nil && p.requests != nil {
		r := p.requests.ReserveN(now, 1)
		if d := r.DelayFrom(now); d > 0 {
			r.CancelAt(now)
			err = errRateLimit("requests", k.name, p.rpm, d)
		}
	}
	rateHeaders(h, "requests", p.requests, now)
	rateHeaders(h, "tokens", p.tokens, now)
	return err
}

// headers writes the x-ratelimit-* headers for the key's limits as they
// stand, taking nothing: every answer to a limited key carries them, also
// those given before a request is admitted (a 403, a 404, /v1/models).
func (k *keyState) headers(now time.Time, h http.Header) {
	p := k.policy()
	rateHeaders(h, "requests", p.requests, now)
	rateHeaders(h, "tokens", p.tokens, now)
}

// charge takes n tokens from the key's budget, into debt if need be.
// ReserveN refuses more than the bucket holds, so a large answer is
// charged in bucket-sized parts.
func (k *keyState) charge(now time.Time, n int) {
	lim := k.policy().tokens
	if lim == nil {
		return
	}
	for n > 0 {
		part := min(n, lim.Burst())
		lim.ReserveN(now, part)
		n -= part
	}
}

// refill is how long the bucket takes to gain n tokens, rounded up to the
// millisecond so a client that waits that long finds the budget positive.
func refill(lim *rate.Limiter, n float64) time.Duration {
	d := time.Duration(n / float64(lim.Limit()) * float64(time.Second))
	return d.Truncate(time.Millisecond) + time.Millisecond
}

// rateHeaderNames are OpenAI's x-ratelimit-{limit,remaining,reset}-KIND,
// in Go's canonical form: set directly, every answer to a limited key
// carries them.
var rateHeaderNames = map[string][3]string{
	"requests": {"X-Ratelimit-Limit-Requests", "X-Ratelimit-Remaining-Requests", "X-Ratelimit-Reset-Requests"},
	"tokens":   {"X-Ratelimit-Limit-Tokens", "X-Ratelimit-Remaining-Tokens", "X-Ratelimit-Reset-Tokens"},
}

// rateHeaders writes OpenAI's x-ratelimit-{limit,remaining,reset}-KIND:
// its three values are one string, in one slice, as every answer to a
// limited key carries them.
func rateHeaders(h http.Header, kind string, lim *rate.Limiter, now time.Time) {
	if lim == nil {
		return
	}
	left := lim.TokensAt(now)
	burst := lim.Burst()
	n := rateHeaderNames[kind]
	var buf [64]byte
	b := strconv.AppendInt(buf[:0], int64(burst), 10)
	i := len(b)
	b = strconv.AppendInt(b, int64(math.Max(0, math.Floor(left))), 10)
	j := len(b)
	b = appendReset(b, time.Duration((float64(burst)-left)/float64(lim.Limit())*float64(time.Second)))
	all := string(b)
	v := [3]string{all[:i], all[i:j], all[j:]}
	vs := v[:] // one allocation for the three
	h[n[0]], h[n[1]], h[n[2]] = vs[0:1:1], vs[1:2:2], vs[2:3:3]
}

// resetString writes a duration as OpenAI's reset headers do: "20ms",
// "1s", "6m0s" (what Go's time.ParseDuration reads back).
func resetString(d time.Duration) string { return string(appendReset(nil, d)) }

func appendReset(b []byte, d time.Duration) []byte {
	switch {
	case d <= 0:
		return append(b, "0s"...)
	case d < time.Second:
		return append(strconv.AppendInt(b, int64((d+time.Millisecond-1)/time.Millisecond), 10), "ms"...)
	}
	return append(b, d.Round(10*time.Millisecond).String()...)
}

func errRateLimit(kind, key string, limit int, wait time.Duration) *apiError {
	what := "requests per minute (requests_per_minute)"
	if kind == "tokens" {
		what = "tokens per minute (tokens_per_minute)"
	}
	return &apiError{status: http.StatusTooManyRequests, typ: kind, code: "rate_limit_exceeded",
		msg:        fmt.Sprintf("Rate limit reached for key %s on %s: limit %d. Please try again in %s.", key, what, limit, resetString(wait)),
		retryAfter: wait, reject: RejectRateLimit}
}

func errScope(key string, m Model) *apiError {
	return &apiError{status: http.StatusForbidden, typ: "permission_error", code: "permission_error",
		msg:    fmt.Sprintf("key %s may not use the model `%s` (gateway.keys.%s.models); GET /v1/models lists the models it may use", key, m.ServedName, key),
		reject: RejectScope}
}
