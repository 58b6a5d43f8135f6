# Every target creates .venv and installs the project first, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench bench-quick bench-forward bench-lazy bench-tunnel bench-usage soak lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The pure and in-process tests only (no Envoy, no child process, no long real waits): the
# quick loop while working, under a minute. `make test` (everything) is what CI and the README
# run.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not envoy and not process and not slow"

demo: $(STAMP)
	$(BIN)/xdsproxy demo

# Every benchmark at full size; figures in benchmarks/results/*.json and benchmarks/RESULTS.md.
# About an hour on two cores.
bench: bench-forward bench-lazy bench-tunnel bench-usage
	$(BIN)/python -m benchmarks.scale
	$(BIN)/python -m benchmarks.churn
	$(BIN)/python -m benchmarks.storm
	$(BIN)/python -m benchmarks.learn_timing
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
