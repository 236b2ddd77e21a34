"""blend(): the unfused per-pixel softmax paste-back, against a pixel-by-pixel oracle written from the spec."""

import pytest
import torch

import roi_ops
from roi_ops.roictrl_adapter import blend, coverage


def _covers(box, h, w):
    """Spec coverage for aligned=True, spatial_scale=1: y1' <= h < y1' + rh (same for x)."""
    _, x1, y1, x2, y2 = box.tolist()
    return (y1 - 0.5 <= h < y1 - 0.5 + (y2 - y1)) and (x1 - 0.5 <= w < x1 - 0.5 + (x2 - x1))


def _oracle(base, base_logit, grid, grid_logit, boxes):
    B, C, H, W = base.shape
    values = roi_ops.roi_unpool(grid, boxes, (H, W), aligned=True)
    logits = roi_ops.roi_unpool(grid_logit.unsqueeze(1), boxes, (H, W), aligned=True)[:, 0]
    out = torch.empty_like(base)
    w_base = torch.empty(B, H, W, dtype=base.dtype)
    for b in range(B):
        for h in range(H):
            for w in range(W):
                ks = [k for k in range(boxes.shape[0]) if int(boxes[k, 0]) == b and _covers(boxes[k], h, w)]
                z = torch.stack([base_logit[b, h, w]] + [logits[k, h, w] for k in ks])
                p = torch.softmax(z, 0)
                out[b, :, h, w] = p[0] * base[b, :, h, w] + sum((p[i + 1] * values[k, :, h, w] for i, k in enumerate(ks)),
                                                                torch.zeros(C, dtype=base.dtype))
                w_base[b, h, w] = p[0]
    return out, w_base


def _case(seed, B=2, C=3, H=7, W=9, P=3, dtype=torch.float64, order=(0, 1, 0, 1)):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b in order:
        lo = torch.rand(2, generator=g, dtype=torch.float64) * torch.tensor([W * 0.6, H * 0.6], dtype=torch.float64)
        size = 1.5 + torch.rand(2, generator=g, dtype=torch.float64) * 4
        rows.append(torch.cat([torch.tensor([float(b)], dtype=torch.float64), lo, lo + size]))
    boxes = torch.stack(rows)
    K = boxes.shape[0]
    base = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    base_logit = torch.randn(B, H, W, generator=g, dtype=torch.float64).to(dtype)
    grid = torch.randn(K, C, P, P, generator=g, dtype=torch.float64).to(dtype)
    grid_logit = torch.randn(K, P, P, generator=g, dtype=torch.float64).to(dtype)
    return base, base_logit, grid, grid_logit, boxes


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("order", [(0, 1, 0, 1), (1, 1, 0), (0,)])
def test_blend_matches_pixelwise_softmax_oracle(seed, order):
    base, base_logit, grid, grid_logit, boxes = _case(seed, order=order)
    out, w_base = blend(base, base_logit, grid, grid_logit, boxes, 1.0, True)
    ref_out, ref_w = _oracle(base, base_logit, grid, grid_logit, boxes)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w_base, ref_w, rtol=1e-12, atol=1e-12)


def test_uncovered_pixels_are_bitwise_base_and_weight_exactly_one():
    base, base_logit, grid, grid_logit, boxes = _case(5, dtype=torch.float32)
    out, w_base = blend(base, base_logit, grid, grid_logit, boxes, 1.0, True)
    B, C, H, W = base.shape
    covered = torch.tensor(
        [[[any(int(k[0]) == b and _covers(k, h, w) for k in boxes) for w in range(W)] for h in range(H)] for b in range(B)]
    )
    assert covered.any() and not covered.all()
    assert torch.equal(out.permute(0, 2, 3, 1)[~covered], base.permute(0, 2, 3, 1)[~covered])
    assert torch.equal(w_base[~covered], torch.ones_like(w_base[~covered]))
    assert (w_base[covered] < 1).all() and (w_base[covered] > 0).all()
    assert torch.equal(coverage(boxes.float(), B, (H, W)), covered)


def test_channels_last_base_view_gives_the_same_result():
    base, base_logit, grid, grid_logit, boxes = _case(3, dtype=torch.float32)
    tokens = base.permute(0, 2, 3, 1).contiguous()  # token-major [B, H, W, C], as the UNet holds it
    view = tokens.permute(0, 3, 1, 2)
    assert view.is_contiguous(memory_format=torch.channels_last)
    a, wa = blend(base, base_logit, grid, grid_logit, boxes, 1.0, True)
    b, wb = blend(view, base_logit, grid, grid_logit, boxes, 1.0, True)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(wa, wb)


def test_no_rois_returns_base():
    base, base_logit, grid, grid_logit, boxes = _case(0)
    out, w = blend(base, base_logit, grid[:0], grid_logit[:0], boxes[:0], 1.0, True)
    assert out is base and torch.equal(w, torch.ones(2, 7, 9, dtype=torch.float64))


def test_blend_gradcheck():
    base, base_logit, grid, grid_logit, boxes = _case(7, B=2, C=2, H=5, W=6, P=2, order=(0, 1, 0))
    inputs = [t.clone().requires_grad_() for t in (base, base_logit, grid, grid_logit)]
    assert torch.autograd.gradcheck(lambda *x: blend(*x, boxes, 1.0, True), inputs)


def test_softmax_runs_only_over_covering_rois():
    # A huge logit on an instance must not pull weight away from pixels it does not cover.
    base, base_logit, grid, grid_logit, boxes = _case(11, order=(0, 0))
    out1, w1 = blend(base, base_logit, grid, grid_logit, boxes, 1.0, True)
    grid_logit2 = grid_logit.clone()
    grid_logit2[1] += 50.0
    out2, w2 = blend(base, base_logit, grid, grid_logit2, boxes, 1.0, True)
    B, C, H, W = base.shape
    only_first = torch.tensor([[_covers(boxes[0], h, w) and not _covers(boxes[1], h, w) for w in range(W)] for h in range(H)])
    assert only_first.any()
    assert torch.equal(w1[0][only_first], w2[0][only_first])
    assert torch.equal(out1[0].permute(1, 2, 0)[only_first], out2[0].permute(1, 2, 0)[only_first])
