# Two commands on a fresh clone: `make run` serves, `make test` proves it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint typecheck unit proto migrate audit clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP)

## run: serve on 127.0.0.1:50051 with the embedded SQLite database (migrated on start).
run: install
	$(BIN)/credits-server --migrate

## test: lint, type-check and the whole test suite (SQLite and Postgres).
test: install lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src clients tests scripts
	$(BIN)/ruff format --check src/store src/server clients tests scripts

typecheck: install
	$(BIN)/mypy

## proto: regenerate the Python stubs from protos/ (a test fails when they are stale).
proto: install
	$(BIN)/python scripts/gen_proto.py

migrate: install
	$(BIN)/credits-server migrate

audit: install
	$(BIN)/credits-server audit

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
