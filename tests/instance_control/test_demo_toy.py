"""`make demo`'s ROICtrl part on the committed toy model: the picture is written, and skipped on request."""

from PIL import Image

from roi_ops import demo


def test_demo_writes_the_toy_model_picture(tmp_path, capsys):
    out, toy_out = tmp_path / "ops.png", tmp_path / "toy.png"
    assert demo.main(["--repeats", "1", "--out", str(out), "--toy-out", str(toy_out), "--toy-seeds", "1"]) == 0
    assert out.is_file() and Image.open(toy_out).size[0] > 600
    assert "skipped" not in capsys.readouterr().out


def test_demo_without_the_toy_model(tmp_path, capsys):
    toy_out = tmp_path / "toy.png"
    assert demo.main(["--repeats", "1", "--out", str(tmp_path / "ops.png"), "--toy-out", str(toy_out),
                      "--toy-model", str(tmp_path / "missing")]) == 0
    assert not toy_out.exists() and "no toy model" in capsys.readouterr().out
    assert demo.main(["--repeats", "1", "--out", str(tmp_path / "ops.png"), "--toy-model", "none"]) == 0
