// Package schedule owns every GPU want and claim of the supervisor's
// models, and what decides which on-demand model is put to sleep to make
// room for another (docs/architecture.md, "The GPU scheduler";
// docs/on-demand.md, "Making room: eviction without thrash").
//
// A Scheduler is one goroutine that never waits on a runner. Runners tell
// it what they want and what they release by calling its methods (Want,
// Ready, Release, Slept, Quiet, ...); it answers with values, delivered
// through the one Outbox it was built with: a Placement answers a want, a
// QuietAnswer a quiet request, an Eviction tells a model to sleep for
// another. What it needs to know of the models beyond that (their
// processes, and the usage of each on-demand model it holds a claim for:
// min_awake, last request, queue, measured wakes and starts, requests
// counted with decay) it reads once per decision as one Observation, from
// snapshots the runners and the gateway publish: nothing is sent to it
// per request.
//
// Each decision is gpu.Decide, a pure function of the wants, the claims and
// the latest GPU readings; the order in which sleepers are chosen is
// gpu.EvictionOrder (gpu/evict.go), beside Decide, which calls it. This
// package fills the claims it weighs (Usage): which models are on demand,
// which min_awake protects, what each would cost when wanted again.
//
// It imports nothing of package supervisor.
package schedule
