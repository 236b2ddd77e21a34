"""Autograd and PyTorch integration: gradcheck in float64, double backward
refused clearly, torch.library.opcheck on every op, torch.compile(fullgraph)
through both ops (forward and backward), with dynamic shapes."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo import lookup_backend

import roi_ops
from helpers import DEVICES, make_generator, assert_native, randn

pytestmark = pytest.mark.parametrize("device", DEVICES)


def _boxes_away_from_edges(gen, batch, H, W, k, dtype, device):
    # fractional parts kept away from 0 and 1/2 so that no sample or coverage
    # end sits on a pixel (the ops are linear in input either way, but this
    # keeps finite differences far from any branch)
    u = lambda *s: torch.rand(s, generator=gen, dtype=torch.float64)  # noqa: E731
    x1 = torch.floor(u(k) * (W - 2)) + 0.1 + 0.3 * u(k)
    y1 = torch.floor(u(k) * (H - 2)) + 0.1 + 0.3 * u(k)
    x2 = x1 + 1.2 + torch.floor(u(k) * (W - 1))
    y2 = y1 + 1.2 + torch.floor(u(k) * (H - 1))
    idx = torch.randint(0, batch, (k,), generator=gen).double()
    return torch.stack([idx, x1, y1, x2, y2], 1).to(device, dtype)


# ---------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_roi_align(device, seed, aligned, sampling_ratio, layout):
    gen = make_generator(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = randn((2, 2, 6, 7), gen).to(device).contiguous(memory_format=fmt).requires_grad_()
    boxes = _boxes_away_from_edges(gen, 2, 6, 7, 4, torch.float64, device)
    fn = lambda t: roi_ops.roi_align(t, boxes, (3, 2), 1.0, sampling_ratio, aligned)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck_roi_unpool(device, seed, aligned, layout):
    gen = make_generator(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    boxes = _boxes_away_from_edges(gen, 2, 7, 6, 4, torch.float64, device)
    boxes[:, 1:] *= 2  # image units for spatial_scale 0.5
    x = randn((4, 2, 3, 2), gen).to(device).contiguous(memory_format=fmt).requires_grad_()
    fn = lambda t: roi_ops.roi_unpool(t, boxes, (7, 6), 0.5, aligned)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("op", ["roi_align", "roi_unpool"])
def test_double_backward_is_refused(device, op):
    gen = make_generator(0)
    boxes = _boxes_away_from_edges(gen, 1, 5, 5, 2, torch.float64, device)
    if op == "roi_align":
        x = randn((1, 2, 5, 5), gen).to(device).requires_grad_()
        out = roi_ops.roi_align(x, boxes, 2)
    else:
        x = randn((2, 2, 2, 2), gen).to(device).requires_grad_()
        out = roi_ops.roi_unpool(x, boxes, 5)
    g = torch.randn_like(out).requires_grad_()
    (gx,) = torch.autograd.grad(out, x, g, create_graph=True)
    with pytest.raises(RuntimeError, match=r"(?i)double backward.*not supported"):
        torch.autograd.grad(gx.sum(), g)


# ---------------------------------------------------------------- opcheck


def _align_args(device, dtype, layout, requires_grad=True):
    gen = make_generator(1)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = randn((2, 3, 6, 5), gen).to(device, dtype).contiguous(memory_format=fmt)
    x.requires_grad_(requires_grad)
    rois = _boxes_away_from_edges(gen, 2, 6, 5, 3, dtype, device)
    return x, rois


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_roi_align(device, dtype, layout):
    assert_native(device)
    x, rois = _align_args(device, dtype, layout)
    for aligned, sr in ((False, -1), (True, 2)):
        torch.library.opcheck(torch.ops.roi_ops.roi_align.default, (x, rois, 0.5, 3, 2, sr, aligned))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_roi_unpool(device, dtype, layout):
    assert_native(device)
    x, rois = _align_args(device, dtype, "contiguous", requires_grad=False)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    grids = torch.randn(3, 3, 3, 2, device=device, dtype=dtype).contiguous(memory_format=fmt)
    grids.requires_grad_()
    for aligned in (False, True):
        torch.library.opcheck(torch.ops.roi_ops.roi_unpool.default, (grids, rois, 0.5, 6, 5, aligned))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_backward_ops(device, dtype):
    assert_native(device)
    _, rois = _align_args(device, dtype, "contiguous", requires_grad=False)
    grad = torch.randn(3, 3, 3, 2, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.roi_ops._roi_align_backward.default,
                          (grad, rois, 0.5, 3, 2, 2, 3, 6, 5, 2, True))
    grad_map = torch.randn(3, 3, 6, 5, device=device, dtype=dtype)
    torch.library.opcheck(torch.ops.roi_ops._roi_unpool_backward.default,
                          (grad_map, rois, 0.5, 3, 2, False))


# ---------------------------------------------------------------- torch.compile


def _chain(x, boxes):
    crops = roi_ops.roi_align(x, boxes, (3, 2), 0.5, 2, True)
    back = roi_ops.roi_unpool(crops * 2.0, boxes, (x.shape[2], x.shape[3]), 0.5, True)
    return crops, back


def _eager_and_compiled(fn, backend, device, list_boxes=False, dynamic=None):
    gen = make_generator(5)
    x = randn((2, 3, 8, 7), gen).float().to(device)
    rois = _boxes_away_from_edges(gen, 2, 8, 7, 4, torch.float32, device)
    rois[:, 1:] *= 2
    boxes = [rois[rois[:, 0] == b, 1:] for b in range(2)] if list_boxes else rois
    results = []
    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=dynamic)
    for f in (fn, compiled):
        xi = x.clone().requires_grad_()
        crops, back = f(xi, boxes)
        (crops.square().sum() + (back * back.detach()).sum()).backward()
        results.append((crops.detach(), back.detach(), xi.grad))
    return results


@pytest.mark.parametrize("list_boxes", [False, True])
def test_compile_fullgraph_aot_eager(device, list_boxes):
    torch._dynamo.reset()
    (c0, b0, g0), (c1, b1, g1) = _eager_and_compiled(_chain, "aot_eager", device, list_boxes)
    # the same kernels run: bitwise equal
    assert torch.equal(c0, c1) and torch.equal(b0, b1) and torch.equal(g0, g1)


def test_compile_fullgraph_inductor(device):
    torch._dynamo.reset()
    (c0, b0, g0), (c1, b1, g1) = _eager_and_compiled(_chain, "inductor", device)
    for a, b in ((c0, c1), (b0, b1), (g0, g1)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_compile_dynamic_shapes_trace_once(device):
    torch._dynamo.reset()
    graphs = []
    aot_eager = lookup_backend("aot_eager")

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def fn(x, boxes, grids):
        crops = roi_ops.roi_align(x, boxes, (3, 3), 0.5, -1, False)
        pasted = roi_ops.roi_unpool(grids, boxes, (x.shape[2], x.shape[3]), 0.5, False)
        return crops, pasted

    compiled = torch.compile(fn, backend=counting, fullgraph=True, dynamic=True)
    gen = make_generator(9)
    # no size-1 dimension (specialised by design), and distinct sizes in the
    # first call (equal ones are assumed equal forever: "duck sizing")
    for (b, c, h, w, k, ph, pw) in ((2, 3, 8, 7, 4, 6, 9), (3, 5, 11, 6, 7, 2, 4), (4, 2, 9, 10, 2, 3, 3)):
        x = randn((b, c, h, w), gen).float().to(device).requires_grad_()
        boxes = _boxes_away_from_edges(gen, b, h, w, k, torch.float32, device)
        grids = randn((k, c, ph, pw), gen).float().to(device).requires_grad_()
        crops, pasted = compiled(x, boxes, grids)
        e_crops, e_pasted = fn(x, boxes, grids)
        assert torch.equal(crops, e_crops) and torch.equal(pasted, e_pasted)
        (crops.sum() + pasted.sum()).backward()
    assert len(graphs) == 1, f"recompiled for new shapes: {len(graphs)} graphs"
