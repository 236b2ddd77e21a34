# One-command set-up on a fresh machine: every target creates .venv and
# installs what it needs when missing.
#   make test    - build and run the test suite (what CI runs)
#   make demo    - build and write the demo picture
#   make bench   - CPU benchmarks (JSON under benchmarks/results/)
#   make sanitize - the CPU kernels under AddressSanitizer + UBSan, hypothesis tests
#   make cmake-test - the LibTorch (C++ only) build and its ctest smoke test
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The exact pin matters: it is the local CPU wheel; anything else pulls CUDA wheels.
TORCH_PIN := torch==2.13.0
DEPS := numpy pytest hypothesis pytest-benchmark expecttest pillow matplotlib \
        "diffusers>=0.30" transformers safetensors ninja setuptools wheel
STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.roi-ops-built
SOURCES := $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh) setup.py

.PHONY: venv build test demo bench sanitize cmake-test clean

venv: $(STAMP)
$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q $(DEPS) $(TORCH_PIN)
	touch $@

build: $(BUILD_STAMP)
$(BUILD_STAMP): $(STAMP) $(SOURCES)
	MAX_JOBS=2 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import roi_ops, sys; sys.exit(0 if roi_ops.native_available('cpu') else 'roi_ops._C failed to load: %s' % roi_ops.native_import_error())"
	touch $@

# pytest exits 5 when it collects nothing: that is a failure here, as is any
# other non-zero exit.
test: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: build
	$(PY) -m roi_ops.demo

bench: build
	$(PY) benchmarks/bench_ops.py

clean:
	rm -rf build roi_ops/_C*.so $(BUILD_STAMP) cmake-build

-include mk/*.mk
