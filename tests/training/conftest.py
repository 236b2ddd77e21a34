"""Shared set-up of the ``roi-ops train`` tests: the committed toy model, small data folders of the synthetic
world, and an in-process CLI runner that returns (exit status, stdout, stderr)."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_MODEL = os.path.join(ROOT, "benchmarks", "instance_control", "checkpoints", "model")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def write_world(folder, n: int, start: int = 0) -> str:
    from instance_control.make_dataset import write_dataset

    return write_dataset(os.fspath(folder), n, seed=0, resolution=32, start=start)


@pytest.fixture(scope="session")
def world_data(tmp_path_factory):
    """12 training layouts of the toy world as a data folder (read-only for the tests)."""
    return write_world(tmp_path_factory.mktemp("world"), 12)


@pytest.fixture
def cli(capsys):
    """Run ``roi-ops`` in-process: returns (status, out, err)."""
    from accelerate.state import AcceleratorState

    from roi_ops.cli import main

    def run(*argv):
        AcceleratorState._reset_state(True)  # one Accelerator per run, as in a fresh process
        capsys.readouterr()
        status = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def write_lines(folder, lines, images=("a.png",)):
    """A data folder with ``images`` (solid 40x24 PNGs) and ``metadata.jsonl`` made of ``lines`` (dicts are
    dumped, strings written as they are)."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for name in images:
        Image.new("RGB", (40, 24), (200, 30, 30)).save(os.path.join(folder, name))
    with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return os.fspath(folder)
