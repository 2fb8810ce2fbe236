package gpu

import (
	"cmp"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"citadel-supervisor/config"
)

// Request is one model asking for GPUs.
type Request struct {
	Name     string
	Priority int
	TP       int      // tensor_parallel: how many distinct GPUs
	Util     float64  // gpu_memory_utilization: share of each GPU's total
	Pins     []string // indexes ("0") or UUIDs; empty means any GPU
	// OnDemand: an on-demand model may put any idle on-demand model to
	// sleep to make room; an always model only lower-priority ones.
	OnDemand bool
}

// Slot is a GPU as placement sees it: the reading, plus what the readings
// cannot show yet.
type Slot struct {
	Device
	// Claimed is memory promised to models that have not allocated it yet
	// (starting, or between restarts): free memory minus Claimed is what is
	// really available. Without it, two models would take the same memory.
	Claimed uint64
	// Busy says why nothing may start on this GPU now: a model is loading
	// (vLLM's memory profiling breaks under concurrent starts), or a
	// stopped model's memory is not back yet.
	Busy string
	// Note explains an oddity, e.g. a release that timed out.
	Note string
}

// Decision is the outcome for one request: the GPUs (indexes into the
// slots) or, when it must wait, why.
type Decision struct {
	Name   string
	GPUs   []int
	Reason string
}

// Share is what vLLM allocates on a GPU of total bytes:
// gpu_memory_utilization × total.
func Share(util float64, total uint64) uint64 { return uint64(util * float64(total)) }

// Need is what must be available on a GPU for a model to start there: its
// share plus the headroom kept free.
func Need(util float64, total uint64, headroom config.ByteSize) uint64 {
	return Share(util, total) + uint64(headroom)
}

// Plan decides every request, higher priority first, ties by name. Each
// grant is claimed in slots (which Plan updates), so later requests see it.
// A request that does not fit waits; lower-priority requests may still use
// what it cannot (no GPU idles while something fits).
func Plan(reqs []Request, slots []Slot, headroom config.ByteSize) []Decision {
	order := slices.Clone(reqs)
	sortRequests(order)
	out := make([]Decision, 0, len(order))
	for _, r := range order {
		d := Fit(r, slots, headroom)
		for _, g := range d.GPUs {
			slots[g].Claimed += Share(r.Util, slots[g].MemoryTotal)
			slots[g].Busy = r.Name + " is starting"
		}
		out = append(out, d)
	}
	return out
}

// Resident is Plan without start serialisation: the models that will be
// resident once every start has finished, for `citadel-supervisor --check`.
func Resident(reqs []Request, slots []Slot, headroom config.ByteSize) []Decision {
	order := slices.Clone(reqs)
	sortRequests(order)
	out := make([]Decision, 0, len(order))
	for _, r := range order {
		d := Plan([]Request{r}, slots, headroom)[0]
		for i := range slots {
			slots[i].Busy = ""
		}
		out = append(out, d)
	}
	return out
}

func sortRequests(reqs []Request) { slices.SortStableFunc(reqs, compareRequests) }

// compareRequests orders requests as placement takes them: higher priority
// first, ties by name.
func compareRequests(a, b Request) int {
	if c := cmp.Compare(b.Priority, a.Priority); c != 0 {
		return c
	}
	return strings.Compare(a.Name, b.Name)
}

// Fit chooses GPUs for one request without claiming them: tensor_parallel
// distinct GPUs that are up, pinned (if pins are set), not busy with another
// start, and with enough available memory; the tightest fit first, so large
// holes stay for large models.
func Fit(r Request, slots []Slot, headroom config.ByteSize) Decision {
	d := Decision{Name: r.Name}
	var cands []int
	var down []string
	for i, s := range slots {
		if len(r.Pins) > 0 && !pinned(r.Pins, s) {
			continue
		}
		if !s.Up {
			down = append(down, fmt.Sprintf("GPU%d down", s.Index))
			continue
		}
		cands = append(cands, i)
	}
	if len(cands) < r.TP {
		what := "the host has"
		if len(r.Pins) > 0 {
			what = "its pins allow"
		}
		d.Reason = fmt.Sprintf("needs %d GPUs; %s %d usable", r.TP, what, len(cands))
		if len(down) > 0 {
			d.Reason += " (" + strings.Join(down, ", ") + ")"
		}
		return d
	}

	type option struct {
		slot  int
		spare uint64
	}
	var fits []option
	var free, busy, notes []string
	var need uint64
	for _, i := range cands {
		s := slots[i]
		n := Need(r.Util, s.MemoryTotal, headroom)
		need = max(need, n)
		avail := s.MemoryFree - min(s.Claimed, s.MemoryFree)
		free = append(free, fmt.Sprintf("%s (GPU%d)", config.ByteSize(avail), s.Index))
		if s.Note != "" {
			notes = append(notes, fmt.Sprintf("GPU%d: %s", s.Index, s.Note))
		}
		switch {
		case avail < n:
		case s.Busy != "":
			busy = append(busy, fmt.Sprintf("GPU%d: %s", s.Index, s.Busy))
		default:
			fits = append(fits, option{slot: i, spare: avail - n})
		}
	}
	if len(fits) >= r.TP {
		slices.SortStableFunc(fits, func(a, b option) int { return cmp.Compare(a.spare, b.spare) })
		for _, f := range fits[:r.TP] {
			d.GPUs = append(d.GPUs, f.slot)
		}
		slices.Sort(d.GPUs)
		return d
	}
	if len(fits)+len(busy) >= r.TP {
		d.Reason = "waiting for " + strings.Join(busy, "; ")
	} else {
		d.Reason = fmt.Sprintf("needs %s on %d GPU%s; free %s", config.ByteSize(need), r.TP, plural(r.TP), strings.Join(free, ", "))
	}
	if len(notes) > 0 {
		d.Reason += "; " + strings.Join(notes, "; ")
	}
	return d
}

func pinned(pins []string, s Slot) bool {
	for _, p := range pins {
		if p == s.UUID || p == strconv.Itoa(s.Index) {
			return true
		}
	}
	return false
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}
