"""The architecture options (roi_ops/roictrl_adapter/options.py): validation, config.json round trip, and each
option's own effect at block level (the official configuration as a whole is checked in test_official.py)."""

from __future__ import annotations

import official_reference as ref
import pytest
import torch
from roictrl_testutils import make_adapter, make_instances, make_unet, unet_inputs

from roi_ops.roictrl_adapter import OFFICIAL_CONFIG, ArchitectureOptions, ROICtrlAdapter, ROICtrlInstances
from roi_ops.roictrl_adapter.adapter import NEW_ADAPTER_OPTIONS
from roi_ops.roictrl_adapter.block import ROICtrlBlock
from roi_ops.roictrl_adapter.layers import BoxEncoder, FeedForward, SelfAttention
from roi_ops.roictrl_adapter.official import roi_unpool_quantized


def test_defaults_are_the_roi_ops_design_and_the_preset_is_official():
    o = ArchitectureOptions()
    assert (o.ff_activation, o.position_padding, o.channel_gate, o.max_instances, o.unpool) == (
        "gelu", "drop", False, None, "exact"
    )
    assert OFFICIAL_CONFIG["max_instances"] == 30 and OFFICIAL_CONFIG["sampling_ratio"] == 2
    assert OFFICIAL_CONFIG["position_dim"] == 64 and OFFICIAL_CONFIG["unpool"] == "official"


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"ff_activation": "relu"}, ValueError, r"ff_activation must be one of \['gelu', 'geglu'\], got 'relu'"),
        ({"channel_gate": 1}, TypeError, "channel_gate must be bool, got int 1"),
        ({"max_instances": 0}, ValueError, "max_instances must be None or >= 1, got 0"),
        ({"max_instances": True}, TypeError, "max_instances must be int or None, got bool"),
        ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\), got 1.0"),
        ({"sampling_ratio": 0}, ValueError, "sampling_ratio must be -1 or >= 1, got 0"),
        ({"channel_gate": True}, ValueError, "channel_gate=True need a fixed max_instances"),
        ({"position_padding": "null_token"}, ValueError, "position_padding='null_token' need a fixed max_instances"),
        ({"slot_order": "seeded"}, ValueError, "only affects the channel gate"),
        ({"unpool": "bilinear"}, ValueError, r"unpool must be one of \['exact', 'official'\]"),
    ],
)
def test_invalid_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        ArchitectureOptions(**kwargs)


def test_unknown_constructor_argument_is_named():
    unet = make_unet("sd15")
    with pytest.raises(TypeError, match=r"unknown arguments \['ff_kind'\]"):
        ROICtrlAdapter.from_unet(unet, ff_kind="geglu")
    with pytest.raises(ValueError, match="preset must be"):
        ROICtrlAdapter.from_unet(unet, preset="paper")


def test_options_round_trip_through_config_json(tmp_path):
    unet = make_unet("sd15")
    adapter = make_adapter(unet, "sd15", preset="official", slot_order="seeded", slot_seed=5, unpool="exact")
    adapter.save_pretrained(tmp_path)
    loaded = ROICtrlAdapter.from_pretrained(tmp_path, unet)
    assert loaded.options == adapter.options and loaded.config == adapter.config
    assert not loaded.training  # loaded adapters come back in eval mode (dropout off)
    assert torch.equal(loaded.blocks[0].slot_permutation, adapter.blocks[0].slot_permutation)
    # A new default adapter round-trips with the options from_unet gave it.
    plain = make_adapter(unet, "sd15")
    plain.save_pretrained(tmp_path / "plain")
    assert ROICtrlAdapter.from_pretrained(tmp_path / "plain").options == ArchitectureOptions(**NEW_ADAPTER_OPTIONS)


def test_official_configuration_runs_on_sdxl_style_unets_too():
    unet = make_unet("sdxl")
    adapter = make_adapter(unet, "sdxl", preset="official").eval().install(unet)
    try:
        sample, t, text, extra = unet_inputs("sdxl")
        data = make_instances(2, 3, 24, masks=[[1, 0, 1], [0, 0, 0]])
        with torch.no_grad():
            base = unet(sample, t, text, **extra).sample
            out = unet(sample, t, text, cross_attention_kwargs={"roictrl": data}, **extra).sample
        assert torch.isfinite(out).all() and not torch.equal(out[1], base[1])  # empty sample guided too
    finally:
        adapter.uninstall()


def test_default_configuration_keeps_empty_samples_bitwise():
    unet = make_unet("sd15")
    adapter = make_adapter(unet, "sd15").eval().install(unet)
    try:
        sample, t, text, extra = unet_inputs("sd15")
        data = make_instances(2, 2, 32, masks=[[1, 1], [0, 0]])
        with torch.no_grad():
            base = unet(sample, t, text).sample
            out = unet(sample, t, text, cross_attention_kwargs={"roictrl": data}).sample
        assert torch.equal(out[1], base[1]) and not torch.equal(out[0], base[0])
    finally:
        adapter.uninstall()


def test_dropout_acts_in_training_only():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for module in (SelfAttention(16, 4, dropout=0.5), FeedForward(16, 4, "gelu", 0.5), FeedForward(16, 4, "geglu", 0.5)):
        module.train()
        assert not torch.equal(module(x), module(x))
        module.eval()
        assert torch.equal(module(x), module(x))
    plain = FeedForward(16, 4, "geglu").train()  # dropout 0 (the default): deterministic in training too
    assert torch.equal(plain(x), plain(x))


def test_gligen_fourier_features_and_null_token():
    enc = BoxEncoder(64, 8, 32, fourier="gligen", null_token=True)
    boxes = torch.rand(3, 4)
    torch.testing.assert_close(enc.features(boxes), ref.fourier(boxes))
    with torch.no_grad():
        enc.null_feature.normal_()
    torch.testing.assert_close(enc.null_token(), enc.mlp(enc.null_feature))
    with pytest.raises(RuntimeError, match="no null token"):
        BoxEncoder(64).null_token()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quantized_unpool_matches_the_pixelwise_description(dtype):
    g = torch.Generator().manual_seed(0)
    H, W, P = 37, 29, 7
    lo = torch.rand(12, 2, generator=g, dtype=torch.float64) * torch.tensor([W, H]) * 0.6
    hi = lo + 0.5 + torch.rand(12, 2, generator=g, dtype=torch.float64) * torch.tensor([W, H]) * 0.5
    boxes = torch.cat([torch.zeros(12, 1, dtype=torch.float64), lo, hi], 1)
    boxes[0, 1:] = torch.tensor([0.0, 0.0, W, H])  # whole map: the widest rim
    boxes[1, 1:] = torch.tensor([3.0, 4.0, 3.2, 4.1])  # quantises to nothing
    grids = torch.randn(12, 3, P, P, generator=g, dtype=torch.float64).to(dtype)
    got = roi_unpool_quantized(grids, boxes.to(dtype), (H, W))
    expected = torch.stack([ref.unpool_one(grids[k], boxes[k, 1:], 1.0, H, W) for k in range(12)])
    torch.testing.assert_close(got, expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)
    assert got[1].abs().max() == 0
    rim = (got[0, 0] == 0).float().mean()  # a whole-map box larger than the grid loses its far rows/columns
    assert 0 < rim < 0.5


def test_seeded_slot_order_is_fixed_and_differs_from_identity():
    opts = dict(channel_gate=True, max_instances=30)
    a = ROICtrlBlock(16, 4, 8, 3, options=ArchitectureOptions(**opts, slot_order="seeded", slot_seed=1))
    b = ROICtrlBlock(16, 4, 8, 3, options=ArchitectureOptions(**opts, slot_order="seeded", slot_seed=1))
    c = ROICtrlBlock(16, 4, 8, 3, options=ArchitectureOptions(**opts, slot_order="seeded", slot_seed=2))
    assert torch.equal(a.slot_permutation, b.slot_permutation)
    assert not torch.equal(a.slot_permutation, c.slot_permutation)
    assert not torch.equal(a.slot_permutation, torch.arange(30))

    # The permutation changes what the gate sees: same weights, different order -> different logits.
    c.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in a.blend_gate.parameters():
            p.normal_()
    c.load_state_dict(a.state_dict())
    inst = ROICtrlInstances(torch.tensor([[[0.1, 0.1, 0.6, 0.7], [0.3, 0.2, 0.9, 0.8]]]), torch.zeros(1, 2, 2, 4))
    base_logit, inst_logit = torch.randn(1, 6, 6), torch.randn(2, 3, 3)
    rois = inst.rois(6, 6)
    groups = a.grid_groups(inst, (6, 6), rois.device)
    ga = a._gate_logits(base_logit, [inst_logit], groups, rois, inst, (6, 6))
    gc = c._gate_logits(base_logit, [inst_logit], groups, rois, inst, (6, 6))
    assert not torch.equal(ga[1][0], gc[1][0])


def test_official_configuration_guides_a_batch_without_any_instance():
    """guide_empty_samples: instance data with every mask 0 still runs the guidance (null tokens only), as the
    release does whenever the roictrl argument is given; the default configuration leaves such a call bitwise."""
    unet = make_unet("sd15")
    sample, t, text, _ = unet_inputs("sd15")
    data = make_instances(2, 2, 32, masks=[[0, 0], [0, 0]])
    with torch.no_grad():
        base = unet(sample, t, text).sample
    outs = {}
    for preset in ("official", None):
        adapter = make_adapter(unet, "sd15", preset=preset).eval().install(unet)
        try:
            with torch.no_grad():
                outs[preset] = unet(sample, t, text, cross_attention_kwargs={"roictrl": data}).sample
        finally:
            adapter.uninstall()
    assert torch.isfinite(outs["official"]).all() and (outs["official"] - base).abs().amax(dim=(1, 2, 3)).gt(1e-4).all()
    assert torch.equal(outs[None], base)
