# embedq: the two set-up commands are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1

# Two test layers (issue 24; tests/conftest.py marks `slow` from the fixtures and helpers a
# test uses): `make test-fast` runs unit, stub and in-process tests, with a per-test timeout
# of FAST_TIMEOUT_S; `make test` runs everything (real servers and processes), 300 s per test
# (pyproject.toml). Both spread tests over XDIST worker processes (pytest-xdist); tests
# using the session's Milvus 2.3.5 servers share one worker (--dist loadgroup), so each
# server starts once. PYTEST_ARGS goes last: `make test PYTEST_ARGS="-k faults -n 0"`.
FAST_TIMEOUT_S ?= 30
XDIST ?= -n 2 --dist loadgroup
PYTEST = PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/with-redis.sh $(BIN)/pytest -q $(XDIST)

.PHONY: venv demo test test-fast lint check clean

$(BIN)/embedq: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU build of torch, pinned: an unpinned torch pulls several GB of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(BIN)/embedq

venv: $(BIN)/embedq

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

test: venv
	$(PYTEST) $(PYTEST_ARGS)

test-fast: venv
	$(PYTEST) -m "not slow" --timeout $(FAST_TIMEOUT_S) $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check embedq tests workers producers scripts
	$(BIN)/mypy

check: lint test

clean:
	rm -rf $(VENV) .demo .pytest_cache .mypy_cache .ruff_cache
