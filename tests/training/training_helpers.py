"""Helpers of the ``roi-ops train`` tests (a module of its own: every test folder's ``conftest`` is imported as
``conftest``, so a test importing ``from conftest`` would get another folder's in a whole-suite run)."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOY_MODEL = os.path.join(ROOT, "benchmarks", "instance_control", "checkpoints", "model")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def write_world(folder, n: int, start: int = 0) -> str:
    from instance_control.make_dataset import write_dataset

    return write_dataset(os.fspath(folder), n, seed=0, resolution=32, start=start)


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
