"""pytest set-up for the ROICtrl adapter tests (builders live in roictrl_testutils.py)."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch

# diffusers and safetensors are test requirements (the Makefile installs them):
# a missing one must fail the run, not skip the adapter suite silently.
import diffusers  # noqa: E402,F401
import safetensors  # noqa: E402,F401

# test modules import their builders as a plain module
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def diffusers_log():
    """Collects every message diffusers logs (its loggers do not propagate to pytest's caplog)."""

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(level=logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    handler = Collect()
    root = logging.getLogger("diffusers")
    root.addHandler(handler)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)



@pytest.fixture(autouse=True)
def _one_thread():
    """The models here are tiny: one thread is faster than two fighting over a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
