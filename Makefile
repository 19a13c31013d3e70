# make demo: build the environment and run the whole loop on embedded defaults.
# make test: build the environment, then ruff, mypy (src) and pytest.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PIP := $(VENV)/bin/pip
CONSTRAINTS := -c constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install system-deps demo test lint format typecheck unit bench clean

$(VENV)/.stamp-base:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "slmops needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch first and pinned: anything that pulls an unpinned torch would fetch a multi-GB CUDA build.
	$(PIP) install -q $(CONSTRAINTS) torch==2.13.0
	touch $@

$(VENV)/.stamp-llama: $(VENV)/.stamp-base constraints.txt scripts/install-llama-cpp.sh
	scripts/install-llama-cpp.sh $(VENV)
	touch $@

$(VENV)/.stamp-deps: $(VENV)/.stamp-llama pyproject.toml constraints.txt
	$(PIP) install -q $(CONSTRAINTS) -e '.[all]'
	$(PIP) check
	touch $@

install: $(VENV)/.stamp-deps

demo: install
	$(VENV)/bin/slmops demo

lint: install
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

format: install
	$(VENV)/bin/ruff check --fix src tests bench
	$(VENV)/bin/ruff format src tests bench

typecheck: install
	$(VENV)/bin/mypy

system-deps:
	scripts/install-system-deps.sh

unit: install system-deps
	$(VENV)/bin/python -m pytest -q

test: lint typecheck unit

bench: install system-deps
	$(VENV)/bin/python bench/optimize.py
	$(VENV)/bin/python bench/evaluate.py
	$(VENV)/bin/python bench/bundle.py
	$(VENV)/bin/python bench/fleet.py --quick
	$(VENV)/bin/python bench/telemetry.py

clean:
	rm -rf $(VENV) slmops-demo .pytest_cache .mypy_cache .ruff_cache
