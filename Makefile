# Two entry points: `make run` (federated simulation on the synthetic default) and `make test`
# (lint, types, then the test suite).
# Both create the virtual environment on first use. torch is pinned to the CPU wheel 2.13.0.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

run: $(VENV)/.installed
	$(PY) -m simulations.simulate --clients 5 --rounds 10 --output outputs/quick

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m mypy
	$(PY) -m pytest

clean:
	rm -rf outputs .pytest_cache .mypy_cache .ruff_cache
