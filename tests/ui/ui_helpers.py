"""Shared by the ``roi-ops ui`` tests: the toy model, a two-instance layout, a server in a subprocess, and the
colour check of the benchmark's scorer."""

from __future__ import annotations

import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOY = ROOT / "benchmarks" / "instance_control" / "checkpoints"
MODEL, ADAPTER = TOY / "model", TOY / "roictrl"
#: Two instances of the toy world (colours of its palette, shapes it draws), boxes apart.
INSTANCES = [
    {"box": [0.08, 0.1, 0.45, 0.45], "caption": "a red square"},
    {"box": [0.55, 0.5, 0.92, 0.9], "caption": "a blue circle"},
]
PROMPT = "a red square and a blue circle"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(log_path, *extra, timeout: float = 180.0):
    """``roi-ops ui`` on the toy model at 127.0.0.1:<free port> in a subprocess; yields its URL once the page
    answers. Its output goes to ``log_path`` (shown when it does not start). Stopped (SIGTERM) on exit."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "roi_ops.cli", "ui", "--model", str(MODEL), "--adapter", str(ADAPTER),
           "--port", str(port), "--device", "cpu", *extra]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"roi-ops ui exited with {proc.returncode}:\n{pathlib.Path(log_path).read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"roi-ops ui did not answer in {timeout} s:\n{pathlib.Path(log_path).read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def colours_in_boxes(image, instances) -> list[dict]:
    """The benchmark scorer on ``image`` (PIL or a path) for ``instances`` captioned 'a <colour> <shape>': one
    result per instance; ``color_ok`` says its colour dominates its box."""
    from PIL import Image

    from instance_control import scorer, world

    if not hasattr(image, "convert"):
        image = Image.open(image)
    pixels = np.asarray(image.convert("RGB"), np.float32).transpose(2, 0, 1) / 255
    layout = world.Layout(tuple(world.Instance(tuple(i["box"]), *i["caption"].split()[1:3]) for i in instances), 0)
    return scorer.score_image(pixels, layout)
