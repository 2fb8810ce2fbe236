//go:build !e2e

package main

import (
	"fmt"
	"go/ast"
	"go/build/constraint"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
)

// e2ePackages are the packages make e2e runs with -tags e2e (the
// Makefile's E2E_PACKAGES).
var e2ePackages = []string{"cmd/citadel-supervisor"}

// otherTargets are the build tags of the tests other targets run: make
// bench, make upgrade-compat (CI runs it), make nvml-check (a GPU host).
var otherTargets = []string{"benchdriver", "upgradecompat", "nvml"}

// TestEveryTestRunsOnce: make test runs every package's tests without
// tags, make e2e runs e2ePackages' with -tags e2e, and each test must run
// in exactly one of them. In e2ePackages a file with tests is tagged e2e
// or !e2e (an untagged one would run in both); elsewhere none is tagged
// e2e (it would run in neither). Tests tagged for another target are that
// target's.
func TestEveryTestRunsOnce(t *testing.T) {
	root := moduleRoot(t)
	var problems []string
	count := map[string]int{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && path != root && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, "_test.go") {
			return nil
		}
		rel, _ := filepath.Rel(root, path)
		tests, expr, err := testsIn(path)
		if err != nil {
			return err
		}
		if len(tests) == 0 {
			return nil
		}
		inTest, inE2E := builds(expr, nil), builds(expr, []string{"e2e"})
		if !slices.Contains(e2ePackages, filepath.Dir(rel)) {
			inE2E = false
		}
		switch {
		case inTest && inE2E:
			problems = append(problems, fmt.Sprintf("%s: %s run in both make test and make e2e: tag the file e2e or !e2e", rel, strings.Join(tests, ", ")))
		case inTest:
			count["make test"] += len(tests)
		case inE2E:
			count["make e2e"] += len(tests)
		default:
			i := slices.IndexFunc(otherTargets, func(tag string) bool { return builds(expr, []string{tag}) })
			if i < 0 {
				problems = append(problems, fmt.Sprintf("%s: %s run nowhere (constraint %v)", rel, strings.Join(tests, ", "), expr))
			} else {
				count[otherTargets[i]] += len(tests)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Error(p)
	}
	if count["make test"] == 0 || count["make e2e"] == 0 {
		t.Errorf("found no tests of make test or of make e2e: %v", count)
	}
	t.Logf("tests by target: %v", count)
}

// testsIn returns the names of the tests and fuzz targets in a test file
// and its build constraint (nil without one).
func testsIn(path string) ([]string, constraint.Expr, error) {
	f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ParseComments|parser.SkipObjectResolution)
	if err != nil {
		return nil, nil, err
	}
	var expr constraint.Expr
	for _, g := range f.Comments {
		if g.Pos() > f.Package {
			break
		}
		for _, c := range g.List {
			if constraint.IsGoBuild(c.Text) {
				if expr, err = constraint.Parse(c.Text); err != nil {
					return nil, nil, fmt.Errorf("%s: %w", path, err)
				}
			}
		}
	}
	var tests []string
	for _, d := range f.Decls {
		fn, ok := d.(*ast.FuncDecl)
		if !ok || fn.Recv != nil || fn.Name.Name == "TestMain" {
			continue
		}
		if strings.HasPrefix(fn.Name.Name, "Test") || strings.HasPrefix(fn.Name.Name, "Fuzz") {
			tests = append(tests, fn.Name.Name)
		}
	}
	return tests, expr, nil
}

// builds reports whether a file with constraint expr is built for a test
// run on this machine with -race and tags.
func builds(expr constraint.Expr, tags []string) bool {
	if expr == nil {
		return true
	}
	return expr.Eval(func(tag string) bool {
		switch tag {
		case runtime.GOOS, runtime.GOARCH, "unix", "gc", "cgo", "race":
			return true
		}
		return strings.HasPrefix(tag, "go1.") || slices.Contains(tags, tag)
	})
}

// moduleRoot is the directory of the go.mod above the package's.
func moduleRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test's directory")
		}
		dir = parent
	}
}

// TestCommentsCiteWhatExists: the code's comments, the scripts, the units
// and the docs cite the operator documentation in docs/, which is in this
// repository; never a contract file that is not (an outside specification
// by section).
// cites says whether a file is one whose comments TestCommentsCiteWhatExists
// reads.
func cites(path string) bool {
	switch filepath.Ext(path) {
	case ".go", ".md", ".sh", ".service", ".yaml", ".yml", ".conf", ".cfg", ".json":
		return true
	}
	switch filepath.Base(path) {
	case "Makefile", "run", "test-procs":
		return true
	}
	return false
}

func TestCommentsCiteWhatExists(t *testing.T) {
	root := moduleRoot(t)
	cite := regexp.MustCompile(`docs/([a-z0-9_-]+\.md)`)
	outside := "SPEC" + " §"
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && path != root && (strings.HasPrefix(d.Name(), ".") || d.Name() == "testdata" || d.Name() == "bin") {
			return filepath.SkipDir
		}
		if d.IsDir() || !cites(path) {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		for i, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, outside) {
				t.Errorf("%s:%d cites %q, a file not in this repository: cite docs/ instead", rel, i+1, outside)
			}
			for _, m := range cite.FindAllStringSubmatch(line, -1) {
				if _, err := os.Stat(filepath.Join(root, "docs", m[1])); err != nil {
					t.Errorf("%s:%d cites docs/%s, which does not exist", rel, i+1, m[1])
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
