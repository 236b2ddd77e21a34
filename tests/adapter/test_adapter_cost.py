"""The adapter's cost options (issue 19): grid groups and their chained blend, the defaults of new and of saved
adapters, and the ops' box reads (device syncs on CUDA) inside the adapter. The grid policy and the pooled guidance
are also held to the independent oracle (test_adapter_oracle.py); the timings are benchmarks/bench_step.py's."""

from __future__ import annotations

import os

import pytest
import torch
from roictrl_testutils import make_adapter, make_instances, make_unet, unet_inputs
from safetensors.torch import load_file

import roi_ops
from roi_ops import _ops, reference
from roi_ops.roictrl_adapter import OFFICIAL_CONFIG, ArchitectureOptions, ROICtrlAdapter
from roi_ops.roictrl_adapter.adapter import NEW_ADAPTER_FF_MULT, NEW_ADAPTER_OPTIONS
from roi_ops.roictrl_adapter.grids import blend_groups, grid_sides, plan_groups

DATA = os.path.join(os.path.dirname(__file__), "data")


def _fused(base, base_logit, values, logits, rois):
    return roi_ops.roi_unpool_blend(base, base_logit, values, logits, rois, 1.0, True)


def _reference_blend(base, base_logit, grids, logits, boxes):
    """One softmax over the global output and every ROI, each pasted by the float64 reference on its own grid."""
    H, W = base.shape[-2:]
    values = torch.cat([reference.roi_unpool(g, b, (H, W), 1.0, True) for g, b in zip(grids, boxes)])
    maps = torch.cat([reference.roi_unpool(lg.unsqueeze(1), b, (H, W), 1.0, True)[:, 0] for lg, b in zip(logits, boxes)])
    rois = torch.cat(boxes)
    covered = reference.roi_unpool_coverage(rois, (H, W), 1.0, True)
    return reference.blend_pasted(base, base_logit, values, maps, covered, rois[:, 0].long())


def _case(dtype, sizes, seed=0, logit_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    B, C, H, W = 2, 3, 9, 11
    base = torch.randn(B, C, H, W, generator=g, dtype=dtype)
    base_logit = torch.randn(B, H, W, generator=g, dtype=dtype) * logit_scale
    grids, logits, boxes = [], [], []
    for k, (ph, pw) in enumerate(sizes):
        n = 2 + k % 2
        lo = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([W / 2, H / 2], dtype=torch.float64)
        side = 2 + torch.rand(n, 2, generator=g, dtype=torch.float64) * 4
        rows = torch.cat([torch.tensor([[k % 2]] * n, dtype=torch.float64), lo, lo + side], 1)
        boxes.append(rows.to(dtype))
        grids.append(torch.randn(n, C, ph, pw, generator=g, dtype=dtype))
        logits.append(torch.randn(n, ph, pw, generator=g, dtype=dtype) * logit_scale)
    return base, base_logit, grids, logits, boxes


def test_chained_blend_equals_one_call_when_the_grids_are_equal():
    base, base_logit, grids, logits, boxes = _case(torch.float64, [(4, 4)] * 3)
    out, weight = blend_groups(_fused, base, base_logit, grids, logits, boxes)
    one_out, one_weight = _fused(base, base_logit, torch.cat(grids), torch.cat(logits), torch.cat(boxes))
    torch.testing.assert_close(out, one_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weight, one_weight, rtol=1e-12, atol=1e-12)
    # float32: the chain runs in float32, as the single call's softmax does
    b32 = [t.float() for t in (base, base_logit)]
    out32, weight32 = blend_groups(_fused, *b32, [t.float() for t in grids], [t.float() for t in logits],
                                   [t.float() for t in boxes])
    torch.testing.assert_close(out32.double(), one_out, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(weight32.double(), one_weight, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_chained_blend_of_different_grids_matches_the_reference(fused, logit_scale):
    """Groups of different grid sizes, chained, against one softmax over all ROIs (float64 reference); logits
    spread over +-100 (logit_scale 30) leave base weights of 1e-40 between the calls, still exact."""
    base, base_logit, grids, logits, boxes = _case(torch.float64, [(5, 3), (2, 2), (4, 6)], logit_scale=logit_scale)
    blend = _fused if fused else (lambda *a: roi_ops.roictrl_adapter.paste.blend(*a, 1.0, True))
    out, weight = blend_groups(blend, base, base_logit, grids, logits, boxes)
    want, want_weight = _reference_blend(base, base_logit, grids, logits, boxes)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weight, want_weight, rtol=1e-10, atol=1e-300)


def test_chained_blend_stays_finite_when_a_group_swamps_the_rest():
    """float32, a group 200 above everything blended before it: the previous base weight underflows; it is
    clamped, so the chain's logit and the output stay finite, and the output is that group's values."""
    base, base_logit, grids, logits, boxes = _case(torch.float32, [(3, 3), (2, 4)])
    logits[1] = logits[1] + 200
    out, weight = blend_groups(_fused, base, base_logit, grids, logits, boxes)
    want, want_weight = _reference_blend(*(t.double() for t in (base, base_logit)), [g.double() for g in grids],
                                         [lg.double() for lg in logits], [b.double() for b in boxes])
    assert torch.isfinite(out).all() and torch.isfinite(weight).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


def _saved_full_maps(fn, shape):
    """Distinct tensors of ``shape`` that autograd keeps for the backward of ``fn()``'s graph."""
    kept = set()

    def pack(t):
        if tuple(t.shape) == tuple(shape):
            kept.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return len(kept), result


@pytest.mark.parametrize("groups", [2, 5])
def test_chained_blend_keeps_no_full_map_per_group_and_its_gradients_are_the_chains(groups):
    """Under autograd the chain reruns its forward in the backward (torch.utils.checkpoint): none of its
    intermediate full-resolution maps is kept, however many groups (at most the input map itself), where the plain
    chain keeps one per group; the gradients are the plain chain's, bitwise."""
    from roi_ops.roictrl_adapter.grids import _chain

    base, base_logit, grids, logits, boxes = _case(torch.float64, [(5, 3), (2, 2), (4, 6), (3, 3), (1, 2)][:groups])
    leaves = [t.requires_grad_() for t in (base, base_logit, *grids, *logits)]
    extra = [()] * groups
    plain_kept, (want, want_w) = _saved_full_maps(
        lambda: _chain(_fused, base, base_logit, grids, logits, boxes, extra), base.shape)
    kept, (out, w) = _saved_full_maps(lambda: blend_groups(_fused, base, base_logit, grids, logits, boxes), base.shape)
    assert plain_kept >= groups and kept <= 1
    assert torch.equal(out, want) and torch.equal(w, want_w)
    g = torch.Generator().manual_seed(1)
    grad_out, grad_w = torch.randn(out.shape, generator=g, dtype=out.dtype), torch.randn(w.shape, generator=g,
                                                                                          dtype=w.dtype)
    want_grads = torch.autograd.grad((want, want_w), leaves, (grad_out, grad_w))
    grads = torch.autograd.grad((out, w), leaves, (grad_out, grad_w))
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads))


def test_footprint_grid_sides():
    boxes = [(0.0, 0.0, 1.0, 1.0), (0.1, 0.2, 0.2, 0.25), (0.5, 0.5, 0.5, 0.5), (0.0, 0.0, 0.3, 0.9)]
    assert grid_sides(boxes, (64, 64), 25, "footprint") == [(25, 25), (4, 7), (1, 1), (25, 20)]
    assert grid_sides(boxes, (8, 16), 7, "footprint") == [(7, 7), (1, 2), (1, 1), (7, 5)]
    assert grid_sides(boxes, (64, 64), 25, "fixed") == [(25, 25)] * 4
    groups = plan_groups(boxes + [(0.2, 0.2, 0.3, 0.32)], (64, 64), 25, "footprint", torch.device("cpu"))
    assert [(g.ph, g.pw, g.index.tolist()) for g in groups] == [(25, 25, [0]), (25, 20, [3]), (8, 7, [4]),
                                                                  (4, 7, [1]), (1, 1, [2])]
    with pytest.raises(ValueError, match="grid_policy must be one of"):
        grid_sides(boxes, (8, 8), 3, "tiny")


def test_new_adapters_get_the_cost_options_saved_and_official_ones_keep_theirs():
    unet = make_unet("sd15")
    new = make_adapter(unet, "sd15")
    assert new.options == ArchitectureOptions(**NEW_ADAPTER_OPTIONS)
    # the guidance feed-forward of a new adapter is 3x wide (hidden layer of each block), the official 4x
    assert new.ff_mult == NEW_ADAPTER_FF_MULT == 3 and make_adapter(unet, "sd15", ff_mult=4).ff_mult == 4
    assert all(b.guide_ff.net[0].out_features == 3 * s.dim for b, s in zip(new.blocks, new.specs))
    assert make_adapter(unet, "sd15", preset="official").ff_mult == OFFICIAL_CONFIG["ff_mult"] == 4
    official = make_adapter(unet, "sd15", preset="official").options
    assert (official.grid_policy, official.guidance_pool) == ("fixed", 1)
    assert OFFICIAL_CONFIG["grid_policy"] == "fixed" and OFFICIAL_CONFIG["guidance_pool"] == 1
    quantised = make_adapter(unet, "sd15", unpool="official").options  # the footprint grids need the exact paste
    assert (quantised.grid_policy, quantised.guidance_pool) == ("fixed", 1)
    with pytest.raises(ValueError, match="grid_policy='footprint' needs unpool='exact'"):
        ArchitectureOptions(grid_policy="footprint", unpool="official")
    with pytest.raises(ValueError, match="guidance_pool must be an int in"):
        ArchitectureOptions(guidance_pool=0)


def test_an_adapter_saved_before_the_options_loads_fixed_and_computes_bitwise_as_before():
    """tests/adapter/data/legacy_adapter was saved by the code before these options (make_legacy_adapter.py),
    with that code's UNet output; today's code loads it as fixed grids and full-resolution guidance and gives
    the same output bit for bit (same torch build and CPU)."""
    folder = os.path.join(DATA, "legacy_adapter")
    with open(os.path.join(folder, "config.json")) as f:
        assert "grid_policy" not in f.read()
    unet = make_unet("sd15")
    adapter = ROICtrlAdapter.from_pretrained(folder, unet).install(unet)
    assert (adapter.options.grid_policy, adapter.options.guidance_pool) == ("fixed", 1)
    sample, t, text, _ = unet_inputs("sd15")
    data = make_instances(2, 3, 32, masks=[[1, 1, 1], [0, 0, 0]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the fixture was made
    try:
        with torch.no_grad():
            out = unet(sample, t, text, cross_attention_kwargs={"roictrl": data}).sample
    finally:
        torch.set_num_threads(threads)
    want = load_file(os.path.join(DATA, "legacy_adapter_output.safetensors"))["output"]
    assert torch.equal(out, want), f"max difference {float((out - want).abs().max()):.3g}"


def test_the_adapter_reads_no_box_table_back_per_op_call():
    """Inside the adapter the ops run on trusted boxes (validated once per UNet call by ROICtrlInstances): a UNet
    forward and backward with instances reads no box table on the host (each read is a device sync on CUDA; the
    count is kept by the ops' host code that the CPU and CUDA backends share). Outside, every op call reads its
    boxes, and the trusted scope does not leak out of the call."""
    unet = make_unet("sd15")
    adapter = make_adapter(unet, "sd15").install(unet)
    sample, t, text, _ = unet_inputs("sd15")
    data = make_instances(2, 3, 32, masks=[[1, 0, 1], [0, 1, 0]])
    before = _ops.host_box_reads()
    out = unet(sample, t, text, cross_attention_kwargs={"roictrl": data}).sample
    out.square().mean().backward()
    assert _ops.host_box_reads() == before
    assert all(p.grad is not None for p in adapter.parameters())
    assert not torch.ops.roi_ops._trusted_boxes()
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])
    roi_ops.roi_align(torch.randn(1, 2, 8, 8), rois, (2, 2))
    assert _ops.host_box_reads() == before + 1
    with pytest.raises(ValueError, match="batch index"):
        roi_ops.roi_align(torch.randn(1, 2, 8, 8), torch.tensor([[3.0, 1, 1, 5, 5]]), (2, 2))


def test_bench_step_quick_run_writes_its_json(tmp_path):
    """benchmarks/bench_step.py end to end on a tiny UNet: every configuration timed, ratios, the breakdown."""
    import json
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import bench_step

    path = tmp_path / "step.json"
    threads = torch.get_num_threads()
    try:
        bench_step.main(["--quick", "--rounds", "1", "--counts", "0,3", "--breakdown", "--json", str(path)])
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(path.read_text())
    (res,) = doc["results"]
    assert set(res["adapter"]) == {"0", "3"} and res["plain_ms"]["median"] > 0
    assert all(v["ratio_of_medians"] > 0 and len(v["all_ms"]) == 1 for v in res["adapter"].values())
    parts = res["breakdown_ms"]["3"]
    assert parts["adapter_blocks_total"] >= parts["instance_path"] > 0 and parts["box_guidance"] > 0
    assert doc["adapter_config"]["grid_policy"] == "footprint" and doc["threads"] >= 1


def test_bench_step_trains_every_variant_and_adapter_parts_runs(tmp_path):
    """bench_step.py --train times the default adapter and each --variant (whose own weights keep their init);
    adapter_parts.py times every block's parts."""
    import json
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import adapter_parts
    import bench_step

    threads = torch.get_num_threads()
    try:
        bench_step.main(["--quick", "--rounds", "1", "--train", "--train-rounds", "1", "--adapter-options",
                         "guidance_keys=visual", "--variant", "lean:guidance_keys=positions,ff_mult=2",
                         "--json", str(tmp_path / "step.json")])
        adapter_parts.main(["--quick", "--repeats", "1", "--json", str(tmp_path / "parts.json")])
    finally:
        torch.set_num_threads(threads)
    doc = json.loads((tmp_path / "step.json").read_text())
    assert doc["adapter_config"]["guidance_keys"] == "visual"
    assert doc["variants"]["lean"] == {"guidance_keys": "positions", "ff_mult": 2}
    training = doc["training"]
    assert training["plain"]["median_s"] > 0 and training["adapter"]["median_s"] > 0
    assert training["lean"]["median_s"] > 0 and training["lean_ratio_of_medians"] > 0
    parts = json.loads((tmp_path / "parts.json").read_text())
    assert len(parts["blocks"]) == 4 and all(b["instance_path"] > 0 and b["guidance"] > 0 for b in parts["blocks"])
    assert parts["adapter_config"]["guidance_keys"] == "positions"


def _guidance_masks(block, masks, monkeypatch):
    """The ``attn_mask`` of every SDPA call of a layer: attn2's own, then one ROICtrl block's (its attn2 call on
    the crops, ROI self-attention, guidance attention)."""
    from roi_ops.roictrl_adapter.layers import F as layers_F

    seen, sdpa = [], layers_F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        seen.append(attn_mask)
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(layers_F, "scaled_dot_product_attention", spy)
    from diffusers.models.attention_processor import Attention

    from roi_ops.roictrl_adapter import ROICtrlInstances
    from roi_ops.roictrl_adapter.layers import BoxEncoder

    torch.manual_seed(0)
    C, H, W = 8, 6, 6
    attn = Attention(query_dim=C, cross_attention_dim=C, heads=2, dim_head=4).eval()
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.5], [0.3, 0.2, 0.9, 0.9]]] * 2)
    inst = ROICtrlInstances(boxes, torch.randn(2, 2, 3, C), torch.tensor(masks))
    x = torch.randn(2, H * W, C)
    with torch.no_grad():
        block(x, x, attn(x), attn, inst, (H, W), BoxEncoder(C, 2, 8)(inst.instance_boxes))
    return seen


def test_the_guidance_attention_gets_a_key_mask_only_where_a_position_slot_is_padded(monkeypatch):
    """A mask can cost the attention kernel its fast path: none is passed where every key is real (exact)."""
    from roi_ops.roictrl_adapter.block import ROICtrlBlock

    block = ROICtrlBlock(8, 2, 8, 3).eval()
    # attn2 on the map and on the crops, the ROI self-attention, the guidance attention: no mask anywhere
    assert _guidance_masks(block, [[1, 1], [1, 1]], monkeypatch) == [None] * 4
    seen = _guidance_masks(block, [[1, 1], [1, 0]], monkeypatch)  # sample 1 has one slot of two
    assert seen[:-1] == [None] * 3 and seen[-1] is not None
    assert seen[-1].dtype == torch.bool and seen[-1].shape == (2, 1, 1, 36 + 2)
    assert seen[-1][1, 0, 0].tolist() == [True] * 37 + [False]


def test_guidance_kv_pool_is_checked_and_pooled_keys_carry_their_pixel_count(monkeypatch):
    with pytest.raises(ValueError, match="guidance_kv_pool must be an int in"):
        ArchitectureOptions(guidance_kv_pool=9)
    from roi_ops.roictrl_adapter.block import ROICtrlBlock

    block = ROICtrlBlock(8, 2, 8, 3, options=ArchitectureOptions(guidance_kv_pool=4)).eval()
    seen = _guidance_masks(block, [[1, 1], [1, 1]], monkeypatch)
    # a 6x6 map in 4x4 windows: 2x2 keys of 16, 8, 8 and 4 pixels, then the two position tokens (bias 0)
    bias = seen[-1][0, 0, 0]
    torch.testing.assert_close(bias, torch.tensor([16.0, 8.0, 8.0, 4.0, 1.0, 1.0]).log())


def test_guidance_kv_pool_scope_finest_pools_only_the_finest_level_and_saves_with_the_adapter(tmp_path):
    unet = make_unet("sd15")
    # 2x2 pooled guidance keys at the finest level (the default of new adapters before position keys)
    adapter = make_adapter(unet, "sd15", guidance_keys="visual", guidance_kv_pool=2, guidance_kv_pool_scope="finest")
    finest = min(s.downsample for s in adapter.specs)
    pools = {(s.downsample, b.options.guidance_kv_pool) for s, b in zip(adapter.specs, adapter.blocks)}
    assert pools == {(finest, 2)} | {(s.downsample, 1) for s in adapter.specs if s.downsample != finest}
    assert len(pools) > 1
    adapter.save_pretrained(tmp_path / "a")
    loaded = ROICtrlAdapter.from_pretrained(tmp_path / "a")
    assert [b.options for b in loaded.blocks] == [b.options for b in adapter.blocks]
    everywhere = make_adapter(unet, "sd15", guidance_keys="visual", guidance_kv_pool=2, guidance_kv_pool_scope="all")
    assert {b.options.guidance_kv_pool for b in everywhere.blocks} == {2}
    with pytest.raises(ValueError, match="guidance_kv_pool_scope must be one of"):
        ArchitectureOptions(guidance_kv_pool_scope="coarsest")


def test_guidance_without_feed_forward_and_with_position_keys_holds_its_weights_and_round_trips(tmp_path):
    unet = make_unet("sd15")
    full = make_adapter(unet, "sd15", randomize=False, guidance_feed_forward=True, guidance_keys="visual")
    lean = make_adapter(unet, "sd15", randomize=False, guidance_feed_forward=False, guidance_keys="positions")
    names = {n for n, _ in lean.named_parameters()}
    assert not any(".guide_ff" in n for n in names)  # no feed-forward weights at all, not merely unused ones
    for i in range(len(lean.blocks)):
        assert {f"blocks.{i}.guide_pixel_proj.weight", f"blocks.{i}.guide_null"} <= names
        assert f"blocks.{i}.guide_ff.net.0.weight" in dict(full.named_parameters())
    fourier = 8 * lean.fourier_freqs
    assert all(b.guide_pixel_proj.weight.shape == (b.dim, fourier) for b in lean.blocks)
    # zero at init: a pixel's query starts as without its coordinates, the null token as a zero key and value
    assert all(float(b.guide_pixel_proj.weight.abs().max()) == 0 and float(b.guide_null.abs().max()) == 0
               for b in lean.blocks)
    assert sum(p.numel() for p in lean.parameters()) < 0.75 * sum(p.numel() for p in full.parameters())
    with torch.no_grad():
        for p in lean.parameters():
            p.add_(torch.rand_like(p))
    lean.save_pretrained(tmp_path / "lean")
    loaded = ROICtrlAdapter.from_pretrained(tmp_path / "lean")
    assert (loaded.options.guidance_feed_forward, loaded.options.guidance_keys) == (False, "positions")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), lean.state_dict().values()))
    with pytest.raises(ValueError, match="guidance_keys must be one of"):
        ArchitectureOptions(guidance_keys="pixels")
    with pytest.raises(ValueError, match="has none; leave guidance_kv_pool=1, or set guidance_keys='visual'"):
        ArchitectureOptions(guidance_keys="positions", guidance_kv_pool=2)
    with pytest.raises(TypeError, match="guidance_feed_forward must be bool"):
        ArchitectureOptions(guidance_feed_forward=0)
    official = make_adapter(unet, "sd15", preset="official").options
    assert (official.guidance_feed_forward, official.guidance_keys) == (True, "visual")


def test_position_keys_let_a_pixel_attend_to_nothing_and_know_where_it_is():
    """``guidance_keys="positions"``: with one box, softmax over that box alone would give every pixel the same
    update; the null token and the pixel coordinates make the update differ across the map."""
    from roi_ops.roictrl_adapter.block import ROICtrlBlock
    from roi_ops.roictrl_adapter.instances import ROICtrlInstances

    torch.manual_seed(0)
    options = ArchitectureOptions(guidance_keys="positions", guidance_feed_forward=False)
    block = ROICtrlBlock(8, 2, 8, 3, options=options).eval()
    with torch.no_grad():
        block.guide_attn_gate.fill_(1.0)
        block.guide_pixel_proj.weight.normal_()
    inst = ROICtrlInstances(torch.tensor([[[0.1, 0.1, 0.4, 0.4]]]), torch.randn(1, 1, 3, 8), torch.ones(1, 1))
    residual = torch.zeros(1, 36, 8)  # the same token at every pixel: only the coordinates tell them apart
    tokens = torch.randn(1, 8)
    with torch.no_grad():
        update = block.box_guidance(residual, tokens, inst, size=(6, 6))
        assert float(update.std(dim=1).min()) > 1e-3
        block.guide_pixel_proj.weight.zero_()
        flat = block.box_guidance(residual, tokens, inst, size=(6, 6))
    assert float((flat - flat[:, :1]).abs().max()) == 0  # without coordinates every pixel is alike


def test_train_toy_option_parses_options_and_rebuilds_with_the_shared_weights():
    """benchmarks/train_toy_option.py, the tool that retrains the toy with an option: its parser, and the rebuilt
    adapter keeps every weight it shares with the stage's adapter (new or reshaped ones keep their init) and
    leaves the RNG where it was."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
    import train_toy_option

    opts = train_toy_option.parse_options(["guidance_keys=positions", "guidance_feed_forward=false", "ff_mult=2"])
    assert opts == {"guidance_keys": "positions", "guidance_feed_forward": False, "ff_mult": 2}
    with pytest.raises(SystemExit, match="name=value with a name in"):
        train_toy_option.parse_options(["guidance_key=positions"])
    with pytest.raises(ValueError, match="guidance_keys must be one of"):
        train_toy_option.parse_options(["guidance_keys=pixels"])

    unet = make_unet("sd15")
    stage = make_adapter(unet, "sd15", guidance_keys="visual")
    rng = torch.get_rng_state()
    new = train_toy_option._rebuilt(stage, {"guidance_keys": "positions", "ff_mult": 2})
    assert torch.equal(torch.get_rng_state(), rng)
    assert (new.options.guidance_keys, new.ff_mult) == ("positions", 2)
    old, mine = stage.state_dict(), new.state_dict()
    shared = [k for k in mine if k in old and old[k].shape == mine[k].shape]
    assert shared and all(torch.equal(mine[k], old[k]) for k in shared)
    assert any(k.endswith("guide_null") for k in mine) and any(".guide_ff." in k and k not in shared for k in mine)
