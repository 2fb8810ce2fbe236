package proc

import (
	"io/fs"

	"golang.org/x/sys/unix"
)

// ReadSmall reads a file that the kernel generates as it is read (procfs,
// cgroupfs) into buf, growing it as needed, in an open, reads until end of
// file and a close. os.ReadFile adds two fstat calls and an *os.File per
// file, as much again for a file of a few hundred bytes; a /metrics scrape
// reads one or two such files per model (cgroup accounting or each
// process's stat).
func ReadSmall(path string, buf []byte) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd) //nolint:errcheck // read-only
	n := 0
	for {
		if n == len(buf) {
			buf = append(buf, make([]byte, max(512, n))...)
		}
		m, err := unix.Read(fd, buf[n:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, &fs.PathError{Op: "read", Path: path, Err: err}
		}
		if m == 0 {
			return buf[:n], nil
		}
		n += m
	}
}
