# Set-up is one stamp file: the venv is created once and reused; torch is pinned
# before the package so that pip takes the local CPU build instead of CUDA wheels. The
# library needs torch, numpy, numba and safetensors; the cli extra adds the command's
# click and rich and the plots' matplotlib (demo, bench), dev the tools and tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.embpress-installed
TORCH_VERSION := 2.13.0

.PHONY: setup demo test lint bench bench-quick bench-big clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[dev,cli]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/embpress demo --out out/demo

test: $(STAMP)
	$(PY) -m ruff check src tests bench
	$(PY) -m mypy
	$(PY) -m pytest -q -n 2 tests

lint: $(STAMP)
	$(PY) -m ruff check src tests bench
	$(PY) -m mypy

bench: $(STAMP)
	$(PY) bench/run_all.py

bench-quick: $(STAMP)
	$(PY) bench/run_all.py --quick --out out/bench-quick

# opt-in: a 60M x 128 float32 table (30.7 GB on disk, more than this machine's RAM),
# compressed by memory map in row chunks; needs about 32 GB free in BIG_TMP
BIG_TMP ?= out
bench-big: $(STAMP)
	mkdir -p $(BIG_TMP)
	$(PY) bench/stream_memory.py --rows 60M --no-procs --tmp $(BIG_TMP) --out out/bench-big

clean:
	rm -rf $(VENV) out build dist src/*.egg-info
