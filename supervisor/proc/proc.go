// Package proc reads the Linux process table (/proc) and tracks the process
// tree of one spawned model instance: every process it started, found by
// parent links and by the marker variable every child inherits, never by
// name. It signals only through pidfds opened after checking a process's
// start time, so a recycled PID is never hit.
//
// The supervisor sees a Tree through a small interface of its own
// (supervisor's processTree); the free functions (ReadStat, Children, ...)
// are the table's reads, for metrics, the reaper and the port check.
package proc

// MarkerEnv is set in every model's environment to
// "<supervisor id>/<model>/<instance token>". Children inherit it, so every
// process a model starts carries it, also one that called setpgrp or setsid
// and was re-parented away from the model's tree. It is an explicit tag, not
// name matching: a process is the model's because the model started it.
const MarkerEnv = "CITADEL_SUPERVISOR_INSTANCE"
