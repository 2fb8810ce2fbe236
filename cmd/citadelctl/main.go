// Command citadelctl is the operator's client of citadel-supervisor's
// control socket.
package main

import (
	"fmt"
	"os"
)

func main() {
	fmt.Fprintln(os.Stderr, "citadelctl: the control socket is not implemented yet")
	os.Exit(3)
}
