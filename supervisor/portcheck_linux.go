package supervisor

// CheckPort says who holds host:port (a *PortInUseError), as a start would
// before spawning; nil when the port is free. For `citadel-supervisor
// --check`.
func CheckPort(host string, port int) error { return checkPort(host, port) }
