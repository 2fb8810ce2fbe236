package schedule

// An Answer is what the scheduler tells one model's runner: a Placement,
// a QuietAnswer or an Eviction.
type Answer interface{ isAnswer() }

// Placement answers a want (Want): GPUs, or why it waits.
type Placement struct {
	Seq    int      // the want it answers
	GPUs   []string // granted; nil while it waits
	Reason string   // why it waits
}

// QuietAnswer answers a quiet request (Quiet): granted, or what it waits
// for. A wait is said again only when what it waits for changes.
type QuietAnswer struct {
	Seq    int // the request it answers
	OK     bool
	Reason string // what it waits for, when not OK
}

// Eviction tells a model to go to sleep (or, asleep, to stop) to make room
// for the model For.
type Eviction struct {
	For string
}

func (Placement) isAnswer()   {}
func (QuietAnswer) isAnswer() {}
func (Eviction) isAnswer()    {}

// An Outbox takes the scheduler's answers. Deliver is called on the
// scheduler's goroutine, in the order the answers are made, and must not
// block: the supervisor puts each into the model's mailbox, which never
// blocks its sender (docs/architecture.md).
type Outbox interface {
	Deliver(model string, a Answer)
}

// OutboxFunc is a function that is an Outbox.
type OutboxFunc func(model string, a Answer)

// Deliver calls f.
func (f OutboxFunc) Deliver(model string, a Answer) { f(model, a) }
