"""roi_ops.ui.layouts: the canvas value <-> the layout JSON of roi-ops generate, and the checked request."""

import json

import pytest

from roi_ops.roictrl_adapter.generate import parse_layout, read_layout
from roi_ops.ui import layouts

CANVAS = {"width": 32, "height": 32, "instances": [
    {"box": [0.08, 0.1, 0.45, 0.45], "caption": "a red square"},
    {"box": [0.55, 0.5, 0.92, 0.9], "caption": "a blue circle"},
]}


def test_layout_from_canvas_is_what_roi_ops_generate_reads(tmp_path):
    layout = layouts.layout_from_canvas("a scene", "", CANVAS)
    assert layout == {"prompt": "a scene", "width": 32, "height": 32, "instances": CANVAS["instances"]}
    path = tmp_path / "layout.json"
    path.write_text(layouts.layout_json(layout), encoding="utf-8")
    read = read_layout(path)  # the CLI's own reader
    assert [(i.box, i.caption) for i in read["instances"]] == [(tuple(i["box"]), i["caption"])
                                                               for i in CANVAS["instances"]]
    assert read["prompt"] == "a scene" and (read["width"], read["height"]) == (32, 32)
    # a negative prompt is kept; an empty prompt is left out when not required
    assert layouts.layout_from_canvas("", "blurry", CANVAS, require_prompt=False)["negative_prompt"] == "blurry"
    assert "prompt" not in layouts.layout_from_canvas("", "", CANVAS, require_prompt=False)


@pytest.mark.parametrize("canvas, message", [
    ({**CANVAS, "instances": [{"box": [0.1, 0.1, 0.5, 0.5], "caption": ""}]},
     "instances[0].caption must be a non-empty string"),
    ({**CANVAS, "instances": [{"box": [0.1, 0.1, 0.5], "caption": "a"}]}, "instances[0].box must be 4 numbers"),
    ({**CANVAS, "instances": [{"box": [0.1, 0.1, 1.5, 0.5], "caption": "a"}]}, "instances[0]"),
    ({**CANVAS, "instances": [{"box": [0.1, 0.1, 0.5, 0.5], "caption": "a", "path": "/etc/passwd"}]},
     "unknown ['path']"),
    ({**CANVAS, "extra": 1}, "unknown keys ['extra']"),
    ({**CANVAS, "width": "32"}, "width must be a positive integer"),
    ({**CANVAS, "height": None}, "the canvas must give the image's height"),
    ("not a canvas", "the canvas must hold"),
    (None, "the canvas must hold"),
])
def test_layout_from_canvas_refuses_what_the_browser_should_not_send(canvas, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        layouts.layout_from_canvas("a scene", "", canvas)


def test_layout_from_canvas_needs_a_prompt_for_generating():
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        layouts.layout_from_canvas("  ", "", CANVAS)


def test_import_reads_every_box_format_into_normalised_xyxy():
    text = json.dumps({"prompt": "p", "negative_prompt": "n", "width": 64, "height": 32, "box_format": "xywh",
                       "box_units": "pixels", "instances": [{"box": [8, 4, 16, 8], "caption": "a red square"}]})
    prompt, negative, canvas = layouts.import_layout(text.encode(), 32, 32)
    assert (prompt, negative) == ("p", "n")
    assert canvas == {"width": 64, "height": 32, "instances": [{"box": [0.125, 0.125, 0.375, 0.375],
                                                                "caption": "a red square"}]}
    # no size in the file: the model's size (given), and the prompt may be missing
    _, _, canvas = layouts.import_layout(b'{"instances": []}', 48, 40)
    assert (canvas["width"], canvas["height"]) == (40, 48)


def test_layout_json_is_one_instance_a_line():
    layout = layouts.layout_from_canvas("a \"scene\" ☃", "", CANVAS)
    text = layouts.layout_json(layout)
    assert json.loads(text) == layout
    assert text.splitlines()[1:3] == ['  "prompt": "a \\"scene\\" ☃",', '  "width": 32,']
    assert '    {"box": [0.08, 0.1, 0.45, 0.45], "caption": "a red square"},' in text.splitlines()
    assert json.loads(layouts.layout_json({"instances": []})) == {"instances": []}


def test_export_then_import_round_trips():
    text = layouts.layout_json(layouts.layout_from_canvas("a scene", "blurry", CANVAS))
    prompt, negative, canvas = layouts.import_layout(text.encode("utf-8"), 512, 512)
    assert (prompt, negative, canvas) == ("a scene", "blurry", CANVAS)
    assert layouts.layout_json(layouts.layout_from_canvas(prompt, negative, canvas)) == text


@pytest.mark.parametrize("content, message", [
    (b"\xff{}", "the layout file is not UTF-8 text"),
    (b"{", "the layout file is not valid JSON"),
    (b'{"prompt": "a", "prompt": "b"}', "duplicate key 'prompt'"),
    (b'{"instances": [{"box": [0, 0, 2, 2], "caption": "a"}]}', "the layout file: instances\\[0\\]"),
    (b"[]", "must hold a JSON object"),
    (None, "no layout file was uploaded"),
])
def test_import_refuses_bad_files_with_a_message(content, message):
    with pytest.raises(ValueError, match=message):
        layouts.import_layout(content, 32, 32)


def _request(layout=None, **kw):
    args = dict(seed=0, steps=10, height=32, width=32, vae_factor=8)
    args.update(kw)
    return layouts.make_request(parse_layout(json.dumps(layout or {"prompt": "p", "instances": CANVAS["instances"]})),
                                **args)


def test_make_request_fills_defaults_and_overrides_the_prompt():
    r = _request()
    assert (r.prompt, r.height, r.width, r.seed, r.steps) == ("p", 32, 32, 0, 10)
    assert (r.guidance_scale, r.beta, r.scale) == (layouts.DEFAULT_GUIDANCE_SCALE, layouts.DEFAULT_BETA,
                                                   layouts.DEFAULT_SCALE)
    assert [i.box for i in r.instances] == [tuple(i["box"]) for i in CANVAS["instances"]]
    assert _request(prompt="other").prompt == "other" and _request(prompt="").prompt == "p"
    # a browser's number field sends floats: an integer value is accepted
    r = _request(seed=3.0, steps=20.0)
    assert (r.seed, r.steps) == (3, 20) and type(r.seed) is type(r.steps) is int
    # the layout's size wins over the model's, and pixel boxes are normalised
    r = _request({"prompt": "p", "width": 64, "height": 16, "box_units": "pixels",
                  "instances": [{"box": [0, 0, 32, 8], "caption": "a"}]})
    assert (r.width, r.height, r.instances[0].box) == (64, 16, (0.0, 0.0, 0.5, 0.5))


def test_make_request_defaults_are_roi_ops_generate_defaults():
    from roi_ops.cli import build_parser

    args = build_parser().parse_args(["generate", "--model", "m", "--adapter", "a", "--layout", "l", "--out", "o"])
    assert (args.guidance_scale, args.beta, args.scale, args.steps) == (
        layouts.DEFAULT_GUIDANCE_SCALE, layouts.DEFAULT_BETA, layouts.DEFAULT_SCALE, layouts.DEFAULT_STEPS)


@pytest.mark.parametrize("kw, message", [
    (dict(seed=-1), r"seed must be an integer in \[0, 18446744073709551615\], got -1"),
    (dict(seed=2**53, max_seed=layouts.MAX_UI_SEED), r"seed must be an integer in \[0, 9007199254740991\]"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=True), "seed must be an integer"),
    (dict(seed="1"), "seed must be an integer"),
    (dict(steps=0), r"steps must be an integer in \[1, 1000\], got 0"),
    (dict(steps=1001), "steps must be an integer"),
    (dict(guidance_scale=float("nan")), "guidance must be a finite number"),
    (dict(beta=2), r"beta must be a finite number in \[0, 1\]"),
    (dict(scale=-1), "scale must be a finite number"),
    (dict(prompt=3), "prompt must be a string"),
    (dict(vae_factor=64), "layout: height must be a multiple of 64"),
])
def test_make_request_names_the_wrong_field(kw, message):
    with pytest.raises(ValueError, match=message):
        _request(**kw)


def test_make_request_needs_some_prompt_and_boxes_inside_the_image():
    with pytest.raises(ValueError, match="no prompt"):
        _request({"instances": []}, prompt="")
    with pytest.raises(ValueError, match=r"instances\[0\]\[0\]"):
        _request({"prompt": "p", "instances": [{"box": [0.5, 0.5, 1.2, 0.9], "caption": "a"}]})
