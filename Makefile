# One-command set-up on a fresh machine: every target creates .venv and
# installs what it needs when missing.
#   make test    - build and run the test suite (what CI runs)
#   make demo    - build and write the demo picture
#   make bench   - CPU benchmarks (JSON under benchmarks/results/)
#   make test-random - the hypothesis tests on random cases, seed printed (mk/hypothesis.mk)
#   make sanitize - the CPU kernels under AddressSanitizer + UBSan, hypothesis tests
#   make cmake-test - the LibTorch (C++ only) build and its ctest smoke test
#   make ui-test - roi-ops ui in headless Chromium (mk/ui.mk; not in CI)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The exact pin matters: it is the local CPU wheel; anything else pulls CUDA wheels.
TORCH_PIN := torch==2.13.0
DEPS := numpy pytest hypothesis pytest-benchmark expecttest pillow matplotlib \
        "diffusers>=0.30" transformers safetensors accelerate tqdm ninja "setuptools>=77" wheel \
        "gradio>=6.31" gradio_client
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
	$(PY) -m roi_ops.demo --toy-model benchmarks/instance_control/checkpoints

bench: build
	$(PY) benchmarks/bench_ops.py

clean:
	rm -rf build roi_ops/_C*.so $(BUILD_STAMP) cmake-build

-include mk/*.mk

CMAKE_BUILD := cmake-build
cmake-test: $(STAMP)
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build $(CMAKE_BUILD) -j2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# The kernels built with AddressSanitizer + UBSan into build/sanitize (the
# normal build is untouched), then the op tests run against that copy with the
# sanitizer runtimes preloaded into the (uninstrumented) Python.
SANITIZE_DIR := build/sanitize
SANITIZE_EXAMPLES ?= 40
SANITIZE_TESTS ?= tests/test_roi_align.py tests/test_roi_unpool.py tests/test_validation.py tests/test_properties.py tests/test_blend.py tests/test_hardening.py
sanitize: $(STAMP)
	rm -rf $(SANITIZE_DIR) && mkdir -p $(SANITIZE_DIR)
	ROI_OPS_SANITIZE=1 ROI_OPS_WITH_CUDA=0 MAX_JOBS=2 $(PY) setup.py -q build_ext \
	  --build-lib $(SANITIZE_DIR)/lib --build-temp $(SANITIZE_DIR)/tmp
	cp -r roi_ops/*.py $(SANITIZE_DIR)/lib/roi_ops/
	@# run from the sanitized copy: the repository root (the usual first entry
	@# of sys.path) holds the normal build, which must not be the one tested
	cd $(SANITIZE_DIR)/lib && LD_PRELOAD="$$(gcc -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0 \
	  $(CURDIR)/$(PY) -c "import roi_ops._C as c, sys; sys.exit(0 if '$(SANITIZE_DIR)' in c.__file__ else 'loaded ' + c.__file__)"
	@# hypothesis profile "thorough" (random cases) from a printed seed: mk/hypothesis.mk
	@echo "hypothesis seed $(HYPOTHESIS_SEED) (replay: make sanitize HYPOTHESIS_SEED=$(HYPOTHESIS_SEED))"
	cd $(SANITIZE_DIR)/lib && \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so):$$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	HYPOTHESIS_PROFILE=thorough HYPOTHESIS_MAX_EXAMPLES=$(SANITIZE_EXAMPLES) \
	  $(CURDIR)/$(PY) -m pytest -q -p no:cacheprovider --rootdir $(CURDIR) -c $(CURDIR)/pyproject.toml \
	  --hypothesis-seed=$(HYPOTHESIS_SEED) -k "not compile" $(addprefix $(CURDIR)/,$(SANITIZE_TESTS))
