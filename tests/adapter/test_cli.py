"""``roi-ops generate`` on a tiny diffusers folder written to disk (no download), and docs/pipeline.md as written."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_pipelines as tp
from roi_ops.cli import main
from roi_ops.roictrl_adapter.generate import boxes_path

DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs" / "pipeline.md"
LAYOUT = {
    "prompt": "a living room",
    "instances": [{"box": [0.05, 0.45, 0.55, 0.95], "caption": "a red sofa"},
                  {"box": [0.6, 0.1, 0.95, 0.6], "caption": "a window"}],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``sd15/`` (a tiny diffusers SD folder) and ``roictrl-adapter/`` (a saved adapter for it)."""
    return tp.save_cli_files(tmp_path_factory.mktemp("cli"), LAYOUT)


def args(root, out, *extra):
    return ["generate", "--model", str(root / "sd15"), "--adapter", str(root / "roictrl-adapter"),
            "--layout", str(root / "layout.json"), "--steps", "2", "--out", str(out), *extra]


def check_outputs(out: pathlib.Path):
    image = np.asarray(Image.open(out))
    drawn = np.asarray(Image.open(boxes_path(out)))
    assert image.shape == drawn.shape == (64, 64, 3)
    changed = (image != drawn).any(-1)
    assert changed.any()
    # the sofa's box outline is drawn: its bottom edge (y = 0.95 * 63 -> 60) changes between its corners...
    assert changed[60, 4:35].all()
    # ...and the middle of the sofa box (no outline, no caption) is the image itself
    assert not changed[45:55, 10:30].any()


def test_generate_writes_the_image_and_the_boxes(files, tmp_path, capsys):
    out = tmp_path / "sub" / "room.png"
    assert main(args(files, out)) == 0
    check_outputs(out)
    assert f"wrote {out}" in capsys.readouterr().out
    # the same seed gives the same image; another seed another one; the adapter changes it
    assert main(args(files, tmp_path / "again.png")) == 0
    assert (np.asarray(Image.open(out)) == np.asarray(Image.open(tmp_path / "again.png"))).all()
    assert main(args(files, tmp_path / "seed1.png", "--seed", "1")) == 0
    assert not (np.asarray(Image.open(out)) == np.asarray(Image.open(tmp_path / "seed1.png"))).all()
    assert main(args(files, tmp_path / "off.png", "--scale", "0")) == 0
    assert not (np.asarray(Image.open(out)) == np.asarray(Image.open(tmp_path / "off.png"))).all()


def test_generate_with_controlnet(files, tmp_path):
    from diffusers import UNet2DConditionModel

    tp.make_controlnet(UNet2DConditionModel.from_pretrained(files / "sd15", subfolder="unet")).save_pretrained(
        tmp_path / "cn"
    )
    tp.control_image().save(tmp_path / "edges.png")
    out = tmp_path / "cn.png"
    assert main(args(files, out, "--controlnet", str(tmp_path / "cn"), "--control-image",
                     str(tmp_path / "edges.png"))) == 0
    check_outputs(out)


def test_console_script(files, tmp_path):
    """The installed ``roi-ops`` script (else ``python -m roi_ops.cli``), in a fresh process, offline."""
    script = shutil.which("roi-ops", path=os.path.dirname(sys.executable))
    cmd = [script] if script else [sys.executable, "-m", "roi_ops.cli"]
    out = tmp_path / "script.png"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, *args(files, out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    check_outputs(out)
    assert "denoising" in proc.stderr  # the progress bar over the steps


def test_help_says_local_files_only(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    assert "Local files only" in help_text and "owner/name" in help_text and '"instances"' in help_text


def _bad_layout(root, tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return ["--layout", str(path)]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r, t: _bad_layout(r, t, "{not json"), "is not valid JSON"),
        (lambda r, t: _bad_layout(r, t, [1, 2]), "must hold a JSON object, got list"),
        (lambda r, t: _bad_layout(r, t, {**LAYOUT, "promt": "x"}), r"unknown keys \['promt'\]"),
        (lambda r, t: _bad_layout(r, t, {"instances": []}), "no prompt: give --prompt"),
        (lambda r, t: _bad_layout(r, t, {**LAYOUT, "width": "64"}), "width must be a positive integer"),
        (lambda r, t: _bad_layout(r, t, {**LAYOUT, "instances": [{"box": [5, 5, 40, 40], "caption": "x"}]}),
         r"instances\[0\]\[0\] box .* looks like pixel coordinates"),
        (lambda r, t: _bad_layout(r, t, {**LAYOUT, "instances": [{"box": [0, 0, 1, 1], "caption": ""}]}),
         "caption must be a non-empty string"),
        (lambda r, t: ["--layout", str(t / "missing.json")], "no such file"),
        (lambda r, t: ["--controlnet", str(r / "sd15")], "--controlnet and --control-image go together"),
        (lambda r, t: ["--steps", "0"], "--steps must be >= 1"),
        (lambda r, t: ["--beta", "2"], r"--beta must be a finite number in \[0, 1\]"),
        (lambda r, t: ["--adapter", str(t / "nope")], "--adapter .*: no such file or folder"),
        (lambda r, t: ["--adapter", str(r / "layout.json")], "is not a ROICtrlAdapter folder"),
        (lambda r, t: ["--model", str(t / "no-model")], "--model .*: no such file or folder"),
        pytest.param(lambda r, t: ["--device", "cuda"], "--device cuda but no CUDA device is available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available")),
    ],
)
def test_generate_bad_inputs_say_what_is_wrong(files, tmp_path, capsys, change, message):
    out = tmp_path / "x.png"
    assert main(args(files, out) + change(files, tmp_path)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert err.splitlines()[-1].startswith("roi-ops generate: error:") and not out.exists()
    if "caption" in message or "pixel" in message:  # layout errors come before the model is loaded
        assert "Loading pipeline components" not in err


def test_cli_structure():
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2
    from roi_ops.cli import SUBCOMMANDS, build_parser

    assert SUBCOMMANDS == ["roi_ops.roictrl_adapter.generate", "roi_ops.roictrl_adapter.convert",
                           "roi_ops.training.prepare", "roi_ops.training.train", "roi_ops.ui.command"]
    assert build_parser().parse_args(["generate", "--model", "m", "--adapter", "a", "--layout", "l", "--out", "o"]).func
    assert build_parser().parse_args(["convert-official", "in.safetensors", "out"]).func
    coco = ["prepare", "coco", "--instances", "i.json", "--captions", "c.json", "--images", "d", "--out", "o"]
    assert build_parser().parse_args(coco).func
    assert build_parser().parse_args(["train", "--model", "m", "--data", "d", "--output-dir", "o"]).func
    assert build_parser().parse_args(["ui", "--model", "m", "--adapter", "a"]).func


def test_docs_pipeline_md_as_written(files, tmp_path, monkeypatch):
    """docs/pipeline.md followed verbatim, with the tiny model in sd15/ and its adapter in roictrl-adapter/."""
    text = DOCS.read_text()
    layout = re.search(r"Write the layout, `layout.json`:\n\n```json\n(.*?)```", text, re.S).group(1)
    commands = [line for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
                if line.startswith("roi-ops ")]
    python = re.search(r"## In Python\n\n```python\n(.*?)```", text, re.S).group(1)
    for name in ("sd15", "roictrl-adapter"):
        shutil.copytree(files / name, tmp_path / name)
    (tmp_path / "layout.json").write_text(layout)
    monkeypatch.chdir(tmp_path)
    assert len(commands) == 1
    assert main(shlex.split(commands[0])[1:]) == 0
    out = pathlib.Path(re.search(r"--out (\S+)", commands[0]).group(1))
    assert out.is_file() and boxes_path(out).is_file()
    scope: dict = {}
    exec(compile(python, str(DOCS), "exec"), scope)
    assert pathlib.Path("room_python.png").is_file()
    # the Python route is the command's: same layout, steps and seed, same image
    assert (np.asarray(Image.open("room_python.png")) == np.asarray(Image.open(out))).all()
    assert scope["sofa_weight"].shape == (64, 64)
