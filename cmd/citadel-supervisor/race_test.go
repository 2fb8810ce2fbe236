//go:build race

package main

// The race detector keeps shadow memory for the Go heap and runs the
// garbage collector less eagerly: the daemon built with it (the test
// binary re-executed) holds several times the heap a release build does.
// The soak's memory bounds are those of a release build, times this.
const raceMemory = 4
