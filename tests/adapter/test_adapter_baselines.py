"""The benchmark's baselines (benchmarks/adapter_baselines.py) measure what they claim: the naive block computes
the adapter's function the official release's way, the masked-attention block stays inside its boxes."""

import os
import sys

import pytest
import torch
from diffusers.models.attention_processor import Attention
from roictrl_testutils import randomize_

from roi_ops.roictrl_adapter import BoxEncoder, ROICtrlInstances

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks"))
from adapter_baselines import MaskedAttnROICtrlBlock, NaiveROICtrlBlock, make_block  # noqa: E402

B, H, W, C, D, P = 3, 9, 7, 16, 12, 4
# Sample 0 has no instance (CFG), sample 1 three overlapping ones, sample 2 one plus padding.
MASKS = [[0, 0, 0], [1, 1, 1], [0, 1, 0]]


def _case(dtype=torch.float64, boxes=None):
    torch.manual_seed(0)
    attn = Attention(query_dim=C, cross_attention_dim=D, heads=2, dim_head=C // 2).eval().requires_grad_(False)
    encoder = randomize_(BoxEncoder(8, num_freqs=4, hidden_dim=8), 0).to(dtype)
    g = torch.Generator().manual_seed(1)
    if boxes is None:
        lo = torch.rand(B, 3, 2, generator=g) * 0.5
        boxes = torch.cat([lo, lo + 0.25 + torch.rand(B, 3, 2, generator=g) * 0.25], dim=-1)
    instances = ROICtrlInstances(boxes, torch.randn(B, 3, 5, D, generator=g, dtype=dtype), masks=torch.tensor(MASKS))
    tensors = [torch.randn(B, H * W, C, generator=g, dtype=dtype) for _ in range(3)]
    return attn.to(dtype), encoder, instances, tensors, torch.randn(B, 5, D, generator=g, dtype=dtype)


def _step(block, attn, encoder, instances, tensors, text):
    hidden, residual, global_out = (t.clone().requires_grad_() for t in tensors)
    out, stats = block(hidden, residual, global_out, attn, instances, (H, W), encoder(instances.instance_boxes),
                       encoder_hidden_states=text)
    covered = stats["covered"]
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    (loss + (stats["base_weight"] * covered).sum() / covered.sum()).backward()
    grads = [t.grad for t in (hidden, residual, global_out)] + [p.grad for p in block.parameters()]
    return out.detach(), stats["base_weight"].detach(), grads


@pytest.mark.parametrize("fused", [True, False])
def test_naive_block_equals_the_adapter_block(fused):
    attn, encoder, instances, tensors, text = _case()
    adapter_block = randomize_(make_block("fused" if fused else "unfused", C, 2, 8, P), 0).double()
    naive = make_block("naive", C, 2, 8, P).double()
    assert isinstance(naive, NaiveROICtrlBlock)
    naive.load_state_dict(adapter_block.state_dict())
    ref_out, ref_w, ref_grads = _step(adapter_block, attn, encoder, instances, tensors, text)
    out, w, grads = _step(naive, attn, encoder, instances, tensors, text)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w, ref_w, rtol=1e-12, atol=1e-12)
    assert (ref_w[1:] < 1).any() and torch.equal(ref_w[0], torch.ones_like(ref_w[0]))
    for g, ref in zip(grads, ref_grads):
        assert ref is not None and ref.abs().sum() > 0
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masked_self_attention", [False, True])
def test_masked_attention_block_acts_inside_its_boxes_only(masked_self_attention):
    # The last valid box (sample 2) covers no pixel at all: the masked self-attention must not produce NaN.
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.6]] * 3,
                          [[0.05, 0.1, 0.45, 0.6], [0.3, 0.4, 0.7, 0.95], [0.5, 0.0, 1.0, 0.5]],
                          [[0.0, 0.0, 1.0, 1.0], [0.52, 0.52, 0.53, 0.53], [0.0, 0.0, 1.0, 1.0]]])
    attn, encoder, instances, (hidden, _, _), text = _case(torch.float32, boxes)
    block = randomize_(MaskedAttnROICtrlBlock(C, 2, 8, P, masked_self_attention=masked_self_attention), 0)
    global_out = attn(hidden, encoder_hidden_states=text)
    with torch.no_grad():
        out, w, rois = block.instance_path(hidden, global_out, attn, instances, (H, W), text)
    ys, xs = torch.arange(H).view(H, 1), torch.arange(W).view(1, W)
    covered = torch.zeros(B, H, W, dtype=torch.bool)
    for b, x1, y1, x2, y2 in rois.tolist():  # the spec's coverage rule, aligned=True
        covered[int(b)] |= (y1 - 0.5 <= ys) & (ys < y2 - 0.5) & (x1 - 0.5 <= xs) & (xs < x2 - 0.5)
    assert covered[1].any() and not covered[2].any() and not covered.all()
    out, global_out = out.view(B, H, W, C), global_out.view(B, H, W, C)
    assert torch.isfinite(out).all()
    assert torch.equal(out[~covered], global_out[~covered])
    assert torch.equal(w[~covered], torch.ones_like(w[~covered]))
    assert ((out - global_out).abs().amax(-1)[covered] > 0).all()


def test_masked_self_attention_is_the_self_attention_of_the_box_tokens():
    # The masked form costs (H*W)^2 per instance but must compute, inside the box, exactly the self-attention of
    # the box's own tokens: masked-out keys get zero weight.
    torch.manual_seed(3)
    block = randomize_(MaskedAttnROICtrlBlock(C, 2, 8, P), 0).double()
    x = torch.randn(2, H * W, C, dtype=torch.float64)
    box_mask = torch.zeros(2, H, W, dtype=torch.bool)
    box_mask[0, 2:6, 1:4] = True
    box_mask[1, 0:3, 3:7] = True
    box_mask = box_mask.view(2, H * W)
    out = block.masked_roi_self_attention(x, box_mask)
    for k in range(2):
        inside = x[k, box_mask[k]].unsqueeze(0)
        expected = block.roi_attn(block.roi_norm(inside))[0]
        torch.testing.assert_close(out[k, box_mask[k]], expected, rtol=1e-12, atol=1e-12)
    # ...and it is not the full-map self-attention (the mask does something).
    assert not torch.allclose(out[0, box_mask[0]], block.roi_attn(block.roi_norm(x[:1]))[0, box_mask[0]])


def test_masked_methods_differ_only_by_the_self_attention():
    attn, encoder, instances, (hidden, _, _), text = _case(torch.float64)
    masked = randomize_(make_block("masked", C, 2, 8, P), 0).double()
    lower_bound = make_block("masked_xattn", C, 2, 8, P).double()
    lower_bound.load_state_dict(masked.state_dict())
    global_out = attn(hidden, encoder_hidden_states=text)
    with torch.no_grad():
        full, _, _ = masked.instance_path(hidden, global_out, attn, instances, (H, W), text)
        without, _, _ = lower_bound.instance_path(hidden, global_out, attn, instances, (H, W), text)
        masked.roi_gate.zero_()  # tanh(0) = 0: the self-attention's contribution vanishes
        gated_off, _, _ = masked.instance_path(hidden, global_out, attn, instances, (H, W), text)
    assert not torch.allclose(full, without)
    torch.testing.assert_close(gated_off, without, rtol=0, atol=0)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match=r"method must be one of \['fused', 'masked', 'masked_xattn', 'naive', 'unfused'\], got 'x'"):
        make_block("x", C, 2, 8, P)
