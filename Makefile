# The two commands: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: run test test-crewai bench lint typecheck protos protos-check buf-lint buf-breaking unit clean

# The dev venv has the hub ([dev] pulls in [server], [redis] and [otel]) and every tool.
# openai-agents (for its integration's tests) pins websockets<17, the hub's [server]
# websockets>=17.4: pip installs it with 16, then 17.4 goes back (agents.tracing never
# imports websockets).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet 'openai-agents>=0.24'
	$(BIN)/python -m pip install --quiet 'websockets>=17.4'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/collab up

# The suite's processes: most tests wait on real processes, sockets and browsers, so two
# keep two cores busy where one left most of a core idle (docs/DEVELOPMENT.md). Not
# --dist loadfile: it keys tests by node id and silently drops schemathesis' items, which
# share one.
TEST_WORKERS ?= 2

test: $(STAMP) protos-check buf-lint buf-breaking lint typecheck
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

# CrewAI's integration test, in a venv of its own: CrewAI is about 1 GB installed and pins
# pydantic<2.13 and openai<3, which the dev venv's other frameworks do not allow. The test
# reports to a real collab-server: [server] too.
CREWAI_VENV := .venv-crewai
$(CREWAI_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(CREWAI_VENV)
	$(CREWAI_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(CREWAI_VENV)/bin/python -m pip install --quiet -e '.[server,crewai]' 'pytest>=9' 'pytest-timeout>=2.4' 'pytest-asyncio>=1.5'
	touch $@

test-crewai: $(CREWAI_VENV)/.installed
	COLLAB_REQUIRE_CREWAI=1 $(CREWAI_VENV)/bin/python -m pytest -p no:cacheprovider tests/clients/python/integrations/test_crewai.py

# The quick loop: tests of code in-process only (not those that start the hub's processes,
# which include all of tests/integration, nor the wheel test of tests/packaging).
unit: $(STAMP)
	$(BIN)/python -m pytest -m "not integration and not packaging"

# The full benchmark run (minutes); make test runs its smoke configuration only.
bench: $(STAMP)
	$(BIN)/python -m bench

.PHONY: bench-fanout bench-node
# socket.io on Node, the fan-out's second peer, exactly as bench/node/package-lock.json pins it.
bench-node:
	cd bench/node && npm ci --no-audit --no-fund

# Issue 22's fan-out figures: rates x CPU per delivery, saturation against the peers, paced latency.
bench-fanout: $(STAMP) bench-node
	$(BIN)/python -m bench.fanout_rates

.PHONY: frontend screenshots integration-screenshots
# The dashboard's npm libraries, installed exactly as bridge/frontend/package-lock.json pins
# them and copied (with their licences) into bridge/static/vendor, which is committed: pip
# install and CI need no npm. Run after changing package.json (then `npm install` there).
frontend:
	cd bridge/frontend && npm ci --ignore-scripts --no-audit --no-fund && node vendor.mjs

# Screenshots of each dashboard view, with a simulated team, into docs/img/ (needs Chromium).
screenshots: $(STAMP)
	$(BIN)/python -m bench.frames --screenshots docs/img

# Screenshots of the dashboard with each agent framework's agents (OpenAI Agents SDK,
# LangGraph, Pydantic AI, an OTLP exporter), run offline on test models, into docs/img/.
integration-screenshots: $(STAMP)
	$(BIN)/python -m bench.integration_screenshots --out docs/img

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
	rm -rf $(VENV) $(CREWAI_VENV) .mypy_cache .pytest_cache .ruff_cache
