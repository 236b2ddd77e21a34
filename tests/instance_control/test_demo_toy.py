"""`make demo`'s ROICtrl part on the committed toy model: the picture is written, and skipped on request."""

import re
from pathlib import Path

import pytest
from PIL import Image

from roi_ops import demo


ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "benchmarks" / "instance_control" / "checkpoints"


def test_demo_writes_the_toy_model_picture(tmp_path, capsys):
    out, toy_out = tmp_path / "ops.png", tmp_path / "toy.png"
    assert demo.main(["--repeats", "1", "--out", str(out), "--toy-out", str(toy_out), "--toy-seeds", "1",
                      "--toy-model", str(TOY)]) == 0
    assert out.is_file() and Image.open(toy_out).size[0] > 600
    assert "skipped" not in capsys.readouterr().out
    # make demo passes the checkout's toy model (the installed package does not ship it)
    assert re.search(r"roi_ops\.demo --toy-model benchmarks/instance_control/checkpoints\b",
                     (ROOT / "Makefile").read_text())


def test_demo_without_the_toy_model(tmp_path, capsys):
    toy_out = tmp_path / "toy.png"
    with pytest.raises(SystemExit) as e:  # a wrong folder: an error saying how to get the model, before any work
        demo.main(["--repeats", "1", "--out", str(tmp_path / "ops.png"), "--toy-out", str(toy_out),
                   "--toy-model", str(tmp_path / "missing")])
    assert e.value.code == 2 and not (tmp_path / "ops.png").exists()
    assert "no toy model there" in capsys.readouterr().err
    # no --toy-model: the ROICtrl part is skipped with a note saying where the model is
    assert demo.main(["--repeats", "1", "--out", str(tmp_path / "ops.png"), "--toy-out", str(toy_out)]) == 0
    out = capsys.readouterr().out
    assert "skipped the ROICtrl part, which needs --toy-model DIR" in out and "benchmarks/instance_control" in out
    assert not toy_out.exists()
    assert demo.main(["--repeats", "1", "--out", str(tmp_path / "ops.png"), "--toy-model", "none"]) == 0


def test_the_package_does_not_reach_into_the_checkout():
    """Nothing in roi_ops finds files by a path relative to its own location outside the package."""
    for path in (ROOT / "roi_ops").rglob("*.py"):
        assert "parents[1]" not in path.read_text() and "benchmarks\" /" not in path.read_text(), path
