# citadel-supervisor. `make demo` to see it run, `make test` to test it.
GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION  ?= $(shell git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)
# The Go files gofmt checks: git's list in a checkout, every .go file in a
# source tarball without .git.
GOFILES   := $(shell git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.demo/*' -not -path './build/*')
LDFLAGS   := -s -w -X main.version=$(VERSION) -X main.revision=$(REVISION)
# NVML's header marks functions we never call as deprecated; cgo would warn
# about each on every clean build.
export CGO_CFLAGS ?= -O2 -g -Wno-deprecated-declarations
DEMO_MODELS := mixtral-8x7b-instruct nous-hermes-2-mixtral openchat-3.5 phi-3-mini-128k \
               yi-34b-chat deepcoder-14b-instruct mimo-vl-7b-rl
# The vLLM release the demo's fake-vllm plays, learned by the daemon from
# package metadata in a virtualenv in miniature (docs/vllm.md).
DEMO_VLLM   := 0.20.1

SHELL_SCRIPTS := deploy/check.sh deploy/e2e/gpu-host.sh deploy/e2e/in-container.sh deploy/e2e/run.sh deploy/e2e/vllm-host.sh .ci/run .ci/test-procs

.PHONY: all build test vet bench soak fuzz fuzz-short check-deploy e2e e2e-daemon e2e-systemd nvml-check upgrade-compat install package demo docs clean

PREFIX    ?= /usr
NFPM      := go run github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.44.0
ARCH      ?= $(shell $(GO) env GOARCH)

all: build

# The daemon links NVML through cgo (dlopen at run time: it starts on hosts
# without a driver); the client and fake-vllm are static.
build:
	@mkdir -p bin
	CGO_ENABLED=1 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/ ./cmd/citadel-supervisor
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/ ./cmd/citadelctl ./cmd/fake-vllm

# The second vet sees the files of the tagged suites (e2e, make bench's,
# make upgrade-compat's, make nvml-check's), which the first does not.
vet:
	$(GO) vet ./...
	$(GO) vet -tags e2e,benchdriver,upgradecompat,nvml ./...
	@$(GO) mod tidy -diff >/dev/null || { echo "go.mod/go.sum are not tidy:"; $(GO) mod tidy -diff; exit 1; }
	@test -z "$$(gofmt -l $(GOFILES))" || { echo "gofmt needed:"; gofmt -l $(GOFILES); exit 1; }

# A process built with -race sleeps a second at its exit by default (so that
# goroutines still running can report races); every test binary and every
# process the tests start from one is such a process. Races are reported
# all the same. A GORACE of your own still wins.
RACE_EXIT := atexit_sleep_ms=0

# docs/cli.md's "What you see" examples, written again from a run of the
# commands against a daemon with fake models (TestDocsCLIExamples, which
# `make test` runs too, fails when they differ). Review the diff.
docs:
	$(GO) test -count=1 -run 'TestDocsCLIExamples' ./cmd/citadelctl/ -update

# Which tests run where; each test runs in exactly one of make test and
# make e2e (TestEveryTestRunsOnce checks), and CI (.ci/run) runs both, with
# -race.
#   make test: every package's tests, under 3 minutes on 2 cores. Of the
#     daemon run as a process (cmd/citadel-supervisor, files tagged !e2e)
#     only what the binary alone does and no lower-level test covers, once
#     each: --check, --version, SIGTERM and SIGHUP, the socket's lock, the
#     HTTP endpoints and the gateway in the daemon, systemd's notify
#     sequence, one upgrade in place (and a refused one, and one to a slow
#     --check), one crash adoption.
#   make e2e: the suites that drive the daemon as a process hard, tagged
#     e2e: upgrades and crash adoption in every corner, hostile children
#     and clients, descriptor exhaustion, the soaks at CI size, the
#     watchdog's timing, on-demand swapping and vLLM versions end to end
#     (their decisions are tested in supervisor/ and gpu/), and a real
#     Prometheus, HAProxy and OpenAI Node SDK; then the package under
#     systemd.
# The tests run with a TMPDIR of their own, so every process they start
# names it; .ci/test-procs fails if any is still running afterwards (none
# may be: the tests kill what they start, also what a SIGKILLed daemon left).
E2E_PACKAGES := ./cmd/citadel-supervisor/

test: vet check-deploy
	@d=$$(mktemp -d /tmp/citadel-test.XXXXXX) && \
	TMPDIR=$$d GORACE="$(RACE_EXIT) $$GORACE" $(GO) test -race -count=1 ./... && \
	TMPDIR=$$d $(MAKE) --no-print-directory fuzz-short && \
	.ci/test-procs $$d && rm -rf $$d

# Go benchmarks, then the driver that runs the daemon and (if Debian's
# supervisor package is installed) supervisord over the same fake-vllm
# children and prints a table, then the gateway against the same fake-vllm
# asked directly, the supervisor's share of a wake, the gateway's memory,
# the eviction policy replayed against LRU, Belady's rule and llama-swap's
# (in ./gpu/, beside gpu.Decide and gpu.EvictionOrder: the order supervisor/schedule
# fills the claims for), and the daemon with 200 models; docs/performance.md
# holds a recent run.
bench:
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 2s ./supervisor/... ./gpu/...
	BENCH_TABLE=$(CURDIR)/build/bench-table.md $(GO) test -tags benchdriver -count=1 -run TestBenchTable -v ./cmd/citadel-supervisor/ | grep -E '^ +\||PASS|FAIL'
	$(GO) test -tags benchdriver -count=1 -run TestBenchGateway -v ./supervisor/gateway/ | grep -E '^ +\||PASS|FAIL'
	$(GO) test -tags benchdriver -count=1 -run TestBenchOnDemand -v ./cmd/citadel-supervisor/ | grep -E '^ +\||PASS|FAIL'
	$(GO) test -tags benchdriver -count=1 -run TestBenchGatewayMemory -v ./cmd/citadel-supervisor/ | grep -E '^ +\||PASS|FAIL'
	$(GO) test -tags benchdriver -count=1 -run TestBenchEviction -v ./gpu/ | grep -E '^ +\||PASS|FAIL'
	$(GO) test -tags benchdriver -count=1 -run TestBenchScale -v ./cmd/citadel-supervisor/ | grep -E '^ +\||PASS|FAIL'

# 200 models on sim GPUs under random faults for two minutes; the gateway
# under every hostile client at once for two minutes; then the swap soak:
# five on-demand models on two sim GPUs, eight clients and faults for ten
# minutes, every invariant of docs/on-demand.md checked at every step (make
# test runs a short TestSoak, make e2e a short one of the other two).
soak:
	$(GO) test -count=1 -timeout 30m -run '^TestSoak$$' -v ./supervisor -args -soak.models=200 -soak.duration=2m
	$(GO) test -tags e2e -count=1 -timeout 30m -run '^TestSoakHostileClients$$' -v ./cmd/citadel-supervisor -args -hostile-clients.duration=2m -hostile-clients.workers=24
	$(GO) test -tags e2e -count=1 -timeout 40m -run '^TestSwapSoak$$' -v ./cmd/citadel-supervisor -args -swap.duration=10m

# The fuzz targets' seed corpora run with every `go test`; these explore.
FUZZ_TARGETS := FuzzParse:./config FuzzOpRequest:./supervisor/control FuzzBodyScan:./supervisor/gateway
fuzz-short:
	@for t in $(FUZZ_TARGETS); do $(GO) test -run '^$$' -fuzz "^$${t%%:*}$$" -fuzztime 10s "$${t#*:}" || exit 1; done

# make fuzz explores these too; their seed corpora run with every go test.
FUZZ_MORE := FuzzPlainUsage:./supervisor/gateway

fuzz:
	@for t in $(FUZZ_TARGETS) $(FUZZ_MORE); do $(GO) test -run '^$$' -fuzz "^$${t%%:*}$$" -fuzztime 5m "$${t#*:}" || exit 1; done

# promtool checks the alerting rules and the dashboard's queries. CI installs
# it (.ci/run); elsewhere its absence is said, not hidden.
check-deploy:
	@if command -v promtool >/dev/null; then deploy/check.sh; \
	elif [ -n "$$CI" ]; then echo "CI: promtool missing; .ci/run installs it (apt-get install prometheus)"; exit 1; \
	else echo "NOTE: promtool not installed: deploy/prometheus and deploy/grafana NOT checked (apt-get install prometheus)"; fi
	@# The shell scripts shipped and run on hosts (deploy/e2e/vllm-host.sh
	@# runs on a GPU host only: here it is at least parsed and linted).
	@for f in $(SHELL_SCRIPTS); do bash -n $$f || exit 1; done
	@if command -v shellcheck >/dev/null; then shellcheck $(SHELL_SCRIPTS) && echo "shellcheck: $(words $(SHELL_SCRIPTS)) scripts clean"; \
	elif [ -n "$$CI" ]; then echo "CI: shellcheck missing; .ci/run installs it (apt-get install shellcheck)"; exit 1; \
	else echo "NOTE: shellcheck not installed: $(SHELL_SCRIPTS) only parsed (apt-get install shellcheck)"; fi

# End-to-end, as root: the daemon as a process under the suites tagged e2e
# (e2e-daemon), among them a real Prometheus (Debian's package) scraping a
# running daemon and the models it discovers through /sd, and two daemons
# behind a real HAProxy configured by citadelctl fleet haproxy; then the
# Debian package is installed in a Debian booted with systemd under
# systemd-nspawn (root filesystem cached in /var/cache/citadel-e2e) and
# driven with systemctl: start, journal, reload, watchdog, stop.
e2e: package e2e-daemon
	deploy/e2e/run.sh

# The suites tagged e2e alone (see "Which tests run where" above), with
# -race. Any user may run them; as root the cgroup ownership mode is
# tested too. TestE2E* need prometheus, haproxy, node and npm (.ci/run
# installs them) and bin/citadelctl.
e2e-daemon: build
	@d=$$(mktemp -d /tmp/citadel-e2e.XXXXXX) && \
	TMPDIR=$$d GORACE="$(RACE_EXIT) $$GORACE" $(GO) test -race -tags e2e -count=1 -timeout 30m -v $(E2E_PACKAGES) && \
	.ci/test-procs $$d && rm -rf $$d

# The NVML backend against a real driver, on a host with an NVIDIA GPU (CI
# has none): builds bin/nvml.test (gpu/nvmlgpu/real_test.go) and runs
# deploy/e2e/gpu-host.sh, which also drives the daemon on nvml. Needs root
# and python3 with torch (its models take real GPU memory).
nvml-check: build
	CGO_ENABLED=1 $(GO) test -c -tags nvml -o bin/nvml.test ./gpu/nvmlgpu/
	deploy/e2e/gpu-host.sh

# Upgrades a daemon built from an earlier commit (UPGRADE_FROM) in place to
# this build, then adopts its models after a SIGKILL: every model keeps its
# process though this build derives children's settings differently
# (docs/vllm.md). Needs this repository's git history and a C compiler.
UPGRADE_FROM ?= b0460ca
upgrade-compat:
	$(GO) test -tags upgradecompat -count=1 -timeout 20m -run TestUpgradeFromEarlierBuild -v ./cmd/citadel-supervisor/ -args -from=$(UPGRADE_FROM)

e2e-systemd: package
	deploy/e2e/run.sh

# The seven seed models on fake-vllm and two simulated GPUs. Ctrl-C stops
# the daemon, which stops every model.
demo:
	@echo "building the daemon, citadelctl and fake-vllm (the first build fetches the Go modules: a minute or two)..."
	@$(MAKE) --no-print-directory build >/dev/null
	@echo "starting the demo: gateway on 127.0.0.1:8000, /metrics on 127.0.0.1:9400, citadelctl --socket .demo/run/supervisor.sock"
	@mkdir -p $(addprefix .demo/models/,$(DEMO_MODELS)) .demo/run/gpu-usage .demo/cache
	@# Each fake model directory gets its real model's config.json (--check
	@# sizes the KV cache from it); the venv's python is fake-vllm.
	@for m in $(DEMO_MODELS); do cp vllm/testdata/models/$$m/config.json .demo/models/$$m/; done
	@rm -rf .demo/venv/lib && mkdir -p .demo/venv/bin .demo/venv/lib/python3.12/site-packages/vllm-$(DEMO_VLLM).dist-info
	@printf 'Metadata-Version: 2.1\nName: vllm\nVersion: $(DEMO_VLLM)\n' > .demo/venv/lib/python3.12/site-packages/vllm-$(DEMO_VLLM).dist-info/METADATA
	@ln -sf ../../../bin/fake-vllm .demo/venv/bin/python3
	./bin/citadel-supervisor --config deploy/demo.yaml

# Everything the package holds, under DESTDIR (empty: this machine).
install: build completions
	install -D -m 0755 bin/citadel-supervisor $(DESTDIR)$(PREFIX)/bin/citadel-supervisor
	install -D -m 0755 bin/citadelctl $(DESTDIR)$(PREFIX)/bin/citadelctl
	install -D -m 0644 deploy/citadel-supervisor.service $(DESTDIR)/lib/systemd/system/citadel-supervisor.service
	install -D -m 0644 deploy/citadel.sysusers $(DESTDIR)$(PREFIX)/lib/sysusers.d/citadel.conf
	install -D -m 0644 deploy/citadel.tmpfiles $(DESTDIR)$(PREFIX)/lib/tmpfiles.d/citadel.conf
	install -D -m 0644 build/citadelctl.bash $(DESTDIR)$(PREFIX)/share/bash-completion/completions/citadelctl
	install -D -m 0644 build/citadelctl.zsh $(DESTDIR)$(PREFIX)/share/zsh/vendor-completions/_citadelctl
	install -d $(DESTDIR)$(PREFIX)/share/doc/citadel-supervisor
	cp -r docs/. deploy/prometheus deploy/grafana deploy/secrets.env.example $(DESTDIR)$(PREFIX)/share/doc/citadel-supervisor/
	@if [ ! -e $(DESTDIR)/etc/citadel/supervisor.yaml ]; then \
		install -D -m 0640 deploy/citadel.yaml $(DESTDIR)/etc/citadel/supervisor.yaml; fi
	@if [ ! -e $(DESTDIR)/etc/default/citadel-supervisor ]; then \
		install -D -m 0644 deploy/citadel-supervisor.default $(DESTDIR)/etc/default/citadel-supervisor; fi

completions: build
	@mkdir -p build
	bin/citadelctl completion bash > build/citadelctl.bash
	bin/citadelctl completion zsh > build/citadelctl.zsh

# The Debian package, built with nfpm (Go-native; fetched through the Go
# module proxy).
package: build completions
	@mkdir -p dist
	VERSION=$(shell echo $(VERSION) | sed 's/^v//; s/^\([0-9a-f]\{7\}\)/0.0.0+\1/') ARCH=$(ARCH) \
		$(NFPM) package --config deploy/nfpm.yaml --packager deb --target dist/

clean:
	rm -rf bin build dist .demo
