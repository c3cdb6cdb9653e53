# Two commands do all the set-up on a fresh machine (see README):
#   make run    the main job on the embedded default data
#   make test   the test suite
# Both create the virtual environment in .venv and install the pinned versions (constraints.txt) when it is
# missing or out of date, and reuse it otherwise.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# timm 1.0.31's GatherExcite cannot be constructed; the parity test runs timm 1.0.19 from this folder.
TIMM_LEGACY := $(VENV)/timm-1.0.19
# pytest-xdist workers: one per core, at most 4 (the tests are CPU-bound)
JOBS ?= $(shell $(PYTHON) -c "import os; print(min(4, os.cpu_count() or 1))")

.PHONY: run test test-slow install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps --target $(TIMM_LEGACY) timm==1.0.19
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/attnkit compare

test: $(STAMP)
	ATTNKIT_TIMM_LEGACY=$(abspath $(TIMM_LEGACY)) $(BIN)/python -m pytest -q -n $(JOBS)

test-slow: $(STAMP)
	ATTNKIT_TIMM_LEGACY=$(abspath $(TIMM_LEGACY)) $(BIN)/python -m pytest -q -n $(JOBS) -m slow

clean:
	rm -rf $(VENV)
