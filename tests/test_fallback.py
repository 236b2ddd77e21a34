"""The pure-PyTorch fallback that roi_align, roi_unpool and roi_unpool_blend
dispatch to on a device without native kernels, forced here the way such a
device looks to roi_ops (``_ops.native_available`` says no, or the build has
no blend kernel for the device), against the native kernels: random and
adversarial boxes, every flag (aligned, sampling_ratio, spatial_scale, output
sizes), dtype, layout and box format, forward and backward; the one-time
warning; and the box checks the fallback keeps.

Both sides are held to the float64 oracle's per-element bound (helpers.py),
so they may differ by twice the tolerance of one: any wrong flag, size or
offset on the fallback path is orders of magnitude beyond that.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import roi_ops
import roi_ops.functional as blend_module
from helpers import (
    DEVICES, FLOAT_DTYPES, LAYOUTS, Case, assert_native, assert_within, boxes_dtype_of, cases, coord_dtype_for,
    dtype_id, lay_out, make_boxes, make_generator, randn, rois_of, vjp,
)
from roi_ops import _ops, functional, reference
from test_blend import TOL as BLEND_TOL

pytestmark = pytest.mark.parametrize("device", DEVICES)


@contextlib.contextmanager
def forced_fallback(blend_kernel_only: bool = False, quiet: bool = True):
    """Within the block, roi_ops sees no native kernel for any device (or, with
    ``blend_kernel_only``, native roi_align/roi_unpool but no blend kernel),
    with the one-time warnings reset so that they fire again."""
    with pytest.MonkeyPatch.context() as mp:
        if blend_kernel_only:
            mp.setattr(blend_module, "_BLEND_DEVICE_TYPES", frozenset())
        else:
            mp.setattr(_ops, "native_available", lambda device_type="cpu": False)
        mp.setattr(functional, "_warned_fallback", set())
        mp.setattr(blend_module, "_warned_no_blend_kernel", set())
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore", RuntimeWarning)
            yield


def _layout(t):
    """What "contiguous in the input's memory format" means for t (nothing to say when empty)."""
    if t.numel() == 0:
        return None
    return t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)


def _compare(run, oracle, lo, boxes, gen, what):
    """run(x) natively and on the forced fallback, forward and backward: equal
    within twice the oracle's bound, same dtype, shape and memory format."""
    native = run(lo.x)
    g = randn(native.shape, gen).to(device=lo.x.device, dtype=lo.x.dtype)
    native_gx = lo.grad_to_x(torch.autograd.grad(native, lo.leaf, g)[0])
    with forced_fallback():
        fallback = run(lo.x)
        fallback_gx = lo.grad_to_x(torch.autograd.grad(fallback, lo.leaf, g)[0])
    assert fallback.dtype == native.dtype and fallback.shape == native.shape, what
    assert _layout(fallback) == _layout(native), f"{what}: memory format {fallback.stride()} vs {native.stride()}"
    assert fallback_gx.shape == native_gx.shape and fallback_gx.dtype == native_gx.dtype, what
    dtype = lo.x.dtype
    rois = rois_of(boxes).to(lo.x.device)
    cd = coord_dtype_for(dtype, boxes_dtype_of(boxes))
    x64 = lo.x.detach().to(torch.float64).requires_grad_()
    ref = oracle(x64, rois, cd)
    gx_bound = vjp(ref, x64, g.to(torch.float64).abs())
    with torch.no_grad():
        bound = oracle(x64.abs(), rois, cd)
    assert_within(fallback, native, 2 * bound, dtype, f"{what} forward, fallback vs native")
    assert_within(fallback_gx, native_gx, 2 * gx_bound, dtype, f"{what} backward, fallback vs native")


def check_align(case, device, dtype, layout, aligned):
    gen = make_generator(case.seed)
    lo = lay_out(randn((case.batch, case.channels, case.height, case.width), gen), dtype, device, layout)
    boxes = make_boxes(case.rows, case.batch, case.boxes_form, case.boxes_dtype or dtype, device)
    ph, pw = case.pooled
    _compare(
        lambda x: roi_ops.roi_align(x, boxes, case.output_size, case.spatial_scale, case.sampling_ratio, aligned),
        lambda x64, rois, cd: reference.roi_align(x64, rois, (ph, pw), case.spatial_scale, case.sampling_ratio,
                                                  aligned, coord_dtype=cd),
        lo, boxes, gen, f"roi_align {case} aligned={aligned} {layout}")


def check_unpool(case, device, dtype, layout, aligned):
    gen = make_generator(case.seed)
    k = len(case.rows)
    ph, pw = case.pooled
    lo = lay_out(randn((k, case.channels, ph, pw), gen), dtype, device, layout)
    boxes = make_boxes(case.rows, case.batch, case.boxes_form, case.boxes_dtype or dtype, device)
    size = (case.height, case.width)
    _compare(
        lambda x: roi_ops.roi_unpool(x, boxes, size, case.spatial_scale, aligned),
        lambda x64, rois, cd: reference.roi_unpool(x64, rois, size, case.spatial_scale, aligned, coord_dtype=cd),
        lo, boxes, gen, f"roi_unpool {case} aligned={aligned} {layout}")


# ------------------------------------------------ fixed adversarial cases, every flag

# Overlapping boxes, sub-pixel and degenerate ones, edges on whole and half
# pixels, an inverted box, one past every edge, one off the map, a huge one
# (float16 boxes must hold it at spatial_scale 0.5);
# image 2 has no box. Every flag changes some of these numbers.
ROWS = [
    (0, 1.0, 1.0, 7.0, 6.0), (1, 0.0, 2.0, 10.0, 9.0), (0, 3.0, 0.0, 11.0, 5.0), (1, 2.5, 3.5, 4.2, 5.1),
    (0, 5.2, 2.1, 5.4, 2.3), (1, 4.0, 4.0, 4.0, 4.0), (0, 6.0, 7.0, 2.0, 3.0), (1, -3.0, -3.0, 40.0, 40.0),
    (0, 20.0, 20.0, 30.0, 30.0), (1, -3.0e4, 3.3, 3.0e4, 7.7), (0, 0.5, 0.5, 1.5, 8.5), (1, 9.0, 1.0, 11.0, 2.0),
]
B, C, H, W = 3, 2, 9, 11


def _fixed_case(spatial_scale, sampling_ratio, pooled, form, boxes_dtype):
    rows = [(b, *(v / spatial_scale for v in r)) for b, *r in ROWS]  # the same feature-map boxes at every scale
    return Case(B, C, H, W, pooled, pooled, spatial_scale, sampling_ratio, rows, form, boxes_dtype, 17)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 2])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_roi_align_every_flag(device, spatial_scale, sampling_ratio, aligned, layout):
    assert_native(device)
    for form in ("tensor", "list"):
        check_align(_fixed_case(spatial_scale, sampling_ratio, (3, 4), form, None), device, torch.float64,
                    layout, aligned)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_roi_unpool_every_flag(device, spatial_scale, aligned, layout):
    assert_native(device)
    for form in ("tensor", "list"):
        check_unpool(_fixed_case(spatial_scale, -1, (3, 4), form, None), device, torch.float64, layout, aligned)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
def test_every_dtype(device, dtype):
    for boxes_dtype in (None, torch.float64):
        case = _fixed_case(0.5, 2, (4, 3), "tensor", boxes_dtype)
        check_align(case, device, dtype, "token_major", True)
        check_unpool(case, device, dtype, "strided", False)


# ------------------------------------------------ ambiguous memory formats


# Sizes of 1 make a layout ambiguous (a [K, C, 1, 1] token-major view is both
# contiguous and channels_last): the fallback must pick the memory format the
# native kernels pick (the strides' suggestion), or results come back laid out
# differently on a device without kernels. Found by CI's randomised run.
AMBIGUOUS = [((1, 2, 1, 2), (1, 1)), ((2, 1, 3, 1), (1, 2)), ((1, 3, 1, 1), (2, 1)), ((2, 2, 2, 1), (1, 1))]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("map_shape, pooled", AMBIGUOUS, ids=str)
def test_ambiguous_layouts_keep_the_native_memory_format(device, map_shape, pooled, layout):
    b, c, h, w = map_shape
    rows = [(i % b, 0.0, 0.0, w - 0.5, h - 0.5) for i in range(2)] + [(0, 0.0, 0.0, 0.0, 0.0)]
    case = Case(b, c, h, w, pooled, pooled, 1.0, -1, rows, "tensor", None, 5)
    for aligned in (False, True):
        check_align(case, device, torch.float64, layout, aligned)
        check_unpool(case, device, torch.float64, layout, aligned)
        check_blend(case, device, torch.float64, layout, aligned, True)


# ------------------------------------------------ random and adversarial cases


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=dtype_id)
@given(case=cases(adversarial=True), layout=st.sampled_from(LAYOUTS), aligned=st.booleans())
def test_roi_align_matches_native(device, dtype, case, layout, aligned):
    check_align(case, device, dtype, layout, aligned)


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=dtype_id)
@given(case=cases(adversarial=True), layout=st.sampled_from(LAYOUTS), aligned=st.booleans())
def test_roi_unpool_matches_native(device, dtype, case, layout, aligned):
    check_unpool(case, device, dtype, layout, aligned)


# ------------------------------------------------ the fused blend


def check_blend(case, device, dtype, layout, aligned, use_base_weight, blend_kernel_only=False):
    """roi_unpool_blend natively and forced onto the fallback: out, base_weight
    and the gradients of all four tensors."""
    gen = make_generator(case.seed)
    k, (ph, pw) = len(case.rows), case.pooled
    base = lay_out(randn((case.batch, case.channels, case.height, case.width), gen), dtype, device, layout)
    grids = lay_out(randn((k, case.channels, ph, pw), gen), dtype, device, layout)
    bl = (randn((case.batch, case.height, case.width), gen) * 3).to(device, dtype).requires_grad_()
    gl = (randn((k, ph, pw), gen) * 3).to(device, dtype).requires_grad_()
    boxes = make_boxes(case.rows, case.batch, case.boxes_form, case.boxes_dtype or dtype, device)
    g = randn(base.x.shape, gen).to(device, dtype)
    gw = randn(bl.shape, gen).to(device, dtype)
    leaves = (base.leaf, bl, grids.leaf, gl)

    def run():
        out, bw = roi_ops.roi_unpool_blend(base.x, bl, grids.x, gl, boxes, case.spatial_scale, aligned)
        outputs, cot = ((out, bw), (g, gw)) if use_base_weight else ((out,), (g,))
        grads = torch.autograd.grad(outputs, leaves, cot)
        return out, bw, base.grad_to_x(grads[0]), grads[1], grids.grad_to_x(grads[2]), grads[3]

    native = run()
    with forced_fallback(blend_kernel_only):
        fallback = run()
    names = ("out", "base_weight", "grad base", "grad base_logit", "grad input", "grad input_logit")
    tol = 2 * BLEND_TOL[dtype]  # each side within BLEND_TOL of the float64 oracle (test_blend.py)
    for name, n, f in zip(names, native, fallback):
        what = f"roi_unpool_blend {name} {case} aligned={aligned} {layout}: fallback vs native"
        assert f.dtype == n.dtype and f.shape == n.shape, what
        if name == "out":  # the op's output contract; gradients' strides are autograd's choice
            assert _layout(f) == _layout(n), f"{what}: memory format {f.stride()} vs {n.stride()}"
        a, e = f.detach().cpu().double(), n.detach().cpu().double()
        scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
        torch.testing.assert_close(a, e, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("blend_kernel_only", [False, True], ids=["no_native", "no_blend_kernel"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "token_major"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_roi_unpool_blend_every_flag(device, spatial_scale, aligned, layout, blend_kernel_only):
    assert_native(device)
    for form, use_bw in (("tensor", True), ("list", False)):
        check_blend(_fixed_case(spatial_scale, -1, (3, 4), form, None), device, torch.float64, layout, aligned,
                    use_bw, blend_kernel_only)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@given(case=cases(adversarial=True), layout=st.sampled_from(LAYOUTS[:3]), aligned=st.booleans(),
       use_base_weight=st.booleans())
def test_roi_unpool_blend_matches_native(device, dtype, case, layout, aligned, use_base_weight):
    check_blend(case, device, dtype, layout, aligned, use_base_weight)


# ------------------------------------------------ warnings, checks, dispatch


def _ops_run(device):
    x = torch.randn(2, 3, 8, 8, device=device)
    boxes = torch.tensor([[0, 1.0, 1.0, 6.0, 5.0], [1, 0.0, 2.0, 7.0, 7.0]], device=device)
    crops = roi_ops.roi_align(x, boxes, (2, 3), aligned=True)
    pasted = roi_ops.roi_unpool(crops, boxes, (8, 8), aligned=True)
    roi_ops.roi_unpool_blend(x, x[:, 0], crops, crops[:, 0], boxes, 1.0, True)
    return pasted


def test_fallback_warns_once_per_device_type_and_runs_no_native_op(device):
    with forced_fallback(quiet=False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                _ops_run(device)
                _ops_run(device)
        ours = [w for w in caught if "roi_ops" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in caught]
        assert ours[0].category is RuntimeWarning
        message = str(ours[0].message)
        assert f"'{torch.device(device).type}'" in message and "pure-PyTorch" in message, message
        # the warning points at the caller, not at roi_ops' internals
        assert ours[0].filename == __file__, ours[0].filename
    native_ops = sorted({e.name for e in prof.events() if e.name.startswith("roi_ops::")})
    assert not native_ops, f"the forced fallback still ran native ops: {native_ops}"
    # and without forcing, the native ops run and nothing warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _ops_run(device)
    names = {e.name for e in prof.events()}
    assert {"roi_ops::roi_align", "roi_ops::roi_unpool", "roi_ops::roi_unpool_blend"} <= names, sorted(names)


def test_missing_blend_kernel_warns_once_and_keeps_the_other_kernels(device):
    with forced_fallback(blend_kernel_only=True, quiet=False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                _ops_run(device)
                _ops_run(device)
    ours = [str(w.message) for w in caught if "roi_ops" in str(w.message)]
    assert len(ours) == 1 and "roi_unpool_blend" in ours[0], ours
    names = {e.name for e in prof.events()}
    assert {"roi_ops::roi_align", "roi_ops::roi_unpool"} <= names, sorted(names)
    assert "roi_ops::roi_unpool_blend" not in names


@pytest.mark.parametrize("bad, match", [((0, 2, float("nan")), "finite"), ((0, 0, 5.0), "batch index")])
def test_fallback_still_checks_box_values(device, bad, match):
    x = torch.randn(2, 3, 8, 8, device=device)
    boxes = torch.tensor([[0, 1.0, 1.0, 6.0, 5.0], [1, 0.0, 2.0, 7.0, 7.0]], device=device)
    boxes[bad[:2]] = bad[2]
    grids = torch.randn(2, 3, 2, 2, device=device)
    with forced_fallback():
        with pytest.raises(ValueError, match=match):
            roi_ops.roi_align(x, boxes, 2)
        with pytest.raises(ValueError, match=match):
            roi_ops.roi_unpool_blend(x, x[:, 0], grids, grids[:, 0], boxes)
        if match == "finite":  # roi_unpool does not use the batch index
            with pytest.raises(ValueError, match=match):
                roi_ops.roi_unpool(grids, boxes, 8)
