# Every target creates .venv and installs the project first, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast test-istiod istiod demo bench bench-quick bench-forward bench-lazy bench-tunnel bench-usage soak lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not istiod"

# Istio's own Istiod (istiod/, Go) as the upstream: built from the istio.io/istio module through
# the Go module proxy (first build about 5 minutes on two cores, 2 GB of modules; cached after).
ISTIOD := build/istiod/istiod
GO ?= go
$(ISTIOD): istiod/go.mod istiod/go.sum istiod/main.go
	@command -v $(GO) >/dev/null 2>&1 || { echo "make istiod: needs Go 1.26 on PATH (not found); make test does not"; exit 1; }
	cd istiod && CGO_ENABLED=0 GOTOOLCHAIN=local $(GO) build -trimpath -o ../$(ISTIOD) .

istiod: $(ISTIOD)

test-istiod: $(STAMP) $(ISTIOD)
	$(BIN)/python -m pytest -q -m istiod tests/istiod

# The pure and in-process tests only (no Envoy, no child process, no long real waits): the
# quick loop while working, under a minute. `make test` (everything) is what CI and the README
# run.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not envoy and not process and not slow and not istiod"

demo: $(STAMP)
	$(BIN)/xdsproxy demo

# Every benchmark at full size; figures in benchmarks/results/*.json and benchmarks/RESULTS.md.
# About an hour on two cores.
bench: bench-forward bench-lazy bench-tunnel bench-usage
	$(BIN)/python -m benchmarks.scale
	$(BIN)/python -m benchmarks.churn
	$(BIN)/python -m benchmarks.storm
	$(BIN)/python -m benchmarks.learn_timing
	$(BIN)/python -m benchmarks.learn_stages
	$(BIN)/python -m benchmarks.recovery
	$(BIN)/python -m benchmarks.scope_writes
	$(BIN)/python -m benchmarks.plots

# Every benchmark at small sizes, into build/bench-quick (the committed figures stay): run in
# CI so that no benchmark rots unnoticed. A few minutes.
QUICK := XDSPROXY_BENCH_DIR=build/bench-quick
bench-quick: $(STAMP)
	rm -rf build/bench-quick
	$(QUICK) $(BIN)/python -m benchmarks.forward --sizes 1000
	$(QUICK) $(BIN)/python -m benchmarks.lazy --sizes 100 500 --k 5 20 --tcp-every 10 --learns 5 --learn-services 100
	$(QUICK) $(BIN)/python -m benchmarks.tunnel --per-kind 200 --learns 3 --learn-services 100 --transfer-mib 8
	$(QUICK) $(BIN)/python -m benchmarks.usage
	$(QUICK) $(BIN)/python -m benchmarks.scale --services 200 --clients 10 20 --cds-only-clients 10 --lazy-clients 10 --settle 1
	$(QUICK) $(BIN)/python -m benchmarks.churn --services 200 --runs sotw:10 delta:10 --seconds 3 --trace 5
	$(QUICK) $(BIN)/python -m benchmarks.storm --services 100 --clients 20
	$(QUICK) $(BIN)/python -m benchmarks.soak --services 50 --clients 5 --minutes 0.25
	$(QUICK) $(BIN)/python -m benchmarks.learn_timing --runs 2
	$(QUICK) $(BIN)/python -m benchmarks.learn_stages --sizes 200 --learns 4 --batch 4 --stores memory sqlite
	$(QUICK) $(BIN)/python -m benchmarks.recovery --runs 1 --outage 2
	$(QUICK) $(BIN)/python -m benchmarks.scope_writes --runs 2 --services 100
	$(QUICK) $(BIN)/python -m benchmarks.plots
	@echo "bench-quick: figures in build/bench-quick"

bench-forward: $(STAMP)
	$(BIN)/python -m benchmarks.forward

bench-lazy: $(STAMP)
	$(BIN)/python -m benchmarks.lazy

bench-tunnel: $(STAMP)
	$(BIN)/python -m benchmarks.tunnel

bench-usage: $(STAMP)
	$(BIN)/python -m benchmarks.usage

# Ten minutes each (SotW, Delta) under endpoint churn; not part of `make test`.
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache
