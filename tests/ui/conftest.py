"""pytest set-up for the ``roi-ops ui`` tests: the benchmark's scorer and the helpers of this folder importable.

gradio and gradio_client are test requirements (the Makefile installs them): a missing one fails the run, it does
not skip the suite silently.
"""

import os
import sys

import gradio  # noqa: F401
import gradio_client  # noqa: F401

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "benchmarks"))
sys.path.insert(0, HERE)
