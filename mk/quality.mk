# Toy-scale instance-control reproduction: ROICtrl vs GLIGEN vs no control (docs/quality.md).
#   make quality        train the toy SD model, ROICtrl and GLIGEN from scratch, then evaluate (CPU)
#   make quality-eval   evaluate the committed checkpoints only
# QUALITY_CKPT / QUALITY_RESULTS move the checkpoints / results (default: the committed ones are overwritten).
QUALITY_CKPT ?= benchmarks/instance_control/checkpoints
QUALITY_RESULTS ?= benchmarks/instance_control/results
# The committed checkpoints were trained with one thread per process (see docs/quality.md).
QUALITY_THREADS ?= 1

.PHONY: quality quality-train quality-eval

quality: quality-train
	$(MAKE) quality-eval

# One process per stage, as the committed checkpoints were made (train_config_*.json in QUALITY_CKPT record
# each command): a stage's random state then does not depend on which stages ran before it in the process.
# ROICtrl and GLIGEN only read the base, so they train side by side (one process each); the recipe fails if
# either fails.
quality-train: build
	$(PY) -m benchmarks.instance_control.train --out $(QUALITY_CKPT) --threads $(QUALITY_THREADS) --stages vae,base
	$(PY) -m benchmarks.instance_control.train --out $(QUALITY_CKPT) --threads $(QUALITY_THREADS) --stages decoder
	$(PY) -m benchmarks.instance_control.train --out $(QUALITY_CKPT) --threads $(QUALITY_THREADS) --stages roictrl & \
	  roictrl=$$!; \
	  $(PY) -m benchmarks.instance_control.train --out $(QUALITY_CKPT) --threads $(QUALITY_THREADS) --stages gligen; \
	  gligen=$$?; wait $$roictrl && test $$gligen -eq 0

quality-eval: build
	$(PY) -m benchmarks.instance_control.evaluate --ckpt $(QUALITY_CKPT) --out $(QUALITY_RESULTS) --jobs 3
