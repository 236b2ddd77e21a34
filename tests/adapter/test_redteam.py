"""The second red-team pass (issue 17): limits, finite weights, concurrency, saving, the CLIs' error contract,
layout JSON hygiene and the meta device. Each test fails on the code before its fix."""

from __future__ import annotations

import json
import os
import pathlib
import re
import struct
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import official_reference as ref
import tiny_pipelines as tp
from roi_ops.cli import main
from roi_ops.roictrl_adapter import ROICtrlAdapter, ROICtrlPipeline, load_adapter, normalize_instances
from roi_ops.roictrl_adapter import pipeline as pipeline_module
from roi_ops.roictrl_adapter.generate import boxes_path, read_layout
from roi_ops.roictrl_adapter.official import SD14_UNET_CONFIG
from roi_ops.roictrl_adapter.pipeline import MAX_INSTANCES, MAX_TEXT_CHARS, validate_layout

CAT = {"box": [0.1, 0.1, 0.6, 0.7], "caption": "a cat"}
STEPS = dict(num_inference_steps=2, output_type="np")
LAYOUT = {"prompt": "a room", "instances": [CAT]}


def seed(s: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(s)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pipe = tp.make_sd_pipeline(tmp_path_factory.mktemp("sd"))
    return pipe, ROICtrlPipeline.from_pipe(pipe, tp.make_pipeline_adapter(pipe))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``sd15/`` (a tiny diffusers SD folder), ``adapter/`` (its adapter) and ``layout.json``."""
    return tp.save_cli_files(tmp_path_factory.mktemp("cli"), LAYOUT, adapter_dir="adapter")


def generate(root, out, *extra, layout=None, model=None):
    return ["generate", "--model", str(model or root / "sd15"), "--adapter", str(root / "adapter"),
            "--layout", str(layout or root / "layout.json"), "--steps", "2", "--out", str(out), *extra]


def one_line_error(capsys, command="generate") -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"roi-ops {command}: error: "), err
    assert "Traceback" not in err and "Loading pipeline components" not in err
    return lines[0]


def write_layout(tmp_path, layout, name="layout.json") -> pathlib.Path:
    path = tmp_path / name
    path.write_bytes(layout if isinstance(layout, bytes) else
                     (layout if isinstance(layout, str) else json.dumps(layout)).encode())
    return path


# ------------------------------------------------------------------ 1. limits, before anything is loaded

@pytest.mark.parametrize(
    "layout, message",
    [
        ({"prompt": "x" * (MAX_TEXT_CHARS + 1)}, rf"prompt has {MAX_TEXT_CHARS + 1} characters; at most "
                                                 rf"{MAX_TEXT_CHARS}"),
        ({"prompt": "a", "negative_prompt": "y" * (MAX_TEXT_CHARS + 1)}, "negative_prompt has"),
        ({"prompt": "a", "instances": [{"box": [0, 0, 1, 1], "caption": "c" * 10_000_000}]},
         rf"instances\[0\].caption has 10000000 characters; at most {MAX_TEXT_CHARS}"),
        ({"prompt": "a", "instances": [CAT] * (MAX_INSTANCES + 1)},
         rf"instances has {MAX_INSTANCES + 1} instances; at most {MAX_INSTANCES}"),
        ({"prompt": "a", "width": 1_000_000_000, "instances": [CAT]}, r"width must be in \[1, 8192\] pixels"),
        ({"prompt": "a", "height": 1e9}, r"height must be a positive integer \(pixels\), got 1000000000.0"),
        ({"prompt": "a", "width": 100}, "width must be a multiple of 8"),
    ],
)
def test_limits_are_checked_before_the_model_loads(files, tmp_path, capsys, layout, message):
    # checked from the files alone: nothing is loaded (one_line_error: no "Loading pipeline components")
    started = time.monotonic()
    path = write_layout(tmp_path, layout)
    assert main(generate(files, tmp_path / "x.png", layout=path)) == 2
    assert time.monotonic() - started < 5  # a 10 MB caption once ran 80 s in the tokenizer
    assert re.search(message, one_line_error(capsys))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--guidance-scale", "inf"], r"--guidance-scale must be a finite number in \[0, 100\], got inf"),
        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
        (["--guidance-scale", "1e6"], "--guidance-scale must be a finite number"),
        (["--scale", "nan"], r"--scale must be a finite number in \[0, 10\]"),
        (["--scale", "-1"], "--scale must be a finite number"),
        (["--beta", "nan"], r"--beta must be a finite number in \[0, 1\]"),
        (["--seed", str(2**70)], r"--seed must be an integer in \[0, 2\*\*64 - 1\], got 1180591620717411303424"),
        (["--seed", "-1"], "--seed must be an integer"),
        (["--prompt", "p" * (MAX_TEXT_CHARS + 1)], "--prompt has"),
    ],
)
def test_bad_numbers_are_refused_before_the_model_loads(files, tmp_path, capsys, extra, message):
    assert main(generate(files, tmp_path / "x.png", *extra, model=tmp_path / "no-model")) == 2
    assert re.search(message, one_line_error(capsys))


def test_python_route_checks_limits_before_tokenising(sd, monkeypatch):
    pipe, roictrl = sd

    def no_encoding(*a, **k):
        raise AssertionError("the text encoder ran before the checks")

    monkeypatch.setattr(pipe, "encode_prompt", no_encoding)
    cases = [
        (dict(guidance_scale=float("inf")), r"guidance_scale must be a finite number in \[0, 100\], got inf"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
        (dict(roictrl_scale=float("nan")), "roictrl_scale must be a finite number"),
        (dict(height=10**9, width=64), r"height must be in \[1, 8192\]"),
        (dict(height=60, width=64), "height must be a multiple of 8"),
        (dict(negative_prompt="n" * (MAX_TEXT_CHARS + 1)), "negative_prompt has"),
        (dict(instances=[{"box": [0, 0, 1, 1], "caption": "c" * (MAX_TEXT_CHARS + 1)}]),
         r"instances\[0\]\[0\] caption has"),
        (dict(instances=[CAT] * (MAX_INSTANCES + 1)), rf"instances\[0\] has {MAX_INSTANCES + 1} instances"),
        (dict(instances=[CAT] * 3, max_instances=2), r"instances\[0\] has 3 instances; at most 2"),
    ]
    for kwargs, message in cases:
        kwargs = {"instances": [CAT], **STEPS, **kwargs}
        with pytest.raises(ValueError, match=message):
            roictrl("a room", **kwargs)
    with pytest.raises(ValueError, match=r"prompt\[1\] has"):
        roictrl(["a room", "p" * (MAX_TEXT_CHARS + 1)], instances=[[CAT], [CAT]], **STEPS)
    # the maximum is a documented module constant, and max_instances= overrides it per call
    monkeypatch.setattr(pipeline_module, "MAX_INSTANCES", 2)
    with pytest.raises(ValueError, match="at most 2"):
        normalize_instances([CAT] * 3, 1, width=64, height=64)
    assert len(normalize_instances([CAT] * 3, 1, width=64, height=64, max_instances=3)[0]) == 3


def test_long_tokens_are_still_truncated_with_diffusers_warning(sd, diffusers_log):
    """Within the character limit, diffusers' own truncation to the encoder's length (and its warning) stays."""
    _, roictrl = sd
    long_caption = " ".join(["cat"] * 200)  # 200 tokens, far fewer than MAX_TEXT_CHARS characters
    roictrl("a room", instances=[{"box": [0.1, 0.1, 0.6, 0.7], "caption": long_caption}], **STEPS)
    assert any("truncated" in m for m in diffusers_log), diffusers_log


# ------------------------------------------------------------------ 2. finite weights

def _small_official(tmp_path):
    small = {**SD14_UNET_CONFIG, "block_out_channels": [32, 64, 128, 128], "cross_attention_dim": 32}
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**small)
    state = ref.synthetic_state_dict(ref.unet_official_shapes(unet), seed=1)
    unet.save_config(tmp_path / "unet")
    return unet, {k: v.contiguous() for k, v in state.items()}


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, capsys):
    unet, state = _small_official(tmp_path)
    key = sorted(state)[3]
    bad = dict(state)
    bad[key] = bad[key].clone()
    bad[key].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=rf"non-finite weights \(NaN or inf\): {re.escape(key)} \(1 NaN, 0 inf"):
        ROICtrlAdapter.from_official(bad, unet)
    bad[key].view(-1)[0] = float("inf")
    src = tmp_path / "nan.safetensors"
    save_file(bad, str(src))
    with pytest.raises(ValueError, match=rf"{re.escape(str(src))}.* non-finite weights .*{re.escape(key)}"):
        load_adapter(src, unet)
    # roi-ops convert-official: one line, exit 2, nothing written
    assert main(["convert-official", str(src), str(tmp_path / "out"), "--unet", str(tmp_path / "unet")]) == 2
    assert key in one_line_error(capsys, "convert-official")
    assert not (tmp_path / "out").exists()
    # ROICtrlAdapter.from_pretrained: a saved adapter whose weights were edited to hold a NaN
    good = ROICtrlAdapter.from_official(state, unet)
    good.save_pretrained(tmp_path / "saved")
    weights_file = tmp_path / "saved" / "roictrl_adapter.safetensors"
    weights = load_file(weights_file)
    name = sorted(weights)[0]
    weights[name].view(-1)[-1] = float("nan")
    from safetensors import safe_open

    with safe_open(str(weights_file), framework="pt") as f:
        metadata = f.metadata()
    save_file(weights, str(weights_file), metadata=metadata)
    with pytest.raises(ValueError, match=rf"non-finite weights .*{re.escape(name)} \(1 NaN"):
        ROICtrlAdapter.from_pretrained(tmp_path / "saved")


# ------------------------------------------------------------------ 3. concurrency

def test_concurrent_calls_raise_at_once_and_never_change_an_image(sd):
    pipe, roictrl = sd
    alone = roictrl("a room", instances=[CAT], generator=seed(), **STEPS).images
    inside, let_go = threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def pause(p, step, t, kwargs):  # the first call waits here while the other thread tries its call
        if step == 0:
            inside.set()
            let_go.wait(30)
        return kwargs

    def first():
        results["first"] = roictrl("a room", instances=[CAT], generator=seed(), callback_on_step_end=pause,
                                   **STEPS).images

    worker = threading.Thread(target=first)
    worker.start()
    try:
        assert inside.wait(60)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="ROICtrlPipeline is not re-entrant.*one ROICtrlPipeline per pipeline "
                                               "copy.*serialise the calls"):
            roictrl("a room", instances=[{"box": [0.5, 0.5, 0.9, 0.9], "caption": "a dog"}], **STEPS)
        assert time.monotonic() - started < 1  # at once, not after the running call
        # a second wrapper of the same pipeline, or the plain pipeline's UNet used meanwhile, is refused too
        with pytest.raises(RuntimeError, match="not re-entrant"):
            ROICtrlPipeline(pipe, roictrl.adapter)("a room", instances=[CAT], **STEPS)
        with pytest.raises(RuntimeError, match="not re-entrant"):
            pipe("a room", **STEPS)
    finally:
        let_go.set()
        worker.join(120)
    np.testing.assert_array_equal(results["first"], alone)  # the running call's image is its own
    # and after it, the pipeline is free again
    np.testing.assert_array_equal(roictrl("a room", instances=[CAT], generator=seed(), **STEPS).images, alone)


# ------------------------------------------------------------------ 4. saving

def test_save_pretrained_keeps_the_adapter_and_from_pretrained_reads_both(sd, tmp_path):
    pipe, roictrl = sd
    roictrl.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model_index.json").is_file()
    assert (tmp_path / "saved" / "roictrl" / "roictrl_adapter.safetensors").is_file()
    loaded = ROICtrlPipeline.from_pretrained(tmp_path / "saved", local_files_only=True)
    assert type(loaded.pipe) is type(pipe) and loaded.adapter is not roictrl.adapter
    kw = dict(instances=[CAT], **STEPS)
    np.testing.assert_array_equal(loaded("a room", generator=seed(), **kw).images,
                                  roictrl("a room", generator=seed(), **kw).images)
    with pytest.raises(FileNotFoundError, match="no roictrl/config.json: not a folder written by ROICtrlPipeline"):
        ROICtrlPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(AttributeError, match="save with roictrl.save_pretrained"):
        roictrl.push_to_hub("x/y")


# ------------------------------------------------------------------ 5. convert-official errors

def test_convert_official_errors_are_one_line(tmp_path, capsys):
    unet, state = _small_official(tmp_path)
    good = tmp_path / "release.safetensors"
    save_file(state, str(good))
    (tmp_path / "random.bin").write_bytes(os.urandom(4096))
    save_file({"some.other.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    first = sorted(state)[0]
    save_file({**state, first: state[first].to(torch.int64)}, str(tmp_path / "i64.safetensors"))
    torch.save({**state, first: state[first].to(torch.int64)}, tmp_path / "i64.pt")
    save_file({**state, first: state[first].reshape(1, 1).contiguous()}, str(tmp_path / "shape.safetensors"))
    missing_key = {k: v for k, v in state.items() if k != sorted(state)[5]}
    save_file(missing_key, str(tmp_path / "missing.safetensors"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "bad-unet").mkdir()
    (tmp_path / "bad-unet" / "config.json").write_text("{not json")
    unet_args = ["--unet", str(tmp_path / "unet")]
    cases = [
        ([str(tmp_path / "random.bin"), "o1", *unet_args], "neither a safetensors file .* nor a torch.save'd"),
        ([str(tmp_path / "nope.safetensors"), "o2"], "input .*nope.safetensors.*: no such file"),
        ([str(tmp_path), "o3"], "is a directory"),
        ([str(tmp_path / "other.safetensors"), "o4"], "is not an official ROICtrl checkpoint"),
        ([str(tmp_path / "i64.safetensors"), "o5", *unet_args], rf"tensor '{re.escape(first)}' has dtype 'I64'"),
        ([str(tmp_path / "i64.pt"), "o5", *unet_args],
         rf"wrong tensors \[{re.escape(first)}: expected a floating-point tensor, got torch.int64"),
        ([str(tmp_path / "shape.safetensors"), "o5", *unet_args], rf"wrong tensors \[{re.escape(first)}: expected shape"),
        ([str(tmp_path / "missing.safetensors"), "o6", *unet_args], rf"missing keys \[{re.escape(sorted(state)[5])}"),
        ([str(truncated), "o7", *unet_args], "is truncated"),
        ([str(good), "o8", "--unet", str(tmp_path / "no-unet")], "--unet .*no-unet.*: no such folder"),
        ([str(good), "o9", "--unet", str(tmp_path / "bad-unet")], "--unet: .*config.json.* is not a JSON file"),
        ([str(good), str(good), *unet_args], "would overwrite the input"),
    ]
    for argv, message in cases:
        argv = [str(tmp_path / a) if re.fullmatch(r"o\d", a) else a for a in argv]
        assert main(["convert-official", *argv]) == 2, argv
        line = one_line_error(capsys, "convert-official")
        assert re.search(message, line), (argv, line)
    assert good.read_bytes()[:8] == struct.pack("<Q", struct.unpack("<Q", good.read_bytes()[:8])[0])
    assert load_file(good).keys() == state.keys()  # OUT == IN left the input alone
    # OUT == IN through the folder: the input is OUT/roictrl_adapter.safetensors
    (tmp_path / "same").mkdir()
    inside = tmp_path / "same" / "roictrl_adapter.safetensors"
    save_file(state, str(inside))
    assert main(["convert-official", str(inside), str(tmp_path / "same"), *unet_args]) == 2
    assert "would overwrite the input" in one_line_error(capsys, "convert-official")
    # an existing conversion: exit 2 (not a bare SystemExit), --overwrite replaces it
    assert main(["convert-official", str(good), str(tmp_path / "conv"), *unet_args]) == 0
    capsys.readouterr()
    assert main(["convert-official", str(good), str(tmp_path / "conv"), *unet_args]) == 2
    assert "already holds a config.json (use --overwrite)" in one_line_error(capsys, "convert-official")
    assert main(["convert-official", str(good), str(tmp_path / "conv"), *unet_args, "--overwrite"]) == 0


# ------------------------------------------------------------------ 6. --out and --adapter first

def test_out_and_adapter_are_checked_before_the_model_loads(files, tmp_path, capsys):
    no_model = tmp_path / "no-model"  # a check that waited for the model would report the model instead
    (tmp_path / "a-dir.png").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "taken.png").write_bytes(b"x")
    (tmp_path / "boxes-taken.boxes.png").write_bytes(b"x")
    official = tmp_path / "ROICtrl_sdv14_30K.safetensors"
    _, state = _small_official(tmp_path)
    save_file(state, str(official))
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(official.read_bytes()[:-1000])
    cases = [
        ([str(tmp_path / "a-dir.png")], "is a directory"),
        ([str(tmp_path / "noext")], "needs an image extension Pillow can write .* got 'none'"),
        ([str(tmp_path / "x.txt")], "needs an image extension"),
        ([str(tmp_path / "file" / "x.png")], "is not a folder"),
        ([str(tmp_path / "taken.png")], "taken.png' already exists; pass --overwrite to replace it"),
        ([str(tmp_path / "boxes-taken.png")], "boxes-taken.boxes.png' already exists"),
        ([str(tmp_path / "x.png"), "--adapter", str(truncated)], "--adapter: .*cut.safetensors' is truncated"),
        ([str(tmp_path / "x.png"), "--adapter", str(tmp_path / "file")], "is not a ROICtrlAdapter folder"),
    ]
    if os.path.isdir("/proc"):
        cases.append(([("/proc/roi-ops-test.png")], "cannot write in '/proc'"))
    for (out, *extra), message in cases:
        assert main(generate(files, out, model=no_model) + extra) == 2, out
        assert re.search(message, one_line_error(capsys)), (out, message)
    assert (tmp_path / "taken.png").read_bytes() == b"x"


def test_overwrite(files, tmp_path, capsys, diffusers_log):
    out = tmp_path / "room.png"
    out.write_bytes(b"old")
    assert main(generate(files, out)) == 2
    assert "pass --overwrite" in one_line_error(capsys) and out.read_bytes() == b"old"
    assert main(generate(files, out, "--overwrite")) == 0
    assert Image.open(out).size == (64, 64) and boxes_path(out).is_file()
    # no "pip install accelerate" hint from diffusers (accelerate is part of the [adapter] extra and the Makefile's)
    assert not [m for m in diffusers_log if "accelerate" in m], diffusers_log


# ------------------------------------------------------------------ 7. layout JSON hygiene

@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a", "instances": [], "instances": [{"box": [0, 0, 1, 1], "caption": "x"}]}',
         "duplicate key 'instances'"),
        ('{"prompt": "a", "instances": [{"box": [0, 0, 1, 1], "caption": "x", "caption": "y"}]}',
         "duplicate key 'caption'"),
        ('{"prompt": "a", "instances": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
        ('{"prompt": "a", "box_units": ["pixels"]}', r"box_units must be one of \('normalized', 'pixels'\), "
                                                      r"got \['pixels'\]"),
        ('{"prompt": "a", "box_format": {"x": 1}}', "box_format must be one of"),
        ('{"prompt": ["a", "b"]}', "prompt must be a string, got list"),
        ('{"prompt": "a", "negative_prompt": 3}', "negative_prompt must be a string, got int"),
        ('{"prompt": "a", "instances": {"box": [0, 0, 1, 1]}}', "instances must be a list of .*got dict"),
        ('{"prompt": "a", "instances": ["a cat"]}', r"instances\[0\] must be an object .* got str"),
        ('{"prompt": "a", "instances": [{"box": [1, 2], "caption": "x"}]}',
         r"instances\[0\]\.box must be 4 numbers, got \[1, 2\]"),
        ('{"prompt": "a", "instances": [{"box": [0, 0, 1, 1], "caption": 7}]}',
         r"instances\[0\]\.caption must be a non-empty string, got 7"),
        ('{"prompt": "a", "instances": [{"box": [0, 0, 1, 1]}]}', r"instances\[0\] must have the keys"),
        ('{"prompt": "a", "width": 1000000000, "instances": [{"box": [0, 0, 1, 1], "caption": "x"}]}',
         r"width must be in \[1, 8192\]"),
        (b'{"prompt": "caf\xe9"}', "is not UTF-8 text"),
    ],
)
def test_layout_json_hygiene(tmp_path, content, message):
    path = write_layout(tmp_path, content)
    with pytest.raises(ValueError, match=message) as e:
        read_layout(path)
    assert str(e.value).startswith(f"--layout {str(path)!r}")  # every message names the file
    assert "unhashable" not in str(e.value) and "no prompt" not in str(e.value)


def test_layout_is_a_directory_or_missing(files, tmp_path, capsys):
    assert main(generate(files, tmp_path / "x.png", layout=tmp_path)) == 2
    assert "is a directory; expected a layout JSON file" in one_line_error(capsys)
    assert main(generate(files, tmp_path / "x.png", layout=tmp_path / "missing.json")) == 2
    assert "no such file" in one_line_error(capsys)


def test_validate_layout_is_the_one_reusable_validator():
    """What another reader of layout-like lines (e.g. a training dataset) calls: its own keys, key paths in the
    messages, defaults filled in."""
    line = {"file_name": "0001.png", "prompt": "a room", "instances": [{"box": [1, 2, 30, 40], "caption": "a cat"}],
            "box_format": "xyxy", "box_units": "pixel"}
    keys = ("file_name", "prompt", "instances", "box_format", "box_units")
    checked = validate_layout(line, keys=keys, where="train.jsonl line 1: ")
    assert checked["box_units"] == "pixels" and checked["file_name"] == "0001.png"
    assert checked["instances"][0].box == (1.0, 2.0, 30.0, 40.0) and checked["instances"][0].caption == "a cat"
    with pytest.raises(ValueError, match=r"^train.jsonl line 1: instances\[0\].box must be 4 numbers"):
        validate_layout({**line, "instances": [{"box": [1, 2], "caption": "x"}]}, keys=keys,
                        where="train.jsonl line 1: ")
    with pytest.raises(ValueError, match=r"unknown keys \['width'\]"):
        validate_layout({**line, "width": 64}, keys=keys)
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        validate_layout({"instances": []})


# ------------------------------------------------------------------ 8. meta device

def test_a_pipeline_on_meta_says_so(tmp_path):
    pipe = tp.make_sd_pipeline(tmp_path)
    roictrl = ROICtrlPipeline.from_pipe(pipe, tp.make_pipeline_adapter(pipe)).to("meta")
    with pytest.raises(RuntimeError, match="unet.* on the meta device .*Load the weights again"):
        roictrl("a room", instances=[CAT], **STEPS)
