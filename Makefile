# Every target creates .venv and installs the project first, so each works on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo bench-forward bench-lazy bench-usage soak lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/xdsproxy demo

bench-forward: $(STAMP)
	$(BIN)/python -m benchmarks.forward

bench-lazy: $(STAMP)
	$(BIN)/python -m benchmarks.lazy

bench-usage: $(STAMP)
	$(BIN)/python -m benchmarks.usage

# Ten minutes under endpoint churn; not part of `make test`.
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
