// Command fake-vllm stands in for `python -m vllm.entrypoints.openai.api_server`
// in the demo and in tests; see package fakevllm for its flags.
package main

import (
	"os"

	"citadel-supervisor/supervisor/supervisortest/fakevllm"
)

func main() { os.Exit(fakevllm.Main(os.Args[1:])) }
