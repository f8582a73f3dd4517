# The two commands: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: run test bench lint typecheck protos protos-check buf-lint buf-breaking unit clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/collab up

test: $(STAMP) protos-check buf-lint buf-breaking lint typecheck
	$(BIN)/python -m pytest

# The quick loop: tests of code in-process only (not those that start the hub's processes,
# which include all of tests/integration, nor the wheel test of tests/packaging).
unit: $(STAMP)
	$(BIN)/python -m pytest -m "not integration and not packaging"

# The full benchmark run (minutes); make test runs its smoke configuration only.
bench: $(STAMP)
	$(BIN)/python -m bench

.PHONY: frontend screenshots
# The dashboard's npm libraries, installed exactly as bridge/frontend/package-lock.json pins
# them and copied (with their licences) into bridge/static/vendor, which is committed: pip
# install and CI need no npm. Run after changing package.json (then `npm install` there).
frontend:
	cd bridge/frontend && npm ci --ignore-scripts --no-audit --no-fund && node vendor.mjs

# Screenshots of each dashboard view, with a simulated team, into docs/img/ (needs Chromium).
screenshots: $(STAMP)
	$(BIN)/python -m bench.frames --screenshots docs/img

protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

protos-check: $(STAMP)
	$(BIN)/python scripts/gen_protos.py --check

buf-lint: $(STAMP)
	$(BIN)/buf lint

# Compares the proto with main's; skipped where there is no main to compare with.
buf-breaking: $(STAMP)
	@if git rev-parse --verify --quiet main >/dev/null && git cat-file -e main:buf.yaml 2>/dev/null; then \
		$(BIN)/buf breaking --against '.git#branch=main'; \
	else echo "buf breaking: no main branch with buf.yaml to compare against; skipped"; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
