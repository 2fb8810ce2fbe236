package config

import (
	"os"
	"testing"
)

// TestMain fixes the ephemeral port range the derived VLLM_PORT blocks
// avoid to the kernel's default, so expected texts do not depend on the
// host the tests run on.
func TestMain(m *testing.M) {
	localPortRange = func() PortRange { return linuxDefaultEphemeral }
	os.Exit(m.Run())
}
