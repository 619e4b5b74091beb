# celery_ckeys developer entry points. Everything runs in ./.venv, created on first use;
# nothing needs a system Redis (an embedded redis-server is used when none is given).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv test lint demo bench bench-quick chaos dist docs matrix clean

help:
	@echo "make demo   - run the example project's scenarios on an embedded Redis"
	@echo "make test   - the test suite (real redis-server, real celery workers)"
	@echo "make lint   - ruff and mypy"
	@echo "make bench  - benchmarks against plain Celery and peer packages"
	@echo "make bench-quick - the hot path's Redis cost, asserted (CI runs it)"
	@echo "make chaos  - the long chaos run (CI runs a short one inside make test)"
	@echo "make dist   - sdist and wheel in dist/, checked with twine"
	@echo "make docs   - the MkDocs site in site/, built offline in strict mode"
	@echo "make matrix - tox: Python 3.9-3.13 x Celery 5.3-5.7, the matrix subset of the tests"

$(STAMP): pyproject.toml example_project/pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 9), "Python 3.9+ is required"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,embedded,metrics,dashboard,docs,lint]" -e ./example_project
	$(BIN)/python -m celery_ckeys.embedded --fetch >/dev/null
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check celery_ckeys tests bench example_project
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/python -m ckeys_example.demo

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/run_all.py

bench-quick: $(STAMP)
	cd bench && ../$(BIN)/python serverside.py

dist: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[release]"
	rm -rf dist build
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m build --outdir dist .  # no byte-compile warnings
	$(BIN)/twine check --strict dist/*

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site  # no banner about MkDocs 2

# Each cell runs the tests that touch what differs between Python and Celery versions
# (task base, signals, worker hooks, the pytest plugin, validation); plain `tox` runs them all.
MATRIX_TESTS ?= tests/test_validation.py tests/test_plugin.py tests/test_keys.py
matrix: $(STAMP)
	$(BIN)/python -m pip install --quiet "tox>=4"
	$(BIN)/tox run $(TOX_ARGS) -e "$$($(BIN)/tox list --no-desc | grep '^py' | paste -sd, -)" -- $(MATRIX_TESTS)

chaos: $(STAMP)
	$(BIN)/python -m pytest tests/test_chaos.py -m chaos --chaos-runs=10000 --timeout=1800 -s

clean:
	rm -rf $(VENV) .tox site .mypy_cache .ruff_cache .pytest_cache .hypothesis *.egg-info
