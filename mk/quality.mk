# Toy-scale instance-control comparison (docs/quality.md): no control, regional cross-attention (training-free),
# GLIGEN, ROICtrl and four ROICtrl ablations, on the main and the overlap track.
#   make quality            train everything from scratch, then evaluate and measure (CPU; the full run)
#   make quality-eval       evaluate the checkpoints in QUALITY_CKPT only (every method, both tracks)
#   make quality-gligen     train the toy GLIGEN that works (two runs, docs/gligen_toy.md) on the model in QUALITY_CKPT
#   make quality-gligen-4k  train that GLIGEN on to 4.2k steps (gligen_4k/, two more runs from gligen/)
#   make quality-ablations  train the four ROICtrl ablations on the model in QUALITY_CKPT
#   make quality-cost       time and activation memory of a training step, ROI vs masked attention
# QUALITY_CKPT / QUALITY_RESULTS move the checkpoints / results (default: the committed ones are overwritten).
# CI runs a smoke version only (tests/instance_control/test_smoke.py: every stage a few steps, one layout).
QUALITY_CKPT ?= benchmarks/instance_control/checkpoints
QUALITY_RESULTS ?= benchmarks/instance_control/results
# The committed checkpoints were trained with one thread per process (see docs/quality.md).
QUALITY_THREADS ?= 1
QUALITY_ABLATIONS ?= no_guidance no_roi_attn no_reg masked_attn

.PHONY: quality quality-train quality-gligen quality-gligen-4k quality-ablations quality-eval quality-cost

quality: quality-train
	$(MAKE) quality-ablations
	$(MAKE) quality-eval
	$(MAKE) quality-cost

# One process per stage, as the committed checkpoints were made (train_config_*.json in QUALITY_CKPT record
# each command): a stage's random state then does not depend on which stages ran before it in the process.
# ROICtrl and GLIGEN only read the base, so they train side by side (one process each); the recipe fails if
# either fails.
quality-train: build
	$(PY) -m benchmarks.instance_control.train --out $(QUALITY_CKPT) --threads $(QUALITY_THREADS) --stages vae,base
	$(PY) -m benchmarks.instance_control.train --out $(QUALITY_CKPT) --threads $(QUALITY_THREADS) --stages decoder
	$(PY) -m benchmarks.instance_control.train --out $(QUALITY_CKPT) --threads $(QUALITY_THREADS) --stages roictrl & \
	  roictrl=$$!; \
	  $(PY) -m benchmarks.instance_control.train --out $(QUALITY_CKPT) --threads $(QUALITY_THREADS) --stages gligen \
	    --gligen-name gligen_plain && $(MAKE) quality-gligen; \
	  gligen=$$?; wait $$roictrl && test $$gligen -eq 0

# The GLIGEN that works on the toy (docs/gligen_toy.md): 1200 steps with the box-mask curriculum (saved to
# gligen_curriculum/), then 1000 unmasked steps from those weights (saved to gligen/).
quality-gligen: build
	$(PY) -m benchmarks.instance_control.train --out $(QUALITY_CKPT) --threads $(QUALITY_THREADS) --stages gligen \
	  --gligen-name gligen_curriculum --gligen-steps 1200 --gligen-pixel-positions --gligen-pixel-position-init random \
	  --gligen-distinct-tokens --gligen-gate-init 1 --gligen-box-mask-curriculum 200,800 --log-every 20
	$(PY) -m benchmarks.instance_control.train --out $(QUALITY_CKPT) --threads $(QUALITY_THREADS) --stages gligen \
	  --gligen-steps 1000 --gligen-lr 3e-3 --gligen-token-lr-scale 0.333 --gligen-gate-lr-scale 0.333 \
	  --gligen-pixel-positions --gligen-init-from $(QUALITY_CKPT)/gligen_curriculum --log-every 20

# GLIGEN trained on (docs/gligen_toy.md runs L and M): two more runs of 1000 unmasked steps with the second run's
# settings, each from the previous weights (gligen/ -> gligen_L/ -> gligen_4k/). Not part of make quality.
quality-gligen-4k: build
	$(PY) -m benchmarks.instance_control.train --out $(QUALITY_CKPT) --threads $(QUALITY_THREADS) --stages gligen \
	  --gligen-name gligen_L --gligen-steps 1000 --gligen-lr 3e-3 --gligen-token-lr-scale 0.333 \
	  --gligen-gate-lr-scale 0.333 --gligen-pixel-positions --gligen-init-from $(QUALITY_CKPT)/gligen --log-every 50
	$(PY) -m benchmarks.instance_control.train --out $(QUALITY_CKPT) --threads $(QUALITY_THREADS) --stages gligen \
	  --gligen-name gligen_4k --gligen-steps 1000 --gligen-lr 3e-3 --gligen-token-lr-scale 0.333 \
	  --gligen-gate-lr-scale 0.333 --gligen-pixel-positions --gligen-init-from $(QUALITY_CKPT)/gligen_L --log-every 50

# Each ablation: the ROICtrl stage (same data, steps, learning rate, seed, noise) with one part removed.
quality-ablations: build
	for a in $(QUALITY_ABLATIONS); do \
	  $(PY) -m benchmarks.instance_control.train --out $(QUALITY_CKPT) --threads $(QUALITY_THREADS) \
	    --stages roictrl --ablation $$a || exit 1; \
	done

quality-eval: build
	$(PY) -m benchmarks.instance_control.evaluate --ckpt $(QUALITY_CKPT) --out $(QUALITY_RESULTS) --jobs 3

quality-cost: build
	$(PY) -m benchmarks.instance_control.step_cost --ckpt $(QUALITY_CKPT) --out $(QUALITY_RESULTS)/step_cost.json \
	  --threads $(QUALITY_THREADS)
