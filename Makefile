# Every target does its own set-up from a fresh clone: a virtual environment with the pinned
# development requirements, then the extension built in place.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.requirements-installed
BUILT := $(VENV)/.extension-built
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: all demo test bench clean

all: $(BUILT)

$(INSTALLED): requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(BUILT): $(INSTALLED) $(SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

demo: $(BUILT)
	$(PY) -m torch_spatialnorm.demo

test: $(BUILT)
	$(PY) -m pytest -q tests

bench: $(BUILT)
	$(PY) benchmarks/bench.py --device cpu

clean:
	rm -rf build dist *.egg-info torch_spatialnorm/*.so $(BUILT)
