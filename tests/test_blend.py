"""roi_ops.roi_unpool_blend, the fused paste-back + softmax blend
(docs/spec.md, "Fused paste-back and blend"): equality with the unfused
composition forward and backward for every dtype and layout, exactness where
no box covers a pixel, gradcheck, opcheck, torch.compile, determinism, empty
cases, the bad-input contract, and that nothing of size K*C*H*W is allocated.

Two oracles, both float64 on the very same input values: roi_ops.reference's
roi_unpool_blend, and an explicit stack / -inf / softmax / sum written here
from the reference ROI-Unpool and coverage.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given

import roi_ops
from helpers import (
    DEVICES, FLOAT_DTYPES, assert_native, boxes_dtype_of, cases, coord_dtype_for, dtype_id,
    lay_out, make_boxes, make_generator, randn, rois_of,
)
from roi_ops import reference

pytestmark = pytest.mark.parametrize("device", DEVICES)

LAYOUTS = ("contiguous", "channels_last", "token_major", "strided")
# |kernel - oracle| <= tol * max(1, max|oracle|) (+ the same relative): float64
# differs from the oracle only in summation order; float32 accumulates in
# float32; the half types accumulate in float32 and round once at the end
# (2**-11 and 2**-8 of the magnitude).
TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}

B, C, H, W, PH, PW = 3, 5, 9, 11, 3, 4
# Overlapping boxes, a box past every edge, one off the map, a degenerate one,
# a sub-pixel one, huge coordinates; image 2 has no box at all.
ROWS = [
    (0, 1.0, 1.0, 7.0, 6.0), (1, 0.0, 2.0, 10.0, 9.0), (0, 3.0, 0.0, 11.0, 5.0),
    (0, -3.0, -3.0, 40.0, 40.0), (1, 20.0, 20.0, 30.0, 30.0), (0, 2.5, 3.5, 4.2, 5.1),
    (1, 4.0, 4.0, 4.0, 4.0), (1, -1.0e6, 3.3, 1.0e6, 7.7), (0, 5.2, 2.1, 5.4, 2.3),
]


def explicit_blend(base, base_logit, input, input_logit, rois, spatial_scale, aligned,
                   coord_dtype):
    """The unfused composition, spelled out: paste every grid and logit back,
    mask uncovered logits with -inf, stack per image, softmax, weighted sum."""
    size = tuple(base.shape[2:])
    kw = dict(output_size=size, spatial_scale=spatial_scale, aligned=aligned, coord_dtype=coord_dtype)
    values = reference.roi_unpool(input, rois, **kw)
    logits = reference.roi_unpool(input_logit[:, None], rois, **kw)[:, 0]
    covered = reference.roi_unpool_coverage(rois, size, spatial_scale, aligned, coord_dtype)
    batch = rois[:, 0].long()
    outs, weights = [], []
    for b in range(base.shape[0]):
        sel = batch == b
        masked = logits[sel].masked_fill(~covered[sel], float("-inf"))
        w = torch.softmax(torch.cat([base_logit[b][None], masked]), dim=0)
        outs.append(w[0] * base[b] + (w[1:, None] * values[sel]).sum(0))
        weights.append(w[0])
    return torch.stack(outs), torch.stack(weights)


def _lay_out_3d(values, dtype, device, layout):
    """A [N, H, W] logit tensor, contiguous or (layout "strided") a strided view."""
    v = values.to(device=device, dtype=dtype)
    if layout == "strided":
        n, h, w = v.shape
        big = torch.full((n, 2 * h, w + 1), float("nan"), dtype=dtype, device=device)
        big[:, ::2, 1:] = v
        v = big[:, ::2, 1:]
    return v.detach().requires_grad_()


def _operands(gen, shapes, dtype, device, layout, logit_scale=1.0):
    (b, c, h, w), (k, ph, pw) = shapes
    base = lay_out(randn((b, c, h, w), gen), dtype, device, layout)
    base_logit = _lay_out_3d(randn((b, h, w), gen) * logit_scale, dtype, device, layout)
    grids = lay_out(randn((k, c, ph, pw), gen), dtype, device, layout)
    grid_logit = _lay_out_3d(randn((k, ph, pw), gen) * logit_scale, dtype, device, layout)
    return base, base_logit, grids, grid_logit


def _assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)}, oracle {tuple(e.shape)}"
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def check_blend(base, base_logit, grids, grid_logit, boxes, spatial_scale, aligned, gen, what):
    """Forward and backward of roi_ops.roi_unpool_blend against both float64 oracles."""
    x = (base.x, base_logit, grids.x, grid_logit)
    dtype = base.x.dtype
    out, bw = roi_ops.roi_unpool_blend(*x, boxes, spatial_scale, aligned)
    assert out.dtype == dtype and bw.dtype == dtype
    assert tuple(out.shape) == tuple(base.x.shape) and tuple(bw.shape) == tuple(base_logit.shape)
    if base.x.dim() == 4 and base.x.is_contiguous(memory_format=torch.channels_last) \
            and not base.x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), what
    g = randn(out.shape, gen).to(out.device, dtype)
    gw = randn(bw.shape, gen).to(bw.device, dtype)
    leaves = (base.leaf, base_logit, grids.leaf, grid_logit)
    grads = torch.autograd.grad((out, bw), leaves, (g, gw))
    grads = (base.grad_to_x(grads[0]), grads[1], grids.grad_to_x(grads[2]), grads[3])

    x64 = [t.detach().to("cpu", torch.float64).requires_grad_() for t in x]
    rois = rois_of(boxes).cpu()
    cd = coord_dtype_for(dtype, boxes_dtype_of(boxes))
    for name, oracle in (("reference", reference.roi_unpool_blend), ("explicit", explicit_blend)):
        r_out, r_bw = oracle(*x64, rois, spatial_scale, aligned, coord_dtype=cd)
        r_grads = torch.autograd.grad((r_out, r_bw), x64, (g.cpu().double(), gw.cpu().double()),
                                      allow_unused=True)
        _assert_close(out, r_out, dtype, f"{what}: out vs {name}")
        _assert_close(bw, r_bw, dtype, f"{what}: base_weight vs {name}")
        for label, gr, rg, t in zip(("base", "base_logit", "input", "input_logit"), grads, r_grads, x64):
            rg = torch.zeros_like(t) if rg is None else rg
            assert gr.dtype == dtype and gr.shape == t.shape, f"{what}: grad {label}"
            _assert_close(gr, rg, dtype, f"{what}: grad {label} vs {name}")
    return out, bw, grads


def _fixed_boxes(dtype, device, rows=ROWS):
    return torch.tensor(rows, dtype=torch.float64).to(device, dtype)


# ---------------------------------------------------------------- native


def test_public_function_runs_the_custom_op(device):
    assert_native(device)
    gen = make_generator(0)
    base, bl, grids, gl = _operands(gen, ((B, C, H, W), (len(ROWS), PH, PW)), torch.float32,
                                    device, "contiguous")
    boxes = _fixed_boxes(torch.float32, device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            roi_ops.roi_unpool_blend(base.x, bl, grids.x, gl, boxes, 1.0, True)
    assert "roi_ops::roi_unpool_blend" in {e.name for e in prof.events()}
    assert "roi_unpool_blend" in roi_ops.__all__


# ---------------------------------------------------------------- oracles


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_matches_unfused_composition(device, dtype, layout, aligned):
    gen = make_generator(100 * FLOAT_DTYPES.index(dtype) + 10 * LAYOUTS.index(layout) + aligned)
    ops = _operands(gen, ((B, C, H, W), (len(ROWS), PH, PW)), dtype, device, layout, logit_scale=2.0)
    boxes_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    check_blend(*ops, _fixed_boxes(boxes_dtype, device), 1.0, aligned, gen,
                f"{dtype_id(dtype)} {layout} aligned={aligned}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@given(case=cases(adversarial=True, max_batch=3, max_per_image=4, max_size=9))
def test_matches_unfused_composition_adversarial_boxes(device, dtype, case):
    gen = make_generator(case.seed)
    K = len(case.rows)
    layout = ("contiguous", "channels_last", "token_major")[case.seed % 3]
    shapes = ((case.batch, case.channels, case.height, case.width), (K,) + tuple(case.pooled))
    ops = _operands(gen, shapes, dtype, device, layout, logit_scale=1.0 + case.seed % 7)
    boxes = make_boxes(case.rows, case.batch, case.boxes_form, case.boxes_dtype or dtype, device)
    check_blend(*ops, boxes, case.spatial_scale, case.seed % 2 == 0, gen, f"{case}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_large_logits_stay_finite(device, dtype):
    # exp(300) overflows float32 and exp(20) float16: only a max-subtracted
    # softmax gets these right
    gen = make_generator(3)
    ops = _operands(gen, ((B, C, H, W), (len(ROWS), PH, PW)), dtype, device, "channels_last")
    with torch.no_grad():
        ops[1].add_(300.0 if dtype == torch.float32 else 20.0)
        ops[3].add_(300.0 if dtype == torch.float32 else 20.0)
    check_blend(*ops, _fixed_boxes(torch.float32, device), 1.0, True, gen, "large logits")


# ---------------------------------------------------------------- exactness


def _covered_by_image(rois, batch, size, aligned):
    cov = reference.roi_unpool_coverage(rois.cpu(), size, 1.0, aligned, torch.float32)
    mask = torch.zeros(batch, *size, dtype=torch.bool)
    for k in range(rois.shape[0]):
        mask[int(rois[k, 0])] |= cov[k]
    return mask


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_uncovered_pixels_are_exactly_base(device, dtype, layout):
    gen = make_generator(7)
    base, bl, grids, gl = _operands(gen, ((B, C, H, W), (len(ROWS), PH, PW)), dtype, device, layout)
    boxes = _fixed_boxes(torch.float32, device)
    out, bw = roi_ops.roi_unpool_blend(base.x, bl, grids.x, gl, boxes, 1.0, False)
    g = randn(out.shape, gen).to(device, dtype)
    gw = randn(bw.shape, gen).to(device, dtype)
    gb, gbl = torch.autograd.grad((out, bw), (base.x, bl), (g, gw))
    free = ~_covered_by_image(boxes, B, (H, W), False).to(device)
    assert bool(free.any()) and bool((~free).any())
    assert bool(free[2].all()), "image 2 has no box"
    pix = free[:, None].expand_as(out)
    assert torch.equal(out[pix], base.x.detach()[pix])
    assert torch.equal(bw[free], torch.ones_like(bw[free]))
    assert bool((bw[~free] < 1).all()) and bool((bw[~free] > 0).all())
    assert torch.equal(gb[pix], g[pix])  # d out / d base is the identity there
    assert torch.equal(gbl[free], torch.zeros_like(gbl[free]))


# ---------------------------------------------------------------- layouts, determinism


def _all_results(device, dtype, layout, threads=None, seed=11):
    gen = make_generator(seed)
    ops = _operands(gen, ((B, C, H, W), (len(ROWS), PH, PW)), dtype, device, layout)
    boxes = _fixed_boxes(torch.float32, device)
    if threads is not None:
        torch.set_num_threads(threads)
    base, bl, grids, gl = ops
    out, bw = roi_ops.roi_unpool_blend(base.x, bl, grids.x, gl, boxes, 1.0, True)
    g = randn(out.shape, gen).to(device, dtype)
    gw = randn(bw.shape, gen).to(device, dtype)
    grads = torch.autograd.grad((out, bw), (base.leaf, bl, grids.leaf, gl), (g, gw))
    grads = (base.grad_to_x(grads[0]), grads[1], grids.grad_to_x(grads[2]), grads[3])
    return (out, bw) + grads


_NAMES = ("out", "base_weight", "grad base", "grad base_logit", "grad input", "grad input_logit")


def _assert_bitwise(results, reference_results, what):
    for name, a, b in zip(_NAMES, results, reference_results):
        assert torch.equal(a, b), (
            f"{what}: {name} differs in {int((a != b).sum())} of {a.numel()} elements, "
            f"by up to {float((a.double() - b.double()).abs().max()):.3g}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_layouts_give_the_same_numbers(device, dtype):
    ref = _all_results(device, dtype, "contiguous")
    for layout in LAYOUTS[1:]:
        _assert_bitwise(_all_results(device, dtype, layout), ref, layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_repeated_runs_are_bitwise_identical(device, dtype, deterministic_algorithms):
    ref = _all_results(device, dtype, "channels_last")
    for _ in range(3):
        _assert_bitwise(_all_results(device, dtype, "channels_last"), ref, "repeat")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_thread_count_does_not_change_results(device, layout, restore_num_threads):
    ref = _all_results(device, torch.float32, layout, threads=1)
    for threads in (2, 3, 4):
        _assert_bitwise(_all_results(device, torch.float32, layout, threads=threads), ref,
                        f"{threads} threads")


# ---------------------------------------------------------------- autograd


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck(device, seed, aligned, layout):
    gen = make_generator(seed)
    rows = [(0, 0.7, 0.3, 5.6, 4.2), (0, 2.2, 1.4, 6.9, 6.3), (1, 0.1, 0.6, 3.7, 5.9),
            (0, 3.1, 2.2, 4.3, 3.8)]
    base, bl, grids, gl = _operands(gen, ((2, 2, 6, 7), (4, 2, 3)), torch.float64, device, layout)
    boxes = _fixed_boxes(torch.float64, device, rows)
    fn = lambda *t: roi_ops.roi_unpool_blend(*t, boxes, 1.0, aligned)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (base.x, bl, grids.x, gl), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_one_output_used(device):
    gen = make_generator(4)
    ops = _operands(gen, ((B, C, H, W), (len(ROWS), PH, PW)), torch.float64, device, "contiguous")
    boxes = _fixed_boxes(torch.float64, device)
    x = (ops[0].x, ops[1], ops[2].x, ops[3])
    x64 = [t.detach().cpu().requires_grad_() for t in x]
    for pick in (0, 1):
        got = torch.autograd.grad(roi_ops.roi_unpool_blend(*x, boxes, 1.0, True)[pick].square().sum(), x)
        r = reference.roi_unpool_blend(*x64, boxes.cpu(), 1.0, True)[pick].square().sum()
        want = torch.autograd.grad(r, x64, allow_unused=True)
        for a, e in zip(got, want):
            _assert_close(a, torch.zeros_like(a) if e is None else e, torch.float64, f"output {pick}")
    # the backward op treats an absent grad_base_weight as zeros
    grad = torch.randn_like(ops[0].x)
    args = (ops[0].x.detach(), ops[1].detach(), ops[2].x.detach(), ops[3].detach(), boxes, 1.0, True)
    without = torch.ops.roi_ops._roi_unpool_blend_backward(grad, None, *args)
    with_zeros = torch.ops.roi_ops._roi_unpool_blend_backward(grad, torch.zeros_like(ops[1]), *args)
    for a, b in zip(without, with_zeros):
        assert torch.equal(a, b)


def test_double_backward_is_refused(device):
    gen = make_generator(0)
    base, bl, grids, gl = _operands(gen, ((B, C, H, W), (len(ROWS), PH, PW)), torch.float64,
                                    device, "contiguous")
    out, _ = roi_ops.roi_unpool_blend(base.x, bl, grids.x, gl, _fixed_boxes(torch.float64, device))
    g = torch.randn_like(out).requires_grad_()
    (gx,) = torch.autograd.grad(out, grids.x, g, create_graph=True)
    with pytest.raises(RuntimeError, match=r"(?i)double backward.*not supported"):
        torch.autograd.grad(gx.sum(), g)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_opcheck(device, dtype, layout):
    assert_native(device)
    gen = make_generator(2)
    base, bl, grids, gl = _operands(gen, ((2, 3, 6, 5), (4, 2, 3)), dtype, device, layout)
    boxes = _fixed_boxes(dtype, device, [(0, 0.5, 0.5, 4.0, 5.0), (1, 1.0, 0.0, 4.5, 3.5),
                                         (0, 2.0, 1.0, 3.0, 6.0), (1, -1.0, -1.0, 9.0, 9.0)])
    for aligned in (False, True):
        torch.library.opcheck(torch.ops.roi_ops.roi_unpool_blend.default,
                              (base.x, bl, grids.x, gl, boxes, 0.5, aligned))
    detached = (base.x.detach(), bl.detach(), grids.x.detach(), gl.detach(), boxes, 0.5, True)
    grad = torch.randn(base.x.shape, device=device, dtype=dtype)
    for gbw in (None, torch.randn(bl.shape, device=device, dtype=dtype)):
        torch.library.opcheck(torch.ops.roi_ops._roi_unpool_blend_backward.default,
                              (grad, gbw) + detached)


def _blend_then_use(base, bl, grids, gl, boxes):
    out, bw = roi_ops.roi_unpool_blend(base, bl, grids * 2.0, gl, boxes, 0.5, True)
    return out, bw


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, backend):
    torch._dynamo.reset()
    gen = make_generator(5)
    ops = _operands(gen, ((2, 3, 8, 7), (4, 3, 2)), torch.float32, device, "token_major")
    rows = [(0, 1.0, 2.0, 9.0, 12.0), (0, 4.0, 0.5, 14.0, 8.0), (1, 0.0, 0.0, 16.0, 16.0),
            (1, 3.5, 6.0, 7.5, 13.0)]
    boxes = make_boxes(rows, 2, "list", torch.float32, device)
    compiled = torch.compile(_blend_then_use, backend=backend, fullgraph=True)
    results = []
    for f in (_blend_then_use, compiled):
        leaves = [t.detach().clone().requires_grad_() for t in (ops[0].leaf, ops[1], ops[2].leaf, ops[3])]
        x = (ops[0].grad_to_x(leaves[0]), leaves[1], ops[2].grad_to_x(leaves[2]), leaves[3])
        out, bw = f(*x, boxes)
        (out.square().sum() + (bw * 3.0).sum()).backward()
        results.append([out.detach(), bw.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        if backend == "aot_eager":  # the same kernels run
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- fallback, empty


def test_fallback_matches_native(device, monkeypatch):
    import roi_ops.functional as blend_module

    gen = make_generator(8)
    base, bl, grids, gl = _operands(gen, ((B, C, H, W), (len(ROWS), PH, PW)), torch.float64,
                                    device, "channels_last")
    boxes = _fixed_boxes(torch.float64, device)
    native = roi_ops.roi_unpool_blend(base.x, bl, grids.x, gl, boxes, 1.0, True)
    monkeypatch.setattr(blend_module, "_use_blend_kernel", lambda device: False)
    fallback = roi_ops.roi_unpool_blend(base.x, bl, grids.x, gl, boxes, 1.0, True)
    for a, b in zip(native, fallback):
        _assert_close(a, b, torch.float64, "fallback")
    bad = boxes.clone()
    bad[0, 2] = float("nan")
    with pytest.raises(ValueError, match="rois"):  # box values checked on the fallback too
        roi_ops.roi_unpool_blend(base.x, bl, grids.x, gl, bad)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", ["no_rows_tensor", "no_rows_list", "no_channels", "no_batch"])
def test_empty_cases(device, dtype, layout, case):
    b, c = {"no_batch": 0, "no_channels": 2}.get(case, 2), 0 if case == "no_channels" else 3
    k = 2 if case == "no_channels" else 0
    gen = make_generator(1)
    base, bl, grids, gl = _operands(gen, ((b, c, 5, 6), (k, 2, 3)), dtype, device, layout)
    boxes = {
        "no_rows_tensor": torch.zeros(0, 5, device=device),
        "no_rows_list": [torch.zeros(0, 4, device=device) for _ in range(b)],
        "no_channels": torch.tensor([[0, 0.0, 0.0, 3.0, 3.0], [1, 1.0, 1.0, 4.0, 2.0]], device=device),
        "no_batch": [],
    }[case]
    out, bw = roi_ops.roi_unpool_blend(base.x, bl, grids.x, gl, boxes, 1.0, True)
    assert tuple(out.shape) == (b, c, 5, 6) and tuple(bw.shape) == (b, 5, 6)
    assert out.dtype == dtype and bw.dtype == dtype
    if k == 0:
        assert torch.equal(out, base.x.detach()) and torch.equal(bw, torch.ones_like(bw))
    else:  # C = 0: the weights still depend on the logits
        assert bool((bw[0, :3, :3] < 1).all()) and torch.equal(bw[:, 4], torch.ones_like(bw[:, 4]))
    (out.sum() + bw.sum()).backward()
    for t in (base.x, bl, grids.x, gl):
        assert t.grad is not None and t.grad.shape == t.shape
    assert torch.equal(grids.x.grad, torch.zeros_like(grids.x))


# ---------------------------------------------------------------- bad input


def _good():
    return dict(base=torch.randn(2, 3, 6, 5), base_logit=torch.randn(2, 6, 5), input=torch.randn(2, 3, 2, 2),
                input_logit=torch.randn(2, 2, 2),
                boxes=torch.tensor([[0, 0.5, 0.5, 3.0, 4.0], [1, 1.0, 0.0, 4.0, 5.5]]))


def _call(**changes):
    def run():
        kw = _good()
        kw.update(changes)
        extra = {k: kw.pop(k) for k in ("spatial_scale", "aligned") if k in kw}
        return roi_ops.roi_unpool_blend(kw["base"], kw["base_logit"], kw["input"], kw["input_logit"],
                                        kw["boxes"], **extra)
    return run


def _box(value, row=0, col=0):
    b = _good()["boxes"]
    b[row, col] = value
    return b


BAD = [
    ("base not a tensor", _call(base=[[1.0]]), TypeError, "base"),
    ("base int", _call(base=torch.ones(2, 3, 6, 5, dtype=torch.int32)), TypeError, "base"),
    ("base 3-D", _call(base=torch.randn(3, 6, 5)), ValueError, "base"),
    ("base_logit shape", _call(base_logit=torch.randn(2, 5, 6)), ValueError, "base_logit"),
    ("base_logit 4-D", _call(base_logit=torch.randn(2, 1, 6, 5)), ValueError, "base_logit"),
    ("base_logit dtype", _call(base_logit=torch.randn(2, 6, 5, dtype=torch.float64)), TypeError,
     "base_logit"),
    ("input channels", _call(input=torch.randn(2, 4, 2, 2)), ValueError, "input"),
    ("input count", _call(input=torch.randn(3, 3, 2, 2), input_logit=torch.randn(3, 2, 2)),
     ValueError, "input"),
    ("input empty grid", _call(input=torch.randn(2, 3, 0, 2), input_logit=torch.randn(2, 0, 2)),
     ValueError, "input"),
    ("input dtype", _call(input=torch.randn(2, 3, 2, 2).half()), TypeError, "input"),
    ("input_logit shape", _call(input_logit=torch.randn(2, 2, 3)), ValueError, "input_logit"),
    ("input_logit 4-D", _call(input_logit=torch.randn(2, 1, 2, 2)), ValueError, "input_logit"),
    ("input_logit dtype", _call(input_logit=torch.randn(2, 2, 2).bfloat16()), TypeError, "input_logit"),
    ("input on meta", _call(input=torch.randn(2, 3, 2, 2, device="meta")), RuntimeError, "input"),
    ("boxes [K, 4]", _call(boxes=torch.zeros(2, 4)), ValueError, "boxes"),
    ("boxes int", _call(boxes=torch.zeros(2, 5, dtype=torch.int64)), TypeError, "boxes"),
    ("boxes list length", _call(boxes=[torch.zeros(2, 4)]), ValueError, "boxes"),
    ("boxes NaN", _call(boxes=_box(float("nan"), 0, 2)), ValueError, "rois"),
    ("boxes inf", _call(boxes=_box(float("inf"), 1, 3)), ValueError, "rois"),
    ("batch index too big", _call(boxes=_box(2.0)), ValueError, "batch index"),
    ("batch index negative", _call(boxes=_box(-1.0)), ValueError, "batch index"),
    ("batch index fractional", _call(boxes=_box(0.5)), ValueError, "batch index"),
    ("spatial_scale zero", _call(spatial_scale=0.0), ValueError, "spatial_scale"),
    ("spatial_scale str", _call(spatial_scale="1"), TypeError, "spatial_scale"),
    ("aligned int", _call(aligned=1), TypeError, "aligned"),
]


@pytest.mark.parametrize("name, fn, exc, match", BAD, ids=[c[0] for c in BAD])
def test_bad_input_raises(device, name, fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def _raw(**changes):
    kw = _good()
    kw.update(changes)
    return (kw["base"], kw["base_logit"], kw["input"], kw["input_logit"], kw["boxes"], 1.0, False)


RAW_BAD = [
    ("NaN box", _raw(boxes=_box(float("nan"), 1, 4)), ValueError, "rois"),
    ("batch index", _raw(boxes=_box(5.0)), ValueError, "batch index"),
    ("boxes [K, 4]", _raw(boxes=torch.zeros(2, 4)), ValueError, "rois"),
    ("base_logit shape", _raw(base_logit=torch.randn(2, 5, 6)), ValueError, "base_logit"),
    ("input count", _raw(input=torch.randn(1, 3, 2, 2), input_logit=torch.randn(1, 2, 2)),
     ValueError, "input"),
    ("input_logit dtype", _raw(input_logit=torch.randn(2, 2, 2).double()), TypeError, "input_logit"),
    ("input_logit shape", _raw(input_logit=torch.randn(2, 2)), ValueError, "input_logit"),
    ("base int", _raw(base=torch.ones(2, 3, 6, 5, dtype=torch.int64)), TypeError, "base"),
]


@pytest.mark.parametrize("name, args, exc, match", RAW_BAD, ids=[c[0] for c in RAW_BAD])
def test_raw_ops_refuse_bad_input(device, name, args, exc, match):
    """The C++ ops check for themselves (they are callable directly)."""
    with pytest.raises(exc, match=match):
        torch.ops.roi_ops.roi_unpool_blend(*args)
    grad = torch.zeros(2, 3, 6, 5, dtype=args[0].dtype)
    with pytest.raises(exc, match=match):
        torch.ops.roi_ops._roi_unpool_blend_backward(grad, None, *args)


def test_backward_op_checks_its_gradients(device):
    args = _raw()
    with pytest.raises(ValueError, match="grad_out"):
        torch.ops.roi_ops._roi_unpool_blend_backward(torch.zeros(2, 3, 5, 5), None, *args)
    with pytest.raises(ValueError, match="grad_base_weight"):
        torch.ops.roi_ops._roi_unpool_blend_backward(torch.zeros(2, 3, 6, 5), torch.zeros(2, 6), *args)
    with pytest.raises(TypeError, match="grad_base_weight"):
        torch.ops.roi_ops._roi_unpool_blend_backward(
            torch.zeros(2, 3, 6, 5), torch.zeros(2, 6, 5, dtype=torch.float64), *args)


# ---------------------------------------------------------------- memory

_MEMORY_SCRIPT = r"""
import gc, sys
import torch, roi_ops
from roi_ops import reference

torch.set_num_threads(1)
method = sys.argv[1]
fn = roi_ops.roi_unpool_blend if method == "fused" else reference.roi_unpool_blend
B, C, H, W, K, P = 1, 64, 64, 64, 64, 8

def status(key):  # kB
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

def operands(k, c, h, w):
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g).requires_grad_()
    x1 = torch.rand(k, generator=g) * w / 8
    y1 = torch.rand(k, generator=g) * h / 8
    boxes = torch.stack([torch.zeros(k), x1, y1, w - x1, h - y1], 1)  # most of the map
    return t(B, c, h, w), t(B, h, w), t(k, c, P, P), t(k, P, P), boxes

def step(ops):
    out, bw = fn(*ops[:4], ops[4], 1.0, True)
    torch.autograd.grad((out, bw), ops[:4], (torch.ones_like(out), torch.ones_like(bw)))

step(operands(2, 4, 8, 8))  # warm-up: lazy initialisation, thread pools
ops = operands(K, C, H, W)
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
before = status("VmRSS")
step(ops)
print((status("VmHWM") - before) * 1024)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_no_per_roi_full_resolution_allocation(device):
    """Peak RSS growth of one forward + backward in a fresh process, K = 64 boxes
    over a 64x64x64 map: the fused op stays far below one K*C*H*W float32
    buffer (64 MiB); the unfused reference, run the same way, exceeds it
    (which shows that the measurement sees such buffers)."""
    if device != "cpu":
        pytest.skip("host memory measurement")
    per_roi_maps = 64 * 64 * 64 * 64 * 4
    growth = {}
    for method in ("fused", "unfused"):
        proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, method], capture_output=True,
                              text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr
        growth[method] = int(proc.stdout.strip().splitlines()[-1])
    assert growth["unfused"] > per_roi_maps, growth
    assert growth["fused"] < per_roi_maps / 8, growth
