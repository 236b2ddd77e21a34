# Randomised property tests (included by the top-level Makefile). The main
# `make test` run is derandomised (hypothesis profile "ci": the same cases on
# every run); this target draws new cases from a seed it prints, so CI covers
# more ground over time and any failure can be replayed:
#   make test-random                           a fresh seed
#   make test-random HYPOTHESIS_SEED=1234      replay that run
# A failure prints the falsifying example and a @reproduce_failure blob.
# HYPOTHESIS_SEED is also used by `make sanitize` (profile "thorough").
ifeq ($(origin HYPOTHESIS_SEED), undefined)
HYPOTHESIS_SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
RANDOM_EXAMPLES ?= 30
RANDOM_TESTS ?= tests

.PHONY: test-random
test-random: build
	@echo "hypothesis seed $(HYPOTHESIS_SEED) (replay: make test-random HYPOTHESIS_SEED=$(HYPOTHESIS_SEED))"
	HYPOTHESIS_PROFILE=random HYPOTHESIS_MAX_EXAMPLES=$(RANDOM_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider \
	  -m hypothesis --hypothesis-seed=$(HYPOTHESIS_SEED) $(RANDOM_TESTS) $(PYTEST_ARGS)
