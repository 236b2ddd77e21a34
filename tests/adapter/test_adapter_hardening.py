"""Untrusted adapter folders and untrusted instance data: refused by name before anything is allocated or run.

``from_pretrained`` validates config.json (schema of types and ranges, relations between keys), the safetensors
header (float dtypes, shapes, offsets, size) and the config saved beside the weights, before allocating a
parameter; instance caption embeddings are checked against the layers' ``cross_attention_dim``.
"""

import inspect
import json
import os
import resource
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from roictrl_testutils import SD15, make_adapter, make_instances, make_unet, unet_inputs

from roi_ops.roictrl_adapter import ArchitectureOptions, ROICtrlAdapter
from roi_ops.roictrl_adapter.validation import BLOCK_SCHEMA, CONFIG_SCHEMA, read_safetensors_header

CONFIG = "config.json"
WEIGHTS = "roictrl_adapter.safetensors"


@pytest.fixture(scope="module")
def unet():
    return make_unet("sd15")


@pytest.fixture
def saved(tmp_path, unet):
    make_adapter(unet, "sd15").save_pretrained(tmp_path)
    return tmp_path


def _edit_config(folder, edit):
    path = folder / CONFIG
    config = json.loads(path.read_text())
    config = edit(config)
    path.write_text(json.dumps(config))


def _set(key, value, block=None):
    def edit(config):
        if block is None:
            config[key] = value
        else:
            config["blocks"][block][key] = value
        return config

    return edit


def test_every_constructor_option_has_a_schema_row():
    # a new ROICtrlAdapter option must be validated on load: add a row to CONFIG_SCHEMA (checkpoint.py)
    sig = inspect.signature(ROICtrlAdapter.__init__).parameters
    params = {n for n, p in sig.items() if p.kind is not p.VAR_KEYWORD} - {"self"}
    params |= set(ArchitectureOptions.names())  # the **options
    assert params <= set(CONFIG_SCHEMA), sorted(params - set(CONFIG_SCHEMA))
    from roi_ops.roictrl_adapter.adapter import BlockSpec

    assert set(BlockSpec.__dataclass_fields__) == set(BLOCK_SCHEMA)


@pytest.mark.parametrize(
    "edit,error,text",
    [
        (lambda c: [c], TypeError, "must be a JSON object, got list"),
        (lambda c: "ROICtrlAdapter", TypeError, "must be a JSON object, got str"),
        (_set("fused_blend", "no"), TypeError, "'fused_blend'] must be bool, got str"),
        (_set("fused_blend", 1), TypeError, "'fused_blend'] must be bool, got int"),
        (_set("ff_mult", True), TypeError, "'ff_mult'] must be int, got bool"),
        (_set("ff_mult", 10**6), ValueError, "'ff_mult'] must lie in [1, 16]"),
        (_set("position_dim", 4.5), TypeError, "'position_dim'] must be int, got float"),
        (_set("blocks", {}), TypeError, "'blocks'] must be list"),
        (_set("blocks", []), ValueError, "must list 1 to 1024 blocks"),
        (_set("heads", 0, block=0), ValueError, "['blocks'][0]['heads'] must lie in [1, 256], got 0"),
        (_set("heads", 3, block=0), ValueError, "['blocks'][0]: dim (32) must be divisible by heads (3)"),
        (_set("grid", 0, block=0), ValueError, "'grid'] must lie in [1, 256], got 0"),
        (_set("grid", -3, block=0), ValueError, "'grid'] must lie in [1, 256], got -3"),
        (_set("grid", 4.5, block=0), TypeError, "'grid'] must be int, got float"),
        (_set("grid", 100000, block=0), ValueError, "'grid'] must lie in [1, 256], got 100000"),
        (_set("dim", "32", block=0), TypeError, "'dim'] must be int, got str"),
        (_set("surprise", 1), ValueError, "unknown keys ['surprise']"),
        (_set("extra", 1, block=0), ValueError, "['blocks'][0] has unknown keys ['extra']"),
        (lambda c: {k: v for k, v in c.items() if k != "blocks"}, ValueError, "missing required keys ['blocks']"),
        (lambda c: {**c, "blocks": [c["blocks"][0], c["blocks"][0]]}, ValueError, "appears twice"),
        (_set("blocks", ["x"]), TypeError, "['blocks'][0] must be a JSON object, got str"),
        (_set("_class_name", "UNet2DConditionModel"), ValueError, "does not describe a ROICtrlAdapter"),
        # the architecture options (options.py) are validated by the same rule table as the constructor's
        (_set("unpool", "nearest"), ValueError, "option unpool must be one of ['exact', 'official'], got 'nearest'"),
        (_set("channel_gate", "yes"), TypeError, "option channel_gate must be bool, got str"),
        (_set("dropout", 1.5), ValueError, "option dropout must be in [0, 1), got 1.5"),
        (_set("max_instances", 0), ValueError, "option max_instances must be None or >= 1, got 0"),
        (lambda c: {**c, "channel_gate": True, "max_instances": 10**9}, ValueError, "['max_instances'] must be None or at most 1024"),
        (_set("channel_gate", True), ValueError, "channel_gate=True need a fixed max_instances, got None"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_configs_are_refused_by_name(saved, edit, error, text):
    _edit_config(saved, edit)
    with pytest.raises(error) as info:
        ROICtrlAdapter.from_pretrained(saved)
    assert text in str(info.value)


def test_a_config_that_is_not_json_is_refused(saved):
    (saved / CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON file"):
        ROICtrlAdapter.from_pretrained(saved)


def test_heads_edited_while_every_shape_fits_is_refused(saved, unet):
    # heads changes no weight shape: the config saved in the weights' header tells the models apart ...
    _edit_config(saved, _set("heads", 4, block=0))
    with pytest.raises(ValueError, match=r"not describe the model its weights were saved with: \[\"blocks\[0\]\['heads'\]: 4"):
        ROICtrlAdapter.from_pretrained(saved)
    # ... and a UNet with other heads does not take the adapter either
    adapter = make_adapter(unet, "sd15")
    adapter.specs[0].heads = 4
    with pytest.raises(ValueError, match="expects 4 attention heads, the UNet has"):
        adapter.check_compatible(unet)


def test_runtime_options_may_be_edited(saved):
    _edit_config(saved, _set("fused_blend", False))
    assert ROICtrlAdapter.from_pretrained(saved).fused_blend is False


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header = edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def _relabel(dtype):
    def edit(header):
        header[_first_tensor(header)]["dtype"] = dtype
        return header

    return edit


def _reshape(header):
    key = _first_tensor(header)
    shape = header[key]["shape"]
    header[key]["shape"] = [shape[0] * 2, *shape[1:]] if shape else [2]
    return header


def _grow(header):
    key = _first_tensor(header)
    header[key]["data_offsets"][1] += 4
    return header


def _drop_metadata_and_resize(header):
    # an old save without the saved config, whose config.json asks for other shapes
    header.pop("__metadata__", None)
    return header


@pytest.mark.parametrize(
    "edit,text",
    [
        (_relabel("I32"), "has dtype 'I32'; adapter weights are one of"),
        (_relabel("U8"), "has dtype 'U8'"),
        (_reshape, "must hold exactly"),
        (_grow, "must hold exactly"),
        (lambda h: {**h, "x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, "expected a list of non-negative"),
        (lambda h: [1, 2], "must be a JSON object"),
    ],
    ids=["I32", "U8", "shape", "offsets", "negative", "list"],
)
def test_bad_safetensors_headers_are_refused(saved, edit, text):
    _rewrite_header(saved / WEIGHTS, edit)
    with pytest.raises(ValueError, match="tensor|header") as info:
        ROICtrlAdapter.from_pretrained(saved)
    assert text in str(info.value)


def test_truncated_and_padded_weight_files_are_refused(saved):
    path = saved / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[:-4])
    with pytest.raises(ValueError, match="is truncated: its header describes"):
        ROICtrlAdapter.from_pretrained(saved)
    path.write_bytes(data + b"\0" * 8)
    with pytest.raises(ValueError, match="data section has"):
        ROICtrlAdapter.from_pretrained(saved)
    path.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    with pytest.raises(ValueError, match="the header claims"):
        ROICtrlAdapter.from_pretrained(saved)


def test_header_matches_config_shapes_before_loading(saved):
    # an old save (no config in the header) whose config.json implies other shapes: refused from the header
    _rewrite_header(saved / WEIGHTS, _drop_metadata_and_resize)
    _edit_config(saved, _set("position_dim", 24))
    with pytest.raises(ValueError, match="do not match its config: .*wrong shapes"):
        ROICtrlAdapter.from_pretrained(saved)


def test_header_reader_accepts_what_save_pretrained_writes(saved):
    header, metadata = read_safetensors_header(saved / WEIGHTS)
    assert json.loads(metadata["roictrl_config"]) == ROICtrlAdapter.from_pretrained(saved).config
    assert all(info["dtype"] == "F32" for info in header.values())


def test_absurd_config_fails_before_allocating(saved):
    # ff_mult = 10**6 used to allocate ~8 GB before any check: run it in a child with 1 GiB of headroom
    _edit_config(saved, _set("ff_mult", 10**6))
    code = textwrap.dedent(f"""
        import resource, torch
        from roi_ops.roictrl_adapter import ArchitectureOptions, ROICtrlAdapter
        peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmPeak:")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (peak + (1 << 30), peak + (1 << 30)))
        try:
            ROICtrlAdapter.from_pretrained({str(saved)!r})
        except ValueError as e:
            print("refused:", e)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused:" in proc.stdout and "ff_mult" in proc.stdout, proc.stdout + proc.stderr[-2000:]


# ---------------------------------------------------------------- instance data


def test_embeddings_of_the_wrong_width_are_refused_naming_the_width(unet):
    adapter = make_adapter(unet, "sd15").install(unet)
    try:
        sample, t, text, _ = unet_inputs("sd15")
        data = make_instances(2, 2, SD15["cross_attention_dim"] + 8)
        with pytest.raises(ValueError, match=r"embeddings must be Tensor\[B, N, L, 32\]: block '.*' takes caption "
                                             r"embeddings of width 32 \(its cross_attention_dim\), got Tensor\[2, 2, 5, 40\]"):
            unet(sample, t, text, cross_attention_kwargs={"roictrl": data})
    finally:
        adapter.uninstall(unet)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_embeddings_and_scales_are_refused(unet, bad):
    from roi_ops.roictrl_adapter import ROICtrlInstances

    data = make_instances(2, 2, SD15["cross_attention_dim"])
    data["embeddings"][1, 0, 3, 5] = bad
    with pytest.raises(ValueError, match="embeddings of valid instances must be finite .* sample 1, slot 0"):
        ROICtrlInstances(**data)
    # a padded slot may hold anything
    ROICtrlInstances(**data, masks=torch.tensor([[True, True], [False, True]]))
    good = make_instances(2, 2, SD15["cross_attention_dim"])
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ROICtrlInstances(**good, scale=bad)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        ROICtrlInstances(**good, scale=torch.tensor(bad))
