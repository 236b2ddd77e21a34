# CUDA checks that need no GPU (included by the top-level Makefile; also
# usable alone: make -f mk/cuda.mk cuda-check, from the repository root).
#   make cuda-check          both checks below
#   make cuda-compile-check  nvcc compiles every csrc/cuda/*.cu for sm_80, sm_90
#                            (+ sm_100, sm_120 when supported) and rewrites
#                            csrc/cuda/RESOURCE_REPORT.txt; fails on errors,
#                            warnings in our sources and register spills
#   make cuda-emulate-check  the CUDA backend's host code and kernel bodies,
#                            compiled for the host, against the oracle and the
#                            CPU kernels (tools/test_cuda_emulate.py)
# See docs/cuda.md.
CUDA_PY ?= $(or $(PY),$(if $(wildcard .venv/bin/python),.venv/bin/python,python3))

.PHONY: cuda-check cuda-compile-check cuda-emulate-check

cuda-check: cuda-compile-check cuda-emulate-check

# Within the top-level Makefile, depend on its venv / build targets.
cuda-compile-check: $(if $(STAMP),venv)
	$(CUDA_PY) tools/cuda_check.py

cuda-emulate-check: $(if $(BUILD_STAMP),build)
	$(CUDA_PY) -m pytest -q -p no:cacheprovider tools/test_cuda_emulate.py $(PYTEST_ARGS)
