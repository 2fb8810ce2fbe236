package gpu

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"citadel-supervisor/config"
)

// Phase is where a claim on GPU memory stands.
type Phase int

const (
	// Starting: granted, the model is loading. Nothing else starts on its
	// GPUs (vLLM's memory profiling breaks under concurrent starts).
	Starting Phase = iota
	// Running: the model is ready.
	Running
	// Releasing: the model was stopped; its GPUs stay busy until none of
	// its processes is on them any more, or the release timeout passes.
	Releasing
	// Reserved: between a stop and the restart that follows it (backoff, a
	// restart, a reload that keeps the placement): the memory is kept for
	// the model.
	Reserved
	// Asleep: an on-demand model's process sleeps on its GPUs (vLLM's sleep
	// mode): it holds only what the readings show (CUDA graphs, NCCL), and
	// wakes on the same GPUs when its share is available there again.
	Asleep
)

func (p Phase) String() string {
	return [...]string{"starting", "running", "releasing", "reserved", "asleep"}[p]
}

// Want is a model asking for GPUs.
type Want struct {
	Request
	// Checking: the model's pre-start checks (storage, env files, port)
	// have not finished. It takes nothing yet, but lower-priority models
	// wait for it, so that the order of start-up checks never decides who
	// is resident.
	Checking bool
	// Held, for a wake, is what the sleeper held on each GPU before it
	// slept (Claim.Held).
	Held map[string]uint64
	// Since is when the model asked: of two wants of equal priority the
	// earlier goes first (a model put to sleep for another, whose waiting
	// requests ask for it again at once, does not jump ahead of the one
	// it was put to sleep for).
	Since time.Time
}

// Claim is GPU memory granted to a model.
type Claim struct {
	Name  string
	Req   Request  // what it was granted for: a reservation is reused only for the same
	UUIDs []string // the GPUs granted
	Phase Phase
	// PIDs are the model's processes: their memory on the claim's GPUs is
	// what it has allocated of its share already. While releasing, they
	// are the processes that must leave the GPUs.
	PIDs  []int
	Since time.Time // when the phase began
	// Keep: when the release completes, stay reserved for a restart.
	Keep bool

	// OnDemand: the model may be put to sleep (or stopped) to make room.
	OnDemand bool
	// Protected, when set, says why this on-demand model may not be put to
	// sleep now (within min_awake of waking, say).
	Protected string
	// LastUsed is its last request (or its wake): least recently used
	// models are put to sleep first.
	LastUsed time.Time
	// Waiting is the number of requests waiting in its queue: a model
	// others wait for is put to sleep after one nobody waits for.
	Waiting int
	// AwakeAt is when it last became ready (started or woke), as its own
	// lifecycle saw it: min_awake counts from here.
	AwakeAt time.Time
	// Held is what a sleeper held on each GPU before it slept, as read:
	// its wake needs that much, when it is more than its share (with sleep
	// mode vLLM can size its KV cache above gpu_memory_utilization × total,
	// vllm#40256).
	Held map[string]uint64
	// Evicting: it has been told to sleep to make room; its memory comes
	// back once it sleeps.
	Evicting bool
	// Changing: it is going to sleep or being stopped: its GPUs' memory
	// changes, so no start or wake begins there meanwhile (vLLM aborts a
	// start whose GPU memory changes while it profiles, vllm#56830).
	Changing bool
	// Cost is what putting it to sleep (or stopping it) costs when it is
	// wanted again, and how often it is: the eviction policy's data
	// (evict.go).
	Cost Cost
}

// share is what the claim needs on the GPU uuid of total memory: its
// share, or what it held there before it slept when that is more.
func (c *Claim) share(uuid string, total uint64) uint64 {
	return max(Share(c.Req.Util, total), min(c.Held[uuid], total))
}

// Input is everything a decision depends on.
type Input struct {
	Wants   []Want
	Claims  []Claim
	Devices []Device
	ReadAt  time.Time // when Devices were read
	// ReadErr, when set, says the latest reading failed (Devices are the
	// last good one): every want waits, and releases complete only by
	// their timeout.
	ReadErr        string
	Headroom       config.ByteSize
	ReleaseTimeout time.Duration
	Now            time.Time
	// Notes are earlier notes by GPU UUID (a release that timed out), kept
	// until something is placed there.
	Notes map[string]string
	// NotBefore, when set, is when claims were restored (an upgrade, or a
	// successor adopting a predecessor's models): nothing is granted and
	// nobody is put to sleep until a reading taken after it.
	NotBefore time.Time

	// order, when set, replaces EvictionOrder (the replay benchmark
	// compares policies with it).
	order func([]Victim, time.Time)
}

// Outcome is what Decide decided.
type Outcome struct {
	// Grants are the wants that may start now, with their GPU UUIDs.
	Grants map[string][]string
	// Waits say why each other want must wait.
	Waits map[string]string
	// Claims are the claims after the decision: completed releases gone
	// (or turned into reservations), unusable reservations dropped, grants
	// added as Starting.
	Claims []Claim
	// Notes by GPU UUID, for operators.
	Notes map[string]string
	// Evict names the on-demand models to put to sleep (or stop) to make
	// room, each with the model it makes room for.
	Evict map[string]string
	// Log lists what happened that an operator should read in the log.
	Log []string
}

// Decide is the scheduler's rule, a pure function of its input:
//
//  1. A release completes when none of its processes holds memory on its
//     GPUs any more, or after the release timeout (then the GPUs get a
//     note). A completed release with Keep becomes a reservation.
//  2. Wants are taken by priority, higher first; of equal priority the
//     earlier want first, then by name.
//  3. A want behind a higher-priority want that is still Checking waits.
//  4. A want with a reservation gets the same GPUs once no other model is
//     starting there, if it asks for the same thing and the GPUs are up;
//     otherwise the reservation is dropped and it is placed afresh.
//  5. A want whose release is in progress waits for it.
//  6. A sleeping model wakes on its own GPUs once its share (less what it
//     still holds there) and the headroom are available.
//  7. Otherwise gpu.Fit places it on free memory minus what every claim
//     has not allocated yet; each grant is claimed before the next want
//     is looked at, so lower-priority wants may use what higher ones
//     cannot, and two wants never get the same memory.
//  8. A want that does not fit (6 or 7) makes room by putting on-demand
//     models to sleep: only ready ones that are not protected (min_awake),
//     for an always model only lower-priority ones, in the order of
//     EvictionOrder (lower priority first, then what each would cost its
//     clients: evict.go), and only as many as it needs, on exactly
//     the GPUs it needs. When putting awake models to sleep is not enough,
//     sleeping ones are stopped for their residue. It waits until they sleep
//     and the readings show their memory back. Models already being put to
//     sleep count as room coming; always models are never put to sleep.
func Decide(in Input) Outcome {
	out := Outcome{Grants: map[string][]string{}, Waits: map[string]string{}, Notes: map[string]string{}, Evict: map[string]string{}}
	for u, n := range in.Notes {
		out.Notes[u] = n
	}
	wanted := map[string]Want{}
	for _, w := range in.Wants {
		wanted[w.Name] = w
	}
	up := map[string]bool{}
	for _, d := range in.Devices {
		up[d.UUID] = d.Up
	}

	// 1 and 4: settle releases and drop reservations that cannot serve.
	claims := map[string]*Claim{}
	for _, c := range in.Claims {
		c := c
		if c.Phase == Releasing {
			left := onGPUs(in.Devices, c.UUIDs, c.PIDs)
			if in.ReadErr != "" {
				left = c.PIDs // unknown: assume still there
			}
			timedOut := in.Now.Sub(c.Since) >= in.ReleaseTimeout
			if len(left) > 0 && !timedOut {
				claims[c.Name] = &c
				continue
			}
			if len(left) > 0 {
				note := fmt.Sprintf("%s's processes %v still held memory after release_timeout %s", c.Name, left, in.ReleaseTimeout)
				for _, u := range c.UUIDs {
					out.Notes[u] = note
				}
				out.Log = append(out.Log, "GPU memory not released in time; placing anyway: "+note)
			}
			if !c.Keep {
				continue
			}
			c.Phase, c.PIDs, c.Since = Reserved, nil, in.Now
		}
		if c.Phase == Reserved {
			if w, ok := wanted[c.Name]; ok && !w.Checking && !reusable(c, w.Request, up) {
				out.Log = append(out.Log, fmt.Sprintf("%s: its reserved GPUs no longer fit what it asks for; placing it afresh", c.Name))
				continue
			}
		}
		claims[c.Name] = &c
	}

	slots := Slots(in.Devices, claims, out.Notes)
	// Evictions are decided on readings that show every sleep so far: a
	// model that just fell asleep still looks as if it held its memory.
	stale := markStale(slots, claims, in.ReadAt)
	order := slices.Clone(in.Wants)
	slices.SortStableFunc(order, func(a, b Want) int {
		if a.Priority != b.Priority {
			return compareRequests(a.Request, b.Request)
		}
		if c := a.Since.Compare(b.Since); c != 0 {
			return c
		}
		return compareRequests(a.Request, b.Request)
	})
	var checking []string
	for _, w := range order {
		if w.Checking {
			checking = append(checking, w.Name)
			continue
		}
		if c := claims[w.Name]; c != nil {
			switch c.Phase {
			case Releasing:
				out.Waits[w.Name] = fmt.Sprintf("waiting for its previous run's GPU memory to be released (%s)", indexes(slots, c.UUIDs))
				continue
			case Reserved:
				if busy := busyOn(slots, c.UUIDs); busy != "" {
					out.Waits[w.Name] = "waiting for " + busy
					continue
				}
				if reason := restoreWait(in); reason != "" {
					out.Waits[w.Name] = reason
					continue
				}
				// Its memory was kept for it, but something outside (another
				// process, the state file) may have taken it since: the same
				// check as any start, on its own GPUs, its reservation aside.
				own := Request{Name: w.Name, TP: w.TP, Util: w.Util, Pins: slices.Clone(c.UUIDs)}
				if d := Fit(own, withoutClaim(slots, c), in.Headroom); d.GPUs == nil {
					out.Log = append(out.Log, fmt.Sprintf("%s: its reserved GPUs no longer have its memory (%s); placing it afresh", w.Name, d.Reason))
					delete(claims, w.Name)
					slots = Slots(in.Devices, claims, out.Notes)
					markStale(slots, claims, in.ReadAt)
				} else {
					c.Phase, c.Since = Starting, in.Now
					markBusy(slots, c.UUIDs, w.Name)
					out.Grants[w.Name] = slices.Clone(c.UUIDs)
					continue
				}
			case Asleep:
				if len(checking) > 0 {
					out.Waits[w.Name] = fmt.Sprintf("waiting for higher-priority models to be placed first (%s)", strings.Join(checking, ", "))
					continue
				}
				if reason := restoreWait(in); reason != "" {
					out.Waits[w.Name] = reason
					continue
				}
				if w.Held != nil {
					c.Held = w.Held
				}
				if reason := wakeFits(c, slots, in.Headroom); reason != "" {
					// Only memory is made room for; a GPU busy with another
					// start or a sleep in progress is waited for.
					if short := strings.HasPrefix(reason, wakeShort); short && !stale {
						if victims := makeRoom(w.Request, c, slots, claims, in); len(victims) > 0 {
							evict(&out, claims, victims, w.Name)
							out.Waits[w.Name] = "waiting for " + strings.Join(victims, ", ") + " to sleep to make room"
							continue
						}
					}
					out.Waits[w.Name] = reason
					continue
				}
				c.Phase, c.Since = Starting, in.Now
				markBusy(slots, c.UUIDs, w.Name)
				out.Grants[w.Name] = slices.Clone(c.UUIDs)
				continue
			case Starting, Running: // granted already: the same answer again
				out.Grants[w.Name] = slices.Clone(c.UUIDs)
				continue
			}
		}
		if len(checking) > 0 {
			out.Waits[w.Name] = fmt.Sprintf("waiting for higher-priority models to be placed first (%s)", strings.Join(checking, ", "))
			continue
		}
		if in.ReadErr != "" {
			out.Waits[w.Name] = "GPU readings failed: " + in.ReadErr
			continue
		}
		if len(slots) == 0 {
			out.Waits[w.Name] = "no GPU readings yet"
			continue
		}
		if reason := restoreWait(in); reason != "" {
			out.Waits[w.Name] = reason
			continue
		}
		d := Fit(w.Request, slots, in.Headroom)
		if d.GPUs == nil {
			// Only memory is made room for; a GPU busy with another start
			// or a sleep in progress is waited for.
			if short := Fit(w.Request, notBusy(slots), in.Headroom).GPUs == nil; !short || stale {
				out.Waits[w.Name] = d.Reason
				continue
			}
			if victims := makeRoom(w.Request, nil, slots, claims, in); len(victims) > 0 {
				evict(&out, claims, victims, w.Name)
				out.Waits[w.Name] = "waiting for " + strings.Join(victims, ", ") + " to sleep to make room"
				continue
			}
			out.Waits[w.Name] = d.Reason
			continue
		}
		c := &Claim{Name: w.Name, Req: w.Request, Phase: Starting, Since: in.Now}
		for _, i := range d.GPUs {
			c.UUIDs = append(c.UUIDs, slots[i].UUID)
			slots[i].Claimed += Share(w.Util, slots[i].MemoryTotal)
			slots[i].Busy = w.Name + " is starting"
			delete(out.Notes, slots[i].UUID)
		}
		claims[w.Name] = c
		out.Grants[w.Name] = slices.Clone(c.UUIDs)
	}
	for _, name := range sortedNames(claims) {
		out.Claims = append(out.Claims, *claims[name])
	}
	return out
}

// markStale marks busy the GPUs of models that fell asleep after the
// readings were taken (their memory is back only once a reading taken
// after shows so) and reports whether there are any.
func markStale(slots []Slot, claims map[string]*Claim, readAt time.Time) bool {
	stale := false
	for _, name := range sortedNames(claims) {
		c := claims[name]
		if c.Phase == Asleep && !readAt.After(c.Since) {
			stale = true
			for i := range slots {
				if slices.Contains(c.UUIDs, slots[i].UUID) && slots[i].Busy == "" {
					slots[i].Busy = c.Name + " is going to sleep"
				}
			}
		}
	}
	return stale
}

// restoreWait says why nothing is granted yet after claims were restored
// ("" once a reading taken after the restore is in).
func restoreWait(in Input) string {
	if !in.NotBefore.IsZero() && !in.ReadAt.After(in.NotBefore) {
		return "waiting for a GPU reading taken after the takeover"
	}
	return ""
}

// withoutClaim is slots as if c held nothing: its unallocated share no
// longer claimed, its GPUs not busy on its account.
func withoutClaim(slots []Slot, c *Claim) []Slot {
	out := slices.Clone(slots)
	for i := range out {
		s := &out[i]
		if !slices.Contains(c.UUIDs, s.UUID) {
			continue
		}
		if c.Phase != Asleep {
			share, used := c.share(s.UUID, s.MemoryTotal), usedBy(*s, c.PIDs)
			s.Claimed -= min(share-min(used, share), s.Claimed)
		}
	}
	return out
}

// wakeFits says why sleeping model c cannot wake on its GPUs now ("" when
// it can): each needs its share, less what it still holds there, plus the
// headroom, and no other start in progress. A GPU of its that the
// readings do not show (none yet, or no longer) is no room to wake on.
func wakeFits(c *Claim, slots []Slot, headroom config.ByteSize) string {
	for _, u := range c.UUIDs {
		if !slices.ContainsFunc(slots, func(s Slot) bool { return s.UUID == u }) {
			if len(slots) == 0 {
				return "no GPU readings yet"
			}
			return fmt.Sprintf("its GPU %s is not in the readings", u)
		}
	}
	var short []string
	for _, s := range slots {
		if !slices.Contains(c.UUIDs, s.UUID) {
			continue
		}
		if !s.Up {
			return fmt.Sprintf("GPU%d is down", s.Index)
		}
		need := wakeNeed(c, s, headroom)
		avail := s.MemoryFree - min(s.Claimed, s.MemoryFree)
		if avail < need {
			short = append(short, fmt.Sprintf("needs %s on GPU%d; free %s", config.ByteSize(need), s.Index, config.ByteSize(avail)))
		} else if s.Busy != "" {
			return fmt.Sprintf("waiting for GPU%d: %s", s.Index, s.Busy)
		}
	}
	if len(short) > 0 {
		return wakeShort + strings.Join(short, "; ")
	}
	return ""
}

// wakeShort starts wakeFits' answer when memory is short.
const wakeShort = "to wake: "

// notBusy is slots with no start or release in progress anywhere.
func notBusy(slots []Slot) []Slot {
	out := slices.Clone(slots)
	for i := range out {
		out[i].Busy = ""
	}
	return out
}

func wakeNeed(c *Claim, s Slot, headroom config.ByteSize) uint64 {
	share, held := c.share(s.UUID, s.MemoryTotal), usedBy(s, c.PIDs)
	return share - min(held, share) + uint64(headroom)
}

// usedBy is the memory pids hold on s, as read.
func usedBy(s Slot, pids []int) uint64 {
	var used uint64
	for _, p := range s.Processes {
		if slices.Contains(pids, p.PID) {
			used += p.UsedMemory
		}
	}
	return used
}

// makeRoom chooses the on-demand models to put to sleep so that r fits:
// on asleep's GPUs when it is a sleeping model waking, else wherever Fit
// then places it. It returns nil when nothing eligible would make it fit.
func makeRoom(r Request, asleep *Claim, slots []Slot, claims map[string]*Claim, in Input) []string {
	headroom := in.Headroom
	var awake, sleepers, coming []*Claim
	for _, c := range claims {
		switch {
		case c.Name == r.Name || !c.OnDemand:
		case c.Phase != Running && c.Phase != Asleep:
		case !r.OnDemand && c.Req.Priority >= r.Priority:
			// An always model preempts only lower-priority ones.
		case c.Evicting:
			coming = append(coming, c)
		case c.Phase == Asleep:
			// A sleeper holds only its residue (CUDA graphs, NCCL); it is
			// stopped to give that back, after every awake candidate.
			sleepers = append(sleepers, c)
		case c.Protected == "":
			awake = append(awake, c)
		}
	}
	if len(awake) == 0 && len(sleepers) == 0 && len(coming) == 0 {
		return nil
	}
	// Awake models first, then sleepers, each in the policy's order
	// (evict.go).
	order := func(cs []*Claim) {
		vs := make([]Victim, len(cs))
		for i, c := range cs {
			vs[i] = Victim{Claim: c, Frees: frees(c, slots)}
		}
		rank := in.order
		if rank == nil {
			rank = EvictionOrder
		}
		rank(vs, in.Now)
		for i, v := range vs {
			cs[i] = v.Claim
		}
	}
	order(awake)
	order(sleepers)
	cands := append(awake, sleepers...)
	for k := 0; k <= len(cands); k++ {
		freed := freeing(slots, append(slices.Clone(coming), cands[:k]...))
		var gpus []string
		if asleep != nil {
			if wakeFits(asleep, freed, headroom) != "" {
				continue
			}
			gpus = asleep.UUIDs
		} else {
			d := Fit(r, freed, headroom)
			if d.GPUs == nil {
				continue
			}
			for _, i := range d.GPUs {
				gpus = append(gpus, freed[i].UUID)
			}
		}
		// Only the chosen ones on the GPUs it gets.
		var out []string
		for _, c := range cands[:k] {
			if overlaps(c.UUIDs, gpus) {
				out = append(out, c.Name)
			}
		}
		if len(out) == 0 && !anyOverlap(coming, gpus) {
			return nil // fits without anyone sleeping: busy, not short
		}
		for _, c := range coming {
			if overlaps(c.UUIDs, gpus) {
				out = append(out, c.Name)
			}
		}
		slices.Sort(out)
		return out
	}
	return nil
}

// givingBack ends the busy note of a GPU whose model is going to sleep
// or stopping (Claim.Changing).
const givingBack = " is giving its memory back"

// frees is what c gives back on its GPUs when it is put to sleep (its
// share) or, asleep, stopped (what it still holds there).
func frees(c *Claim, slots []Slot) uint64 {
	var n uint64
	for _, s := range slots {
		if !slices.Contains(c.UUIDs, s.UUID) {
			continue
		}
		if c.Phase == Asleep {
			n += usedBy(s, c.PIDs)
		} else {
			n += c.share(s.UUID, s.MemoryTotal)
		}
	}
	return n
}

// freeing returns slots as they will be once victims sleep: their memory
// free, their claims gone, their GPUs not busy on their account.
func freeing(slots []Slot, victims []*Claim) []Slot {
	out := slices.Clone(slots)
	for i := range out {
		s := &out[i]
		for _, v := range victims {
			if !slices.Contains(v.UUIDs, s.UUID) {
				continue
			}
			if s.Busy == v.Name+givingBack {
				s.Busy = "" // the room it gives back is what is waited for
			}
			share, used := v.share(s.UUID, s.MemoryTotal), usedBy(*s, v.PIDs)
			// What it allocated goes back to free; what it had claimed but
			// not allocated is no longer claimed (a sleeper claims nothing).
			s.MemoryFree += min(used, s.MemoryTotal-s.MemoryFree)
			if v.Phase != Asleep {
				s.Claimed -= min(share-min(used, share), s.Claimed)
			}
		}
	}
	return out
}

func overlaps(a, b []string) bool {
	for _, x := range a {
		if slices.Contains(b, x) {
			return true
		}
	}
	return false
}

func anyOverlap(cs []*Claim, gpus []string) bool {
	for _, c := range cs {
		if overlaps(c.UUIDs, gpus) {
			return true
		}
	}
	return false
}

// evict records victims as being put to sleep for name.
func evict(out *Outcome, claims map[string]*Claim, victims []string, name string) {
	for _, v := range victims {
		if c := claims[v]; c != nil && !c.Evicting {
			c.Evicting = true
			out.Evict[v] = name
		}
	}
}

// Slots lays claims over the readings: a claim counts for the part of its
// share its processes have not allocated yet (a loaded model's memory is
// not counted twice), and a starting or releasing claim makes its GPUs
// busy.
func Slots(devs []Device, claims map[string]*Claim, notes map[string]string) []Slot {
	out := make([]Slot, len(devs))
	for i, d := range devs {
		out[i] = Slot{Device: d, Note: notes[d.UUID]}
	}
	for _, name := range sortedNames(claims) {
		c := claims[name]
		for i := range out {
			s := &out[i]
			if !slices.Contains(c.UUIDs, s.UUID) {
				continue
			}
			share, used := c.share(s.UUID, s.MemoryTotal), usedBy(*s, c.PIDs)
			if c.Phase != Asleep {
				// A sleeper holds only what the readings show.
				s.Claimed += share - min(used, share)
			}
			switch {
			case c.Phase == Starting:
				s.Busy = name + " is starting"
			case c.Phase == Releasing:
				s.Busy = name + "'s memory is being released"
			case c.Changing && s.Busy == "":
				s.Busy = name + givingBack
			}
		}
	}
	return out
}

// reusable reports whether reservation c can serve r: the same request
// and every GPU still up.
func reusable(c Claim, r Request, up map[string]bool) bool {
	if c.Req.TP != r.TP || c.Req.Util != r.Util || !slices.Equal(c.Req.Pins, r.Pins) {
		return false
	}
	for _, u := range c.UUIDs {
		if !up[u] {
			return false
		}
	}
	return true
}

func busyOn(slots []Slot, uuids []string) string {
	for _, s := range slots {
		if slices.Contains(uuids, s.UUID) && s.Busy != "" {
			return fmt.Sprintf("GPU%d: %s", s.Index, s.Busy)
		}
	}
	return ""
}

func markBusy(slots []Slot, uuids []string, name string) {
	for i := range slots {
		if slices.Contains(uuids, slots[i].UUID) {
			slots[i].Busy = name + " is starting"
		}
	}
}

func indexes(slots []Slot, uuids []string) string {
	var out []string
	for _, s := range slots {
		if slices.Contains(uuids, s.UUID) {
			out = append(out, fmt.Sprintf("GPU%d", s.Index))
		}
	}
	if len(out) == 0 {
		return strings.Join(uuids, ", ")
	}
	return strings.Join(out, ", ")
}

// onGPUs returns the pids still holding memory on any of uuids.
func onGPUs(devs []Device, uuids []string, pids []int) []int {
	var out []int
	for _, d := range devs {
		if !slices.Contains(uuids, d.UUID) {
			continue
		}
		for _, p := range d.Processes {
			if slices.Contains(pids, p.PID) && !slices.Contains(out, p.PID) {
				out = append(out, p.PID)
			}
		}
	}
	slices.Sort(out)
	return out
}

func sortedNames(m map[string]*Claim) []string {
	out := make([]string, 0, len(m))
	for n := range m {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}
