# The two commands that matter: `make run` (the worker on embedded defaults) and `make test`
# (the whole suite against real servers; `.ci/run` calls exactly this). Both work on a fresh
# clone: the virtual environment is created and the project installed on first use.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST := $(BIN)/pytest -p no:cacheprovider

.PHONY: help venv run test test-fast lint bench clean

help:
	@echo "make run        start the worker on embedded defaults (local Prefect server on embedded PostgreSQL)"
	@echo "make test       install, start MariaDB, lint, type-check and run the whole suite"
	@echo "make test-fast  the suite without the slow end-to-end tests"
	@echo "make lint       ruff check, ruff format --check, mypy"
	@echo "make bench      the benchmarks (bench/)"
	@echo "make clean      remove caches and the install stamp (keeps .venv and .ctrl)"

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall when the dependencies change (pyproject.toml newer than the stamp).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	@touch $@

run: venv
	$(BIN)/ctrl-worker run

test: venv
	scripts/ensure-servers.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(PYTEST) -q -n 3 --dist loadfile

test-fast: venv
	scripts/ensure-servers.sh
	$(PYTEST) -q -m "not slow"

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: venv
	scripts/ensure-servers.sh
	$(BIN)/python -m bench

clean:
	rm -f $(STAMP)
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
	find . -path ./$(VENV) -prune -o -path ./.ctrl -prune -o -name __pycache__ -type d \
		-exec rm -rf {} +
