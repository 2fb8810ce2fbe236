package supervisor

import (
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestNoSubpackageImportsItsParent keeps the tree's direction
// (docs/architecture.md): the packages under supervisor/ (the gateway, the
// control socket and its wire, live restore, the process table, systemd,
// the web endpoints) are used by the supervisor and by cmd/, never the
// other way round, so each can be read, tested and changed on its own.
func TestNoSubpackageImportsItsParent(t *testing.T) {
	const parent = "citadel-supervisor/supervisor"
	fset := token.NewFileSet()
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || filepath.Dir(path) == "." || !strings.HasSuffix(path, ".go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		for _, imp := range f.Imports {
			if p, _ := strconv.Unquote(imp.Path.Value); p == parent {
				t.Errorf("%s imports %s: give it what it needs as an interface or a type of its own", path, parent)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
