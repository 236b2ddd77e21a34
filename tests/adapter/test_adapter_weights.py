"""save_pretrained / from_pretrained, and the shape checks when an adapter meets a UNet."""

import json
import os

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from roictrl_testutils import SD15, make_adapter, make_instances, make_unet, unet_inputs
from safetensors.torch import load_file, save_file

from roi_ops.roictrl_adapter import ROICtrlAdapter


def test_round_trip_saves_only_the_adapter(tmp_path):
    unet = make_unet("sd15")
    adapter = make_adapter(unet, "sd15")
    adapter.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "roictrl_adapter.safetensors"]
    saved = load_file(tmp_path / "roictrl_adapter.safetensors")
    assert saved.keys() == adapter.state_dict().keys()
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in adapter.parameters())

    loaded = ROICtrlAdapter.from_pretrained(tmp_path, unet=unet)
    assert loaded.config == adapter.config
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in adapter.state_dict().items())

    sample, t, text, _ = unet_inputs("sd15")
    data = make_instances(2, 2, SD15["cross_attention_dim"])
    outs = []
    for a in (adapter, loaded):
        a.install(unet)
        outs.append(unet(sample, t, text, cross_attention_kwargs={"roictrl": data}).sample)
        a.uninstall(unet)
    assert torch.equal(outs[0], outs[1])


def test_from_pretrained_casts(tmp_path):
    unet = make_unet("sd15")
    make_adapter(unet, "sd15").save_pretrained(tmp_path)
    loaded = ROICtrlAdapter.from_pretrained(tmp_path, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in loaded.parameters())


def test_loading_into_a_unet_of_the_wrong_shape_fails_clearly(tmp_path):
    sd15 = make_unet("sd15")
    make_adapter(sd15, "sd15").save_pretrained(tmp_path)
    sdxl = make_unet("sdxl")
    with pytest.raises(ValueError, match=r"does not fit this UNet2DConditionModel: the adapter has 7 cross-attention "
                                         r"blocks, the UNet 14"):
        ROICtrlAdapter.from_pretrained(tmp_path, unet=sdxl)
    with pytest.raises(ValueError, match="does not fit"):
        ROICtrlAdapter.from_pretrained(tmp_path).install(sdxl)
    # Same block layout, different widths.
    torch.manual_seed(0)
    wider = UNet2DConditionModel(**{**SD15, "block_out_channels": (48, 64)})
    with pytest.raises(ValueError, match=r"does not fit block 'down_blocks.0.attentions.0.transformer_blocks.0': "
                                         r"adapter expects width 32 and caption width 32, the UNet has width 48"):
        ROICtrlAdapter.from_pretrained(tmp_path).install(wider)
    other_text = UNet2DConditionModel(**{**SD15, "cross_attention_dim": 16})
    with pytest.raises(ValueError, match=r"caption width 32, the UNet has width 32 and caption width 16"):
        ROICtrlAdapter.from_pretrained(tmp_path, unet=other_text)
    assert not wider._forward_pre_hooks and not wider._forward_hooks


def test_tampered_files_fail_clearly(tmp_path):
    unet = make_unet("sd15")
    make_adapter(unet, "sd15").save_pretrained(tmp_path)
    weights = load_file(tmp_path / "roictrl_adapter.safetensors")
    weights["blocks.0.blend_proj.weight"] = torch.zeros(1, 7)
    save_file(weights, tmp_path / "roictrl_adapter.safetensors")
    with pytest.raises(ValueError, match=r"do not match its config.*blocks.0.blend_proj.weight', \(1, 7\), \(1, 32\)"):
        ROICtrlAdapter.from_pretrained(tmp_path)
    del weights["blocks.0.blend_proj.weight"]
    save_file(weights, tmp_path / "roictrl_adapter.safetensors")
    with pytest.raises(ValueError, match=r"missing \['blocks.0.blend_proj.weight'\]"):
        ROICtrlAdapter.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ROICtrlAdapter.from_pretrained(tmp_path / "nowhere")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="does not describe a ROICtrlAdapter"):
        ROICtrlAdapter.from_pretrained(tmp_path)


def test_from_unet_errors():
    unet = make_unet("sd15")
    with pytest.raises(ValueError, match=r"grid_sizes has no entry for downsampling factor 16"):
        ROICtrlAdapter.from_unet(unet, grid_sizes={8: 5})
    plain = UNet2DModel(block_out_channels=(8, 8), down_block_types=("DownBlock2D",) * 2,
                        up_block_types=("UpBlock2D",) * 2, norm_num_groups=4, sample_size=8)
    with pytest.raises(ValueError, match="UNet2DModel has no cross-attention transformer block"):
        ROICtrlAdapter.from_unet(plain)
    with pytest.raises(ValueError, match="at least one cross-attention block"):
        ROICtrlAdapter([])


def test_downsampling_factors_follow_the_unet():
    sd15 = make_adapter(make_unet("sd15"), "sd15")
    assert {s.name.split(".attentions")[0]: s.downsample for s in sd15.specs} == {
        "down_blocks.0": 8, "down_blocks.1": 16, "mid_block": 16, "up_blocks.0": 16, "up_blocks.1": 8}
    sdxl = make_adapter(make_unet("sdxl"), "sdxl", vae_scale_factor=4, grid_sizes={8: 5, 16: 3})
    assert {s.name.split(".attentions")[0]: s.downsample for s in sdxl.specs} == {
        "down_blocks.1": 8, "down_blocks.2": 16, "mid_block": 16, "up_blocks.0": 16, "up_blocks.1": 8}
