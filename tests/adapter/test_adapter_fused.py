"""The fused blend (roi_ops.roi_unpool_blend, the default) against the unfused blend: same outputs and gradients
through whole UNets, and the fused path neither materialises per-instance full-resolution maps nor reads values
back to the host."""

import json

import pytest
import torch
from diffusers.models.attention_processor import Attention
from roictrl_testutils import CONFIGS, make_adapter, make_instances, make_unet, randomize_, unet_inputs
from torch.profiler import ProfilerActivity, profile

from roi_ops.roictrl_adapter import BoxEncoder, ROICtrlAdapter, ROICtrlBlock, ROICtrlInstances

# A CFG batch of two prompts: [uncond, uncond, cond, cond]. The unconditional half has no instance; the
# conditional samples have 4 and 2 valid instances (padding in between), with overlapping boxes.
MASKS = [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]]


def _train_step(unet, kind, adapter, data, dtype):
    sample, t, text, extra = unet_inputs(kind, batch=4)
    sample = sample.to(dtype).requires_grad_()
    text = text.to(dtype)
    extra = {k: {n: v.to(dtype) for n, v in d.items()} for k, d in extra.items()}
    adapter.zero_grad(set_to_none=True)
    out = unet(sample, t, text, cross_attention_kwargs={"roictrl": data}, **extra).sample
    reg = adapter.regularization_loss()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=dtype)
    ((out * g).sum() + 0.01 * reg).backward()
    grads = {n: p.grad.detach().clone() for n, p in adapter.named_parameters()}
    weights = {n: w.detach().clone() for n, w in adapter.fusion_weights().items()}
    return out.detach(), reg.detach(), grads, sample.grad.detach().clone(), weights


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_and_unfused_blend_give_the_same_unet_outputs_and_gradients(kind, dtype):
    unet = make_unet(kind).to(dtype)
    adapter = make_adapter(unet, kind).to(dtype)  # random non-zero gates and blend projections
    assert adapter.fused_blend and all(b.fused_blend for b in adapter.blocks)
    gates = [p for n, p in adapter.named_parameters() if p.dim() == 0]
    assert gates and all(abs(float(p.detach())) >= 0.5 for p in gates)
    data = make_instances(4, 4, CONFIGS[kind]["cross_attention_dim"], masks=MASKS)
    data["embeddings"] = data["embeddings"].to(dtype)
    adapter.install(unet)
    try:
        fused = _train_step(unet, kind, adapter, data, dtype)
        adapter.fused_blend = False
        assert not any(b.fused_blend for b in adapter.blocks)
        unfused = _train_step(unet, kind, adapter, data, dtype)
    finally:
        adapter.uninstall(unet)
    # float64: both are exact up to summation order; float32: the same, amplified through the UNet.
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    out_f, reg_f, grads_f, dsample_f, w_f = fused
    out_u, reg_u, grads_u, dsample_u, w_u = unfused
    torch.testing.assert_close(out_f, out_u, **tol)
    torch.testing.assert_close(reg_f, reg_u, **tol)
    torch.testing.assert_close(dsample_f, dsample_u, **tol)
    assert w_f.keys() == w_u.keys() and len(w_f) == len(adapter.specs)
    for name in w_f:
        torch.testing.assert_close(w_f[name], w_u[name], **tol)
        # The unconditional samples see no instance: weight exactly 1 on both paths.
        assert torch.equal(w_f[name][:2], torch.ones_like(w_f[name][:2]))
    assert grads_f.keys() == grads_u.keys()
    for name, g in grads_f.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name  # no vacuous equality
        scale = grads_u[name].abs().max()
        torch.testing.assert_close(g, grads_u[name], rtol=tol["rtol"], atol=tol["atol"] * max(1.0, float(scale)),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_unconditional_half_is_bitwise_the_base_unet_on_the_fused_path():
    unet = make_unet("sd15")
    sample, t, text, _ = unet_inputs("sd15", batch=4)
    base = unet(sample, t, text).sample
    adapter = make_adapter(unet, "sd15").install(unet)
    try:
        data = make_instances(4, 4, CONFIGS["sd15"]["cross_attention_dim"], masks=MASKS)
        out = unet(sample, t, text, cross_attention_kwargs={"roictrl": data}).sample
    finally:
        adapter.uninstall(unet)
    assert adapter.fused_blend
    assert torch.equal(out[:2], base[:2])
    assert not torch.equal(out[2:], base[2:])


# ------------------------------------------------------------------------ what the fused path costs
B, H, W, C, D, P, N = 2, 8, 8, 16, 12, 4, 24


def _block_case():
    torch.manual_seed(0)
    attn = Attention(query_dim=C, cross_attention_dim=D, heads=2, dim_head=C // 2).eval().requires_grad_(False)
    block = randomize_(ROICtrlBlock(C, heads=2, position_dim=8, grid=P), 0)
    encoder = randomize_(BoxEncoder(8, num_freqs=4, hidden_dim=8), 0)
    g = torch.Generator().manual_seed(1)
    lo = torch.rand(B, N, 2, generator=g) * 0.6
    boxes = torch.cat([lo, lo + 0.1 + torch.rand(B, N, 2, generator=g) * 0.3], dim=-1)
    masks = torch.tensor([[0] * N, [1] * N])  # CFG: the unconditional sample has none
    # Built up front: validating the instance data reads it back once per UNet call, by design.
    instances = ROICtrlInstances(boxes, torch.randn(B, N, 5, D, generator=g), masks=masks)
    tensors = [torch.randn(B, H * W, C, generator=g).requires_grad_() for _ in range(3)]
    return attn, block, encoder, instances, tensors, torch.randn(B, 7, D, generator=g)


def _profile_block_step(fused: bool):
    attn, block, encoder, instances, (hidden, residual, global_out), text = _block_case()
    block.fused_blend = fused
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True) as prof:
        out, stats = block(hidden, residual, global_out, attn, instances, (H, W),
                           encoder(instances.instance_boxes), encoder_hidden_states=text)
        covered = stats["covered"]
        loss = out.square().sum() + (stats["base_weight"] * covered).sum() / covered.sum().clamp(min=1)
        loss.backward()
    assert instances.num_instances == N
    return prof.events()


@pytest.mark.parametrize("fused", [True, False])
def test_fused_path_allocates_nothing_of_instance_count_times_feature_map(fused):
    """No operator of the block's forward or backward (outputs and what autograd keeps) allocates as much as
    K * C * H * W elements on the fused path; the unfused path does, which shows the check can fail."""
    events = _profile_block_step(fused)
    limit = N * C * H * W * 4  # float32 bytes of [K, C, H, W]
    largest = max((e for e in events if e.name != "[memory]"), key=lambda e: e.self_cpu_memory_usage)
    if fused:
        assert largest.self_cpu_memory_usage < limit, (largest.name, largest.input_shapes)
        assert any(e.name == "roi_ops::roi_unpool_blend" for e in events)
        assert any(e.name == "roi_ops::_roi_unpool_blend_backward" for e in events)
    else:
        assert largest.self_cpu_memory_usage >= limit


def _ancestors(event):
    names, parent = [], event.cpu_parent
    while parent is not None:
        names.append(parent.name)
        parent = parent.cpu_parent
    return names


@pytest.mark.parametrize("fused", [True, False])
def test_fused_path_reads_nothing_back_to_the_host(fused):
    """Every host read-back (``aten::_local_scalar_dense``: ``.item()``, ``int(t)``, ``bool(t)``; ``aten::nonzero``,
    whose size is read back: a device sync on GPUs) in the block's forward and backward comes from inside an
    roi_ops operator's own box checks, none from the adapter's code; the unfused blend picks each image's ROIs
    with ``nonzero``, which shows the check can fail."""
    events = _profile_block_step(fused)
    reads = [e for e in events if e.name in ("aten::_local_scalar_dense", "aten::nonzero")]
    outside = [_ancestors(e) for e in reads if not any(a.startswith("roi_ops::") for a in _ancestors(e))]
    if fused:
        assert outside == []
    else:
        assert outside


# ------------------------------------------------------------------------ the flag in configs
def test_fused_blend_is_the_default_and_round_trips(tmp_path):
    unet = make_unet("sd15")
    adapter = make_adapter(unet, "sd15")
    assert adapter.config["fused_blend"] is True
    assert ROICtrlBlock(8, 2, 8, 3).fused_blend is True
    adapter.save_pretrained(tmp_path / "fused")
    assert json.loads((tmp_path / "fused" / "config.json").read_text())["fused_blend"] is True
    assert ROICtrlAdapter.from_pretrained(tmp_path / "fused").fused_blend is True

    unfused = make_adapter(unet, "sd15", fused_blend=False)
    assert unfused.fused_blend is False and not any(b.fused_blend for b in unfused.blocks)
    assert "fused_blend=False" in repr(unfused.blocks[0])
    unfused.save_pretrained(tmp_path / "unfused")
    loaded = ROICtrlAdapter.from_pretrained(tmp_path / "unfused")
    assert loaded.config["fused_blend"] is False and not any(b.fused_blend for b in loaded.blocks)


def test_fused_blend_with_the_official_paste_says_so(tmp_path):
    """The fused op pastes exactly, so it cannot run the official quantised paste: by default an official block
    blends unfused without a word, an explicit fused_blend=True warns (at construction, on assignment, and when
    loading a folder saved before this was reported) and the unfused blend runs; the rule itself refuses."""
    import warnings

    from roi_ops.roictrl_adapter import ArchitectureOptions
    from roi_ops.roictrl_adapter.paste import EXACT, OFFICIAL

    official = ArchitectureOptions(unpool="official")
    match = "fused_blend=True has no effect with unpool='official'"
    unet = make_unet("sd15")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ROICtrlBlock(8, 2, 8, 3, options=official).fused_blend is False
        adapter = make_adapter(unet, "sd15", preset="official")
    assert adapter.paste_rule is OFFICIAL and all(b.paste_rule is OFFICIAL for b in adapter.blocks)
    assert adapter.fused_blend is False and adapter.config["fused_blend"] is False
    with pytest.warns(UserWarning, match=match):
        block = ROICtrlBlock(8, 2, 8, 3, fused_blend=True, options=official)
    assert block.fused_blend is False
    with pytest.warns(UserWarning, match=match):
        block.fused_blend = True
    assert block.fused_blend is False
    with pytest.warns(UserWarning, match=match) as record:
        adapter.fused_blend = True
    assert len(record) == 1 and adapter.fused_blend is False  # once per adapter, not once per block
    adapter.save_pretrained(tmp_path / "official")
    config_path = tmp_path / "official" / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "fused_blend": True}))  # as converted folders said before
    with pytest.warns(UserWarning, match=match):
        assert ROICtrlAdapter.from_pretrained(tmp_path / "official").fused_blend is False
    assert EXACT.fused and not OFFICIAL.fused
    x = torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4), torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="the 'official' paste rule has no fused blend"):
        OFFICIAL.blend(*x, torch.tensor([[0.0, 0, 0, 2, 2]]), fused=True)
