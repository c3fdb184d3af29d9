# Two commands on a fresh clone: `make run` serves, `make test` proves it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install run listener test lint typecheck unit proto migrate audit bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(STAMP)

## run: serve on 127.0.0.1:50051 with the embedded SQLite database (migrated on start).
run: install
	$(BIN)/credits-server --migrate

## listener: the Stripe webhook listener on 127.0.0.1:8080, in front of `make run`'s server, with
## billing.example.toml and its own SQLite database var/listener.db (migrated on start). Needs
## STRIPE_WEBHOOK_SECRETS (the whsec_... that `stripe listen` prints); STRIPE_API_KEY optional.
listener: install
	$(BIN)/credits-listener serve --config billing.example.toml --migrate

## test: lint, type-check and the whole test suite (SQLite and Postgres).
test: install lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src clients tests scripts
	$(BIN)/ruff format --check src/store src/server src/billing clients tests scripts

typecheck: install
	$(BIN)/mypy

## proto: regenerate the Python stubs from protos/ (a test fails when they are stale).
proto: install
	$(BIN)/python scripts/gen_proto.py

migrate: install
	$(BIN)/credits-server migrate

audit: install
	$(BIN)/credits-server audit

## bench: the benchmark against this machine's ceilings (bench/README.md). Options:
## SCALE=1 (also 1M wallets / 10M journal rows), SOAK=seconds (RSS at half peak), SWEEP=1.
bench: install
	@command -v h2load >/dev/null || { echo "h2load missing: apt-get install -y nghttp2-client"; exit 2; }
	SCALE='$(SCALE)' SOAK='$(SOAK)' SWEEP='$(SWEEP)' SCENARIOS='$(SCENARIOS)' PROFILE='$(PROFILE)' \
		$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
