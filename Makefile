# citadel-supervisor. `make demo` to see it run, `make test` to test it.
GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION  ?= $(shell git rev-parse --verify -q HEAD 2>/dev/null || echo unknown)
LDFLAGS   := -s -w -X main.version=$(VERSION) -X main.revision=$(REVISION)
# NVML's header marks functions we never call as deprecated; cgo would warn
# about each on every clean build.
export CGO_CFLAGS ?= -O2 -g -Wno-deprecated-declarations
DEMO_MODELS := mixtral-8x7b-instruct nous-hermes-2-mixtral openchat-3.5 phi-3-mini-128k \
               yi-34b-chat deepcoder-14b-instruct mimo-vl-7b-rl

.PHONY: all build test vet check-deploy e2e demo clean

all: build

# The daemon links NVML through cgo (dlopen at run time: it starts on hosts
# without a driver); the client and fake-vllm are static.
build:
	@mkdir -p bin
	CGO_ENABLED=1 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/ ./cmd/citadel-supervisor
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/ ./cmd/citadelctl ./cmd/fake-vllm

vet:
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }

test: vet check-deploy
	$(GO) test -race -count=1 ./...

# promtool checks the alerting rules and the dashboard's queries. CI installs
# it (.ci/run); elsewhere its absence is said, not hidden.
check-deploy:
	@if command -v promtool >/dev/null; then deploy/check.sh; \
	elif [ -n "$$CI" ]; then echo "CI: promtool missing; .ci/run installs it (apt-get install prometheus)"; exit 1; \
	else echo "NOTE: promtool not installed: deploy/prometheus and deploy/grafana NOT checked (apt-get install prometheus)"; fi

# End-to-end: a real Prometheus (Debian's package) scrapes a running daemon
# and the models it discovers through /sd.
e2e:
	$(GO) test -tags e2e -count=1 -run E2E -v ./cmd/citadel-supervisor/

# The seven seed models on fake-vllm and two simulated GPUs. Ctrl-C stops
# the daemon, which stops every model.
demo: build
	@mkdir -p $(addprefix .demo/models/,$(DEMO_MODELS)) .demo/run .demo/cache
	./bin/citadel-supervisor --config deploy/demo.yaml

clean:
	rm -rf bin .demo
