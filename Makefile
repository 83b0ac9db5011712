# Every target does its own set-up from a fresh clone: a virtual environment with the pinned
# development requirements, then the extension built in place.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.requirements-installed
BUILT := $(VENV)/.extension-built
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)

.PHONY: all demo test bench clean clang

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

# The Metal tests syntax-check the kernels with clang 19 (Debian's clang-19 package); the CPU
# code-generation tests compile the CPU kernels for aarch64 with it, against Debian's aarch64
# C++ headers (libstdc++-12-dev-arm64-cross), and for x86-64 with it and with GCC 11 (g++-11).
CLANG := clang++-19
AARCH64_HEADERS := /usr/aarch64-linux-gnu/include/c++/12

test: $(BUILT) clang
	$(PY) -m pytest -q tests

# Where apt-get is missing (macOS) the code-generation tests that need them skip, each saying
# what it lacks; the Metal address-space check needs $(CLANG) on the PATH there.
clang:
	@if command -v $(CLANG) >/dev/null && test -d $(AARCH64_HEADERS) && command -v g++-11 >/dev/null; then :; \
	elif command -v apt-get >/dev/null; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq clang-19 libstdc++-12-dev-arm64-cross g++-11 >/dev/null; } || \
		{ echo "make test needs $(CLANG), aarch64 C++ headers and g++-11: install Debian's clang-19," \
		"libstdc++-12-dev-arm64-cross and g++-11 packages" >&2; exit 1; }; \
	else \
		echo "no apt-get here to install $(CLANG), Debian's aarch64 C++ headers and g++-11:" \
		"the code-generation tests that need them skip; the Metal address-space check needs $(CLANG)" >&2; \
	fi

bench: $(BUILT)
	$(PY) benchmarks/bench.py --device cpu --shapes typical

clean:
	rm -rf build dist *.egg-info torch_spatialnorm/*.so $(BUILT)
