"""Adapter hardening: one adapter per UNet, device/dtype from the UNet, torch.compile'd UNets, official key names,
load_adapter."""

from __future__ import annotations

import pytest
import torch

from roictrl_testutils import make_adapter, make_instances, make_unet, unet_inputs
from roi_ops.roictrl_adapter import ROICtrlAdapter, ROICtrlInstances, load_adapter
from roi_ops.roictrl_adapter.adapter import installed_adapter, unwrap_unet


def test_a_second_adapter_on_one_unet_is_refused():
    unet = make_unet("sd15")
    first = make_adapter(unet, "sd15").install(unet)
    second = make_adapter(unet, "sd15", seed=4)
    with pytest.raises(RuntimeError, match="already has a ROICtrlAdapter installed .*call uninstall\\(\\) on that one"):
        second.install(unet)
    assert not second.is_installed and installed_adapter(unet) is first
    first.uninstall()
    assert installed_adapter(unet) is None
    second.install(unet)  # fine once the first is gone
    assert installed_adapter(unet) is second
    second.uninstall()


def test_adapter_takes_the_unets_device_and_dtype(tmp_path):
    unet = make_unet("sd15").double()
    adapter = ROICtrlAdapter.from_unet(unet, grid_sizes={8: 3, 16: 3}, position_dim=16, position_hidden_dim=16)
    assert {p.dtype for p in adapter.parameters()} == {torch.float64}
    adapter.float().save_pretrained(tmp_path / "a")
    assert {p.dtype for p in ROICtrlAdapter.from_pretrained(tmp_path / "a", unet=unet).parameters()} == {torch.float64}
    assert {p.dtype for p in ROICtrlAdapter.from_pretrained(tmp_path / "a").parameters()} == {torch.float32}
    loaded = ROICtrlAdapter.from_pretrained(tmp_path / "a", unet=unet, dtype=torch.bfloat16)  # explicit wins
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    # the same through load_adapter, from the folder or its weights file
    for path in (tmp_path / "a", tmp_path / "a" / "roictrl_adapter.safetensors"):
        assert {p.dtype for p in load_adapter(path, unet).parameters()} == {torch.float64}
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_adapter(tmp_path / "missing", unet)
    (tmp_path / "other.safetensors").write_bytes(b"")  # an empty file is no safetensors file, and says so
    with pytest.raises(ValueError, match="is not a safetensors file: 0 bytes"):
        load_adapter(tmp_path / "other.safetensors", unet)
    (tmp_path / "other.bin").write_bytes(b"")  # neither a folder nor an official checkpoint
    with pytest.raises(ValueError, match="is not a ROICtrlAdapter folder .expected config.json"):
        load_adapter(tmp_path / "other.bin", unet)


def test_compiled_unet_is_unwrapped():
    unet = make_unet("sd15")
    adapter = make_adapter(unet, "sd15")
    compiled = torch.compile(unet, backend="eager", fullgraph=True)  # never called here: nothing is compiled
    assert unwrap_unet(compiled) is unet
    before = {n: len(m._forward_pre_hooks) + len(m._forward_hooks) for n, m in unet.named_modules()}
    assert ROICtrlAdapter.from_unet(compiled, grid_sizes={8: 3, 16: 3}).config == \
        ROICtrlAdapter.from_unet(unet, grid_sizes={8: 3, 16: 3}).config
    adapter.check_compatible(compiled)
    adapter.install(compiled)
    assert installed_adapter(unet) is adapter and installed_adapter(compiled) is adapter
    assert before != {n: len(m._forward_pre_hooks) + len(m._forward_hooks) for n, m in unet.named_modules()}
    adapter.uninstall(compiled)
    assert before == {n: len(m._forward_pre_hooks) + len(m._forward_hooks) for n, m in unet.named_modules()}
    # compiling with fullgraph=True and running it: tests/adapter/test_pipeline.py::test_compiled_unet_fullgraph


def test_official_key_names_are_aliases():
    data = make_instances(2, 3, 32, masks=[[1, 1, 0], [0, 1, 1]])
    ours = ROICtrlInstances.coerce(data)
    official = ROICtrlInstances.coerce(
        {"instance_boxes": data["boxes"], "instance_embeddings": data["embeddings"], "instance_masks": data["masks"]}
    )
    for name in ("instance_boxes", "instance_embeddings", "batch_index", "slot_index"):
        assert torch.equal(getattr(ours, name), getattr(official, name))
    with pytest.raises(ValueError, match="got both 'boxes' and its official alias 'instance_boxes'"):
        ROICtrlInstances.coerce({**data, "instance_boxes": data["boxes"]})
    with pytest.raises(ValueError, match=r"unknown keys \['instance_box'\].*official names"):
        ROICtrlInstances.coerce({"instance_box": data["boxes"], "embeddings": data["embeddings"]})
    # and through a UNet call
    unet = make_unet("sd15")
    adapter = make_adapter(unet, "sd15").install(unet)
    sample, t, text, _ = unet_inputs("sd15")
    official = {"instance_boxes": data["boxes"], "instance_embeddings": data["embeddings"],
                "instance_masks": data["masks"]}
    a = unet(sample, t, text, cross_attention_kwargs={"roictrl": official}).sample
    b = unet(sample, t, text, cross_attention_kwargs={"roictrl": data}).sample
    adapter.uninstall()
    assert torch.equal(a, b)


@pytest.mark.parametrize("preset", [None, "official"])
def test_record_blend_maps(preset):
    """adapter.record_blend_maps(): one record per layer that blended instances and UNet call, the instance
    weights of its softmax (with base_weight they sum to 1 on covered pixels, 0 outside each instance), nothing
    outside the ``with`` block and nothing changed in the UNet output."""
    unet = make_unet("sd15")
    options = {} if preset is None else {"preset": "official"}
    adapter = make_adapter(unet, "sd15", **options).eval().install(unet)
    sample, t, text, extra = unet_inputs("sd15", batch=2)
    data = make_instances(2, 4, text.shape[-1], masks=[[1, 1, 0, 0], [1, 0, 0, 0]])
    kwargs = dict(cross_attention_kwargs={"roictrl": data}, **extra)
    torch.manual_seed(0)
    plain = unet(sample, t, text, **kwargs).sample
    assert adapter.blend_recorder is None
    with adapter.record_blend_maps() as recorder:
        assert adapter.blend_recorder is recorder
        torch.manual_seed(0)
        out = unet(sample, t, text, **kwargs).sample
        unet(sample, t, text, **kwargs)
    assert adapter.blend_recorder is None
    unet(sample, t, text, **kwargs)  # not recorded
    assert torch.equal(out, plain)
    assert len(recorder) == 2 * len(adapter.blocks)
    first = recorder.take()
    assert len(recorder) == 0 and recorder.calls == 2
    assert [(r.call, r.layer) for r in first] == [(c, s.name) for c in (0, 1) for s in adapter.specs]
    for record in first[: len(adapter.blocks)]:
        K, H, W = record.instance_weights.shape
        assert K == 3 and record.rois.shape == (3, 5) and record.base_weight.shape == (2, H, W)
        assert not record.instance_weights.requires_grad and float(record.instance_weights.min()) >= 0
        total = record.base_weight.double().index_add(
            0, record.rois[:, 0].long(), record.instance_weights.double()
        )
        torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-5, atol=1e-5)
    adapter.uninstall()
