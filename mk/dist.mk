# Distributions (included by the top-level Makefile).
#   make dist   the sdist, then a wheel built from that sdist (not from the
#               tree), into dist/: `python -m build --no-isolation`, i.e.
#               against the torch in .venv (an isolated build would download
#               another, multi-GB CUDA torch). The wheel pins that torch
#               release; the sdist keeps a range (docs/build.md, "Packaging").
# tests/test_packaging.py (part of `make test`) installs both into fresh
# virtual environments.
DIST_DIR ?= dist
DIST_TOOLS := $(VENV)/.dist-tools-installed

.PHONY: dist

$(DIST_TOOLS): $(STAMP)
	$(PY) -m pip install -q build $(TORCH_PIN)
	touch $@

dist: $(DIST_TOOLS)
	rm -f $(DIST_DIR)/roi_ops-*.tar.gz $(DIST_DIR)/roi_ops-*.whl
	MAX_JOBS=2 $(PY) -m build --no-isolation --outdir $(DIST_DIR) .
	@ls -l $(DIST_DIR)/roi_ops-*
