"""pytest set-up for the roi-ops tests: hypothesis profiles and shared fixtures.

Hypothesis profiles (choose with HYPOTHESIS_PROFILE=<name>):
  ci        (default) few examples, derandomized: reproducible and fast on 2 cores
  dev       more examples, random seeds: for local bug hunting
  thorough  many examples, for a nightly or a sanitizer run with time to spare
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
settings.register_profile("thorough", max_examples=1000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_report_header(config):
    try:
        import roi_ops

        native = {d: roi_ops.native_available(d) for d in ("cpu", "cuda")}
        why = roi_ops.native_import_error()
    except Exception as exc:  # the report must not hide a broken import
        return f"roi_ops: import failed: {exc!r}"
    return (f"roi_ops native kernels: {native}" + (f" (import error: {why})" if why else "")
            + f"; torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"hypothesis profile {settings.get_current_profile_name()}")


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
