"""pytest set-up for the roi-ops tests: hypothesis profiles and shared fixtures.

Hypothesis profiles (choose with HYPOTHESIS_PROFILE=<name>):
  ci        (default) few examples, derandomized: the same cases on every run, fast on 2 cores
  dev       more examples, random seeds: for local bug hunting
  random    random seeds and no example database, so that pytest's --hypothesis-seed=N alone replays a
            run: CI's randomised property run (make test-random prints its seed)
  thorough  many examples, random seeds: make sanitize (with a printed seed), a nightly
HYPOTHESIS_MAX_EXAMPLES=<n> overrides the chosen profile's example count (the Makefile targets size their
runs with it).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

# tests import their shared helpers as a plain module
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

_COMMON = dict(
    deadline=None,  # first calls pay for lazy init; timing is not what we test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile("ci", max_examples=15, derandomize=True, **_COMMON)
settings.register_profile("dev", max_examples=100, **_COMMON)
settings.register_profile("random", max_examples=30, database=None, **_COMMON)
settings.register_profile("thorough", max_examples=1000, **_COMMON)
_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if os.environ.get("HYPOTHESIS_MAX_EXAMPLES"):
    settings.register_profile(_PROFILE, settings.get_profile(_PROFILE),
                              max_examples=int(os.environ["HYPOTHESIS_MAX_EXAMPLES"]))
settings.load_profile(_PROFILE)


def pytest_report_header(config):
    try:
        import roi_ops

        native = {d: roi_ops.native_available(d) for d in ("cpu", "cuda")}
        why = roi_ops.native_import_error()
    except Exception as exc:  # the report must not hide a broken import
        return f"roi_ops: import failed: {exc!r}"
    return (f"roi_ops native kernels: {native}" + (f" (import error: {why})" if why else "")
            + f"; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"hypothesis profile {settings.get_current_profile_name()} "
            f"({settings().max_examples} examples, derandomize={settings().derandomize})")


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for one test, restored after."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


@pytest.fixture
def restore_num_threads():
    """Tests may change torch.set_num_threads; put it back."""
    previous = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(previous)
