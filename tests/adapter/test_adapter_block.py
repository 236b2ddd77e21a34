"""One ROICtrlBlock driven by hand, with a diffusers Attention as the layer's pretrained cross-attention."""

import pytest
import torch
from diffusers.models.attention_processor import Attention
from roictrl_testutils import randomize_

from roi_ops.roictrl_adapter import BoxEncoder, ROICtrlBlock, ROICtrlInstances

B, H, W, C, D, L, P = 2, 6, 10, 16, 12, 5, 4


def _layer(seed=0):
    torch.manual_seed(seed)
    attn = Attention(query_dim=C, cross_attention_dim=D, heads=2, dim_head=C // 2).eval().requires_grad_(False)
    block = randomize_(ROICtrlBlock(C, heads=2, position_dim=8, grid=P), seed)
    encoder = randomize_(BoxEncoder(8, num_freqs=4, hidden_dim=8), seed)
    return attn, block, encoder


def _states(seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, H * W, C, generator=g)
    residual = torch.randn(B, H * W, C, generator=g)
    text = torch.randn(B, 7, D, generator=g)
    return hidden, residual, text


def _instances(boxes, masks=None, seed=2, scale=1.0):
    boxes = torch.tensor(boxes, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(*boxes.shape[:2], L, D, generator=g)
    return ROICtrlInstances(boxes=boxes, embeddings=emb, masks=None if masks is None else torch.tensor(masks), scale=scale)


BOXES = [[[0.05, 0.1, 0.45, 0.6], [0.3, 0.4, 0.7, 0.95]], [[0.5, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 0.0]]]
MASKS = [[1, 1], [1, 0]]


def _covered(box):
    """Spec coverage (aligned=True) of one normalised box on the H x W map: BoolTensor[H, W]."""
    x1, y1, x2, y2 = box[0] * W, box[1] * H, box[2] * W, box[3] * H
    hs = torch.arange(H, dtype=torch.float64).view(H, 1)
    ws = torch.arange(W, dtype=torch.float64).view(1, W)
    return (y1 - 0.5 <= hs) & (hs < y1 - 0.5 + (y2 - y1)) & (x1 - 0.5 <= ws) & (ws < x1 - 0.5 + (x2 - x1))


def _run_path(attn, block, inst, hidden, text):
    global_out = attn(hidden, encoder_hidden_states=text)
    out, w, _ = block.instance_path(hidden, global_out, attn, inst, (H, W), text)
    return global_out, out.view(B, H, W, C), w


def _run_block(attn, block, encoder, inst, hidden, residual, text):
    global_out = attn(hidden, encoder_hidden_states=text)
    pos = encoder(inst.instance_boxes)
    out, stats = block(hidden, residual, global_out, attn, inst, (H, W), pos, text)
    return global_out, out, stats


def test_pixels_covered_by_no_box_are_untouched_by_the_instance_path():
    attn, block, _ = _layer()
    hidden, _, text = _states()
    inst = _instances(BOXES, MASKS)
    global_out, out, w = _run_path(attn, block, inst, hidden, text)
    global_out = global_out.view(B, H, W, C)
    covered = torch.stack([_covered(BOXES[0][0]) | _covered(BOXES[0][1]), _covered(BOXES[1][0])])
    assert covered.any() and (~covered).any()
    assert torch.equal(out[~covered], global_out[~covered])
    assert torch.equal(w[~covered], torch.ones_like(w[~covered]))
    # ... and every covered pixel is changed (random weights, so no accidental equality)
    assert ((out - global_out).abs().amax(-1)[covered] > 0).all()


def test_caption_changes_the_blended_output_inside_its_box_only():
    attn, block, _ = _layer()
    hidden, _, text = _states()
    inst = _instances(BOXES, MASKS)
    emb = inst.embeddings.clone()
    emb[0, 0] = torch.randn(L, D, generator=torch.Generator().manual_seed(9))
    other = ROICtrlInstances(boxes=inst.boxes, embeddings=emb, masks=inst.masks)
    _, out1, w1 = _run_path(attn, block, inst, hidden, text)
    _, out2, w2 = _run_path(attn, block, other, hidden, text)
    inside = torch.zeros(B, H, W, dtype=torch.bool)
    inside[0] = _covered(BOXES[0][0])
    assert ((out1 - out2).abs().amax(-1)[inside] > 0).all()
    assert torch.equal(out1[~inside], out2[~inside])  # including pixels covered by the other boxes
    assert torch.equal(w1[~inside], w2[~inside])


def test_padded_instances_change_nothing():
    attn, block, encoder = _layer()
    hidden, residual, text = _states()
    compact = _instances(BOXES, MASKS)
    # Same valid instances with padding slots in between, holding garbage (NaN boxes, huge embeddings).
    boxes = torch.tensor(
        [[BOXES[0][0], [float("nan"), 2.0, -1.0, 0.0], BOXES[0][1]], [[9.0, 9.0, 9.0, 9.0], BOXES[1][0], BOXES[1][1]]]
    )
    emb = torch.full((B, 3, L, D), 1e6)
    emb[0, 0], emb[0, 2], emb[1, 1] = compact.embeddings[0, 0], compact.embeddings[0, 1], compact.embeddings[1, 0]
    padded = ROICtrlInstances(boxes=boxes, embeddings=emb, masks=torch.tensor([[1, 0, 1], [0, 1, 0]]))
    _, out_a, stats_a = _run_block(attn, block, encoder, compact, hidden, residual, text)
    _, out_b, stats_b = _run_block(attn, block, encoder, padded, hidden, residual, text)
    assert torch.equal(out_a, out_b)
    assert torch.equal(stats_a["base_weight"], stats_b["base_weight"])


def test_sample_without_instances_gets_the_global_output_bitwise():
    attn, block, encoder = _layer()
    hidden, residual, text = _states()
    inst = _instances(BOXES, [[1, 1], [0, 0]])
    global_out, out, stats = _run_block(attn, block, encoder, inst, hidden, residual, text)
    assert torch.equal(out[1], global_out[1])
    assert not torch.equal(out[0], global_out[0])
    assert not stats["covered"][1].any()


def test_fresh_gates_make_guidance_and_roi_attention_no_ops():
    attn, block, encoder = _layer()
    hidden, residual, text = _states()
    inst = _instances(BOXES, MASKS)
    with torch.no_grad():
        for gate in (block.roi_gate, block.guide_attn_gate, block.guide_ff_gate):
            gate.zero_()
    pos = encoder(inst.instance_boxes)
    delta = block.box_guidance(residual, pos, inst)
    assert torch.equal(delta, torch.zeros_like(delta))
    _, blended, _ = _run_path(attn, block, inst, hidden, text)
    _, out, _ = _run_block(attn, block, encoder, inst, hidden, residual, text)
    assert torch.equal(out.view(B, H, W, C), blended)


def test_guidance_uses_position_tokens_and_reaches_the_whole_sample():
    attn, block, encoder = _layer()
    hidden, residual, text = _states()
    inst = _instances(BOXES, [[1, 1], [0, 0]])
    moved = ROICtrlInstances(boxes=inst.boxes * 0.8 + 0.1, embeddings=inst.embeddings, masks=inst.masks)
    res = residual.index_select(0, inst.sample_index)
    d1 = block.box_guidance(res, encoder(inst.instance_boxes), inst)
    d2 = block.box_guidance(res, encoder(moved.instance_boxes), moved)
    assert (d1 - d2).abs().amax(-1).gt(0).all()  # boxes steer every token of the sample, by design


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_scale_interpolates_between_global_and_full_output(scale):
    attn, block, encoder = _layer()
    hidden, residual, text = _states()
    full = _instances(BOXES, MASKS)
    scaled = _instances(BOXES, MASKS, scale=scale)
    g, out1, _ = _run_block(attn, block, encoder, full, hidden, residual, text)
    _, out_s, _ = _run_block(attn, block, encoder, scaled, hidden, residual, text)
    torch.testing.assert_close(out_s, g + scale * (out1 - g), rtol=1e-5, atol=1e-5)


def test_wrong_sizes_raise():
    attn, block, encoder = _layer()
    hidden, residual, text = _states()
    inst = _instances(BOXES, MASKS)
    g = attn(hidden, encoder_hidden_states=text)
    with pytest.raises(ValueError, match=r"H\*W == tokens, got 5x10 for 60 tokens"):
        block.instance_path(hidden, g, attn, inst, (5, W), text)
    one = _instances(BOXES[:1], MASKS[:1])
    with pytest.raises(ValueError, match=r"instances are for a batch of 1 but the UNet batch is 2"):
        block.instance_path(hidden, g, attn, one, (H, W), text)


# Box edges well away from pixel centres, so float32 and float64 box arithmetic agree on coverage.
SAFE_BOXES = [[[0.07, 0.13, 0.43, 0.61], [0.31, 0.42, 0.72, 0.93]], [[0.52, 0.03, 0.97, 0.52], [0.0, 0.0, 0.0, 0.0]]]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_follow_float32(dtype):
    attn, block, encoder = _layer()
    hidden, residual, text = _states()
    inst = _instances(SAFE_BOXES, MASKS)
    _, ref, ref_stats = _run_block(attn, block, encoder, inst, hidden, residual, text)
    attn, block, encoder = attn.to(dtype), block.to(dtype), encoder.to(dtype)
    _, out, stats = _run_block(attn, block, encoder, inst, hidden.to(dtype), residual.to(dtype), text.to(dtype))
    assert out.dtype == dtype and stats["base_weight"].dtype == dtype
    assert torch.equal(stats["covered"], ref_stats["covered"])
    tol = 1e-1 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_no_valid_instance_returns_the_global_output():
    attn, block, encoder = _layer()
    hidden, residual, text = _states()
    inst = _instances(BOXES, [[0, 0], [0, 0]])
    g, out, stats = _run_block(attn, block, encoder, inst, hidden, residual, text)
    assert out is g and not stats["covered"].any()


def test_a_sample_does_not_see_other_samples_padding():
    """Sample 1 has one instance while sample 0 has two: its unused position slot must stay invisible."""
    attn, block, encoder = _layer()
    hidden, residual, text = _states()
    inst = _instances(BOXES, MASKS)
    _, out, _ = _run_block(attn, block, encoder, inst, hidden, residual, text)
    alone = ROICtrlInstances(boxes=inst.boxes[1:, :1], embeddings=inst.embeddings[1:, :1])
    g1 = attn(hidden[1:], encoder_hidden_states=text[1:])
    out1, _ = block(hidden[1:], residual[1:], g1, attn, alone, (H, W), encoder(alone.instance_boxes), text[1:])
    torch.testing.assert_close(out[1:], out1, rtol=1e-5, atol=1e-6)


def test_crops_sample_the_box_in_feature_pixels_with_aligned_corners():
    """On an affine field (channel 0 = column, channel 1 = row) the crop handed to the pretrained cross-attention
    holds exactly the bin centres of the box mapped to this H x W map (x by W, y by H, half-pixel offset)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    seen = []

    class Recording(AttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            seen.append(hidden_states)
            return super().__call__(attn, hidden_states, *args, **kwargs)

    attn, block, encoder = _layer()
    attn.set_processor(Recording())
    hidden, residual, text = _states()
    rows, cols = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    hidden[..., 0] = cols.flatten()
    hidden[..., 1] = rows.flatten()
    box = [0.2, 0.3, 0.6, 0.9]
    inst = _instances([[box], [box]], [[1], [0]])
    _run_block(attn, block, encoder, inst, hidden, residual, text)
    crop = seen[-1].view(1, P, P, C)  # the instance call: one crop
    j = torch.arange(P, dtype=torch.float32)
    x = box[0] * W - 0.5 + (j + 0.5) * (box[2] - box[0]) * W / P
    y = box[1] * H - 0.5 + (j + 0.5) * (box[3] - box[1]) * H / P
    torch.testing.assert_close(crop[0, :, :, 0], x.view(1, P).expand(P, P), rtol=0, atol=1e-5)
    torch.testing.assert_close(crop[0, :, :, 1], y.view(P, 1).expand(P, P), rtol=0, atol=1e-5)


@pytest.mark.parametrize("fourier", ["pow2_pi", "gligen"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_box_features_keep_float32_frequencies_in_half_precision(fourier, dtype):
    # a half-precision encoder must see the angles a float32 one trains with (frequencies are not rounded)
    enc = BoxEncoder(16, hidden_dim=16, fourier=fourier)
    boxes = torch.tensor([[0.1, 0.2, 0.9, 0.7], [0.0, 0.5, 1.0, 1.0]])
    reference = enc.features(boxes)
    assert enc.to(dtype).frequencies().dtype == torch.float32
    torch.testing.assert_close(enc.features(boxes), reference, rtol=0, atol=0)
