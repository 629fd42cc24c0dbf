# `make reproduce` runs the FSM figure reproduction, `make test` the whole test suite (slow tier and notebooks
# included), `make test-fast` the fast tier only (-m "not slow", for development), `make test-tl4` the fast tier on
# transformer-lens 4 in its own .venv-tl4 (tools/tl_other_env.sh). Each first builds its virtual environment (only
# when pyproject.toml or the constraints changed).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.cbinterp-installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: reproduce test test-fast test-tl4 setup
reproduce: $(STAMP)
	$(VENV)/bin/python benchmarks/fsm_precision.py $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-tl4:
	tools/tl_other_env.sh $(PYTEST_ARGS)

setup: $(STAMP)

# torch is pinned to the CPU build that lies on this machine's disk: an unpinned torch pulls a CUDA build of several GB.
$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c requirements/constraints.txt torch
	$(VENV)/bin/python -m pip install --quiet -c requirements/constraints.txt -e ".[dev]"
	touch $(STAMP)
