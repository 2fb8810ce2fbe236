package gpu

import (
	"strings"
	"testing"
	"time"

	"citadel-supervisor/config"
)

func TestUses(t *testing.T) {
	var u Uses
	if u.Count(now) != 0 || u.Rate(now) != 0 {
		t.Fatalf("zero Uses counts %v", u.Count(now))
	}
	u = u.Add(now).Add(now)
	if got := u.Count(now); got != 2 {
		t.Errorf("two requests now count %v", got)
	}
	if got := u.Count(now.Add(UseHalfLife)); got != 1 {
		t.Errorf("a half-life later they count %v, want 1", got)
	}
	u = u.Add(now.Add(UseHalfLife))
	if got := u.Count(now.Add(2 * UseHalfLife)); got != 1 {
		t.Errorf("two half-lives after two and one after one: %v, want 1", got)
	}
	if got := u.Count(now.Add(-time.Hour)); got != u.N {
		t.Errorf("a clock that went back counts %v, want %v", got, u.N)
	}
}

// victim is an on-demand claim for the order's tests: awake unless phase
// says otherwise, frees GiB.
func victim(name string, prio int, lastUsed time.Duration, frees config.ByteSize, cost Cost) Victim {
	return Victim{Claim: &Claim{Name: name, Req: Request{Name: name, Priority: prio}, Phase: Running, OnDemand: true, LastUsed: now.Add(-lastUsed), Cost: cost}, Frees: uint64(frees)}
}

func asleepV(v Victim) Victim { v.Phase = Asleep; return v }

func uses(n int, ago time.Duration) Uses {
	var u Uses
	for range n {
		u = u.Add(now.Add(-ago))
	}
	return u
}

func TestEvictionOrder(t *testing.T) {
	wake := func(d time.Duration) Cost { return Cost{Wake: d, Start: 60 * time.Second, Level: 1} }
	cases := []struct {
		name string
		vs   []Victim
		want string
	}{{
		name: "nothing known: least recently used first",
		vs: []Victim{
			victim("a", 0, time.Minute, 40*config.GiB, Cost{Level: 1}),
			victim("b", 0, time.Hour, 40*config.GiB, Cost{Level: 1}),
			victim("c", 0, time.Second, 40*config.GiB, Cost{Level: 1}),
		},
		want: "b a c",
	}, {
		name: "equal worth: least recently used first, then by name",
		vs: []Victim{
			victim("b", 0, time.Hour, 40*config.GiB, wake(2*time.Second)),
			victim("a", 0, time.Hour, 40*config.GiB, wake(2*time.Second)),
			victim("c", 0, 2*time.Hour, 40*config.GiB, wake(4*time.Second)),
		},
		// c: half the rate, twice the cost: the same worth as a and b,
		// and the least recently used.
		want: "c a b",
	}, {
		name: "lower priority first, whatever the rest",
		vs: []Victim{
			victim("busy", 1, time.Second, 40*config.GiB, Cost{Wake: time.Second, Level: 1, Uses: uses(50, time.Minute)}),
			victim("idle", 5, 10*time.Hour, 40*config.GiB, wake(time.Second)),
		},
		want: "busy idle",
	}, {
		name: "one that requests wait for goes after one nobody waits for, whatever its worth",
		vs: func() []Victim {
			queued := victim("queued", 0, 10*time.Hour, 40*config.GiB, wake(time.Second))
			queued.Waiting = 2
			return []Victim{queued, victim("fresh", 0, time.Second, 40*config.GiB, wake(6*time.Second))}
		}(),
		want: "fresh queued",
	}, {
		name: "a cheap wake goes before an expensive one used longer ago",
		vs: []Victim{
			victim("phi3", 0, 10*time.Second, 48*config.GiB, wake(600*time.Millisecond)),
			victim("coder", 0, 20*time.Second, 64*config.GiB, wake(2500*time.Millisecond)),
		},
		want: "phi3 coder",
	}, {
		name: "a model asked for often is kept over one used once, more recently",
		vs: []Victim{
			victim("popular", 0, 5*time.Minute, 40*config.GiB, Cost{Wake: 2 * time.Second, Level: 1, Uses: uses(100, 5*time.Minute)}),
			victim("once", 0, 2*time.Minute, 40*config.GiB, Cost{Wake: 2 * time.Second, Level: 1, Uses: uses(1, 2*time.Minute)}),
		},
		want: "once popular",
	}, {
		name: "a session in progress is kept over a model popular long ago",
		vs: []Victim{
			victim("yesterday", 0, 20*time.Hour, 40*config.GiB, Cost{Wake: 2 * time.Second, Level: 1, Uses: uses(500, 20*time.Hour)}),
			victim("now", 0, 5*time.Second, 40*config.GiB, Cost{Wake: 2 * time.Second, Level: 1, Uses: uses(3, 5*time.Second)}),
		},
		want: "yesterday now",
	}, {
		name: "per byte: the model that gives back more for the same wake goes first",
		vs: []Victim{
			victim("small", 0, time.Minute, 20*config.GiB, wake(2*time.Second)),
			victim("large", 0, 30*time.Second, 80*config.GiB, wake(2*time.Second)),
		},
		want: "large small",
	}, {
		name: "stopped, not slept (sleep_level 0): its cold start is its cost",
		vs: []Victim{
			victim("stops", 0, 30*time.Second, 40*config.GiB, Cost{Wake: 2 * time.Second, Start: 90 * time.Second, Level: 0}),
			victim("sleeps", 0, time.Minute, 40*config.GiB, Cost{Wake: 2 * time.Second, Start: 90 * time.Second, Level: 1}),
		},
		want: "sleeps stops",
	}, {
		name: "an unmeasured wake is taken at the others' cost per byte: not evicted first for being new",
		vs: []Victim{
			victim("new", 0, 30*time.Second, 40*config.GiB, Cost{Level: 1}),
			victim("old", 0, time.Minute, 40*config.GiB, wake(2*time.Second)),
		},
		want: "old new",
	}, {
		name: "sleepers: the one least asked for and cheapest to start again is stopped first",
		vs: []Victim{
			asleepV(victim("mixtral", 0, time.Hour, 4*config.GiB, Cost{Wake: 6 * time.Second, Start: 150 * time.Second, Level: 1, Uses: uses(10, time.Hour)})),
			asleepV(victim("phi3", 0, 30*time.Minute, 2*config.GiB, Cost{Wake: time.Second, Start: 35 * time.Second, Level: 1, Uses: uses(10, time.Hour)})),
			asleepV(victim("rare", 0, 10*time.Minute, 2*config.GiB, Cost{Wake: 2 * time.Second, Start: 60 * time.Second, Level: 1, Uses: uses(1, 10*time.Minute)})),
		},
		want: "rare phi3 mixtral",
	}, {
		name: "sleepers: recency counts for little (its session is mostly over)",
		vs: []Victim{
			asleepV(victim("recent", 0, 5*time.Minute, 2*config.GiB, Cost{Wake: time.Second, Start: 60 * time.Second, Level: 1, Uses: uses(1, 5*time.Minute)})),
			asleepV(victim("regular", 0, time.Hour, 2*config.GiB, Cost{Wake: time.Second, Start: 60 * time.Second, Level: 1, Uses: uses(20, time.Hour)})),
		},
		want: "recent regular",
	}, {
		name: "sleepers: one put to sleep in a pause of its session is kept over one idle for hours",
		vs: []Victim{
			asleepV(victim("pause", 0, 10*time.Second, 2*config.GiB, Cost{Wake: time.Second, Start: 60 * time.Second, Level: 1, Uses: uses(3, 10*time.Second)})),
			asleepV(victim("idle", 0, 3*time.Hour, 2*config.GiB, Cost{Wake: time.Second, Start: 60 * time.Second, Level: 1, Uses: uses(20, 3*time.Hour)})),
		},
		want: "idle pause",
	}, {
		name: "sleepers: nothing known, least recently used first",
		vs: []Victim{
			asleepV(victim("b", 0, time.Minute, 2*config.GiB, Cost{Level: 1})),
			asleepV(victim("a", 0, time.Hour, 2*config.GiB, Cost{Level: 1})),
		},
		want: "a b",
	}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			EvictionOrder(tc.vs, now)
			var got []string
			for _, v := range tc.vs {
				got = append(got, v.Name)
			}
			if g := strings.Join(got, " "); g != tc.want {
				t.Errorf("order %q, want %q", g, tc.want)
			}
		})
	}
}

// TestLRUOrder: the rule the replay compares with, as it was before costs
// were known: lower priority, then nobody waiting, then least recently used.
func TestLRUOrder(t *testing.T) {
	waiting := victim("waiting", 0, 3*time.Hour, 40*config.GiB, Cost{})
	waiting.Waiting = 1
	vs := []Victim{
		victim("recent", 0, time.Second, 40*config.GiB, Cost{Wake: 6 * time.Second}),
		waiting,
		victim("old", 0, time.Hour, 40*config.GiB, Cost{Wake: 6 * time.Second}),
		victim("low", -1, 0, 40*config.GiB, Cost{}),
	}
	LRUOrder(vs, now)
	var got []string
	for _, v := range vs {
		got = append(got, v.Name)
	}
	if g := strings.Join(got, " "); g != "low old recent waiting" {
		t.Errorf("order %q, want %q", g, "low old recent waiting")
	}
}

// BenchmarkEvictionOrder is the policy's cost in a decision: the seven
// reference models, awake, ordered.
func BenchmarkEvictionOrder(b *testing.B) {
	base := make([]Victim, len(referenceModels))
	for i, m := range referenceModels {
		base[i] = victim(m.name, 0, time.Duration(i)*time.Minute, config.ByteSize(m.util*80*float64(config.GiB)),
			Cost{Wake: m.wake, Start: m.start, Level: 1, Uses: uses(i+1, time.Duration(i)*time.Minute)})
	}
	vs := make([]Victim, len(base))
	b.ReportAllocs()
	for b.Loop() {
		copy(vs, base)
		EvictionOrder(vs, now)
	}
}
