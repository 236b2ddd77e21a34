"""The CUDA backend's code, run on the host: tests that need no GPU.

tools/cuda_emulate.cpp compiles the CUDA backend's host functions and
per-element kernel bodies with the host compiler and registers them as
``torch.ops.roi_ops_emu.*`` (CPU tensors); only the grid launch is replaced by
a loop. These tests hold that code to the float64 oracle, to the CPU kernels,
to the adjoint identity and to the shared error contract, on random and
adversarial boxes, every dtype and layout. Run by ``make cuda-check`` (not by
the default ``pytest``, whose testpaths is ``tests/``); tests/test_cuda.py is
the same kind of check on a real GPU.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

import roi_ops  # noqa: E402
from roi_ops import reference  # noqa: E402

import helpers as H  # noqa: E402  (tests/helpers.py: oracle comparison, strategies)

SETTINGS = settings(
    max_examples=int(os.environ.get("CUDA_EMULATE_EXAMPLES", "40")),
    deadline=None, derandomize=True, print_blob=True,
)
LAYOUTS = ("contiguous", "channels_last", "strided", "token_major")


@pytest.fixture(scope="session")
def emu():
    from torch.utils.cpp_extension import load

    build = os.path.join(ROOT, ".cuda-check-build", "emulate")
    os.makedirs(build, exist_ok=True)
    load(
        name="roi_ops_cuda_emulate",
        sources=[os.path.join(ROOT, "tools", "cuda_emulate.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        # no contraction into FMAs: IEEE expression order, as nvcc --fmad=false
        extra_cflags=["-std=c++20", "-O2", "-ffp-contract=off"],
        build_directory=build,
        is_python_module=False,
    )
    return torch.ops.roi_ops_emu


@pytest.fixture(scope="session", autouse=True)
def _native_cpu():
    # the emulated backend is compared with the CPU kernels, not the fallback
    assert roi_ops.native_available("cpu"), roi_ops.native_import_error()


def _rois(case, dtype):
    boxes_dtype = case.boxes_dtype or dtype
    rois = torch.tensor([list(r) for r in case.rows], dtype=torch.float64).reshape(-1, 5)
    return rois.to(boxes_dtype)


def _oracle_align(x64, rois, case, aligned, cd):
    return reference.roi_align(x64, rois.to(torch.float64), output_size=case.pooled,
                               spatial_scale=case.spatial_scale,
                               sampling_ratio=case.sampling_ratio, aligned=aligned,
                               coord_dtype=cd)


def _oracle_unpool(x64, rois, case, aligned, cd):
    return reference.roi_unpool(x64, rois.to(torch.float64),
                                output_size=(case.height, case.width),
                                spatial_scale=case.spatial_scale, aligned=aligned,
                                coord_dtype=cd)


def _check_align(emu, case, dtype, layout, aligned):
    gen = H.make_generator(case.seed)
    rois = _rois(case, dtype)
    values = H.randn((case.batch, case.channels, case.height, case.width), gen)
    x = H.lay_out(values, dtype, "cpu", layout).x.detach()
    ph, pw = case.pooled
    args = (case.spatial_scale, ph, pw, case.sampling_ratio, aligned)
    out = emu.roi_align(x, rois, *args)
    g = H.randn(out.shape, gen).to(dtype)
    gx = emu._roi_align_backward(g, rois, case.spatial_scale, ph, pw, case.batch,
                                 case.channels, case.height, case.width,
                                 case.sampling_ratio, aligned)
    cd = H.coord_dtype_for(dtype, rois.dtype)
    x64 = x.to(torch.float64).requires_grad_()
    ref = _oracle_align(x64, rois, case, aligned, cd)
    ref_gx = H.vjp(ref, x64, g.to(torch.float64))
    gx_bound = H.vjp(ref, x64, g.to(torch.float64).abs())
    with torch.no_grad():
        bound = _oracle_align(x64.abs(), rois, case, aligned, cd)
    H.assert_within(out, ref, bound, dtype, "emulated roi_align forward")
    H.assert_within(gx, ref_gx, gx_bound, dtype, "emulated roi_align backward")
    # the CPU kernels compute the same function (different summation order)
    cpu = torch.ops.roi_ops.roi_align(x, rois, *args)
    H.assert_within(out, cpu, 2 * bound, dtype, "emulated vs CPU roi_align forward")
    # outputs are contiguous in the input's memory format, like the CPU's
    assert out.stride() == cpu.stride()
    return out, gx


def _check_unpool(emu, case, dtype, layout, aligned):
    gen = H.make_generator(case.seed)
    rois = _rois(case, dtype)
    ph, pw = case.pooled
    values = H.randn((rois.shape[0], case.channels, ph, pw), gen)
    x = H.lay_out(values, dtype, "cpu", layout).x.detach()
    args = (case.spatial_scale, case.height, case.width, aligned)
    out = emu.roi_unpool(x, rois, *args)
    g = H.randn(out.shape, gen).to(dtype)
    gx = emu._roi_unpool_backward(g, rois, case.spatial_scale, ph, pw, aligned)
    cd = H.coord_dtype_for(dtype, rois.dtype)
    x64 = x.to(torch.float64).requires_grad_()
    ref = _oracle_unpool(x64, rois, case, aligned, cd)
    ref_gx = H.vjp(ref, x64, g.to(torch.float64))
    gx_bound = H.vjp(ref, x64, g.to(torch.float64).abs())
    with torch.no_grad():
        bound = _oracle_unpool(x64.abs(), rois, case, aligned, cd)
    H.assert_within(out, ref, bound, dtype, "emulated roi_unpool forward")
    H.assert_within(gx, ref_gx, gx_bound, dtype, "emulated roi_unpool backward")
    cpu = torch.ops.roi_ops.roi_unpool(x, rois, *args)
    H.assert_within(out, cpu, 2 * bound, dtype, "emulated vs CPU roi_unpool forward")
    assert out.stride() == cpu.stride()
    return out, gx


@pytest.mark.parametrize("dtype", H.FLOAT_DTYPES, ids=H.dtype_id)
@given(case=H.cases(adversarial=True, max_size=9, max_pooled=5),
       layout=st.sampled_from(LAYOUTS), aligned=st.booleans())
@SETTINGS
def test_roi_align_matches_oracle(emu, dtype, case, layout, aligned):
    _check_align(emu, case, dtype, layout, aligned)


@pytest.mark.parametrize("dtype", H.FLOAT_DTYPES, ids=H.dtype_id)
@given(case=H.cases(adversarial=True, max_size=9, max_pooled=5),
       layout=st.sampled_from(LAYOUTS), aligned=st.booleans())
@SETTINGS
def test_roi_unpool_matches_oracle(emu, dtype, case, layout, aligned):
    _check_unpool(emu, case, dtype, layout, aligned)


@given(case=H.cases(adversarial=True, max_size=9, max_pooled=5), aligned=st.booleans())
@SETTINGS
def test_adjoint_identity(emu, case, aligned):
    """<A x, g> == <x, A^T g> for both ops: the gather backward is the forward's
    exact transpose (a gather that missed or double-counted a term fails)."""
    gen = H.make_generator(case.seed)
    rois = _rois(case, torch.float64)
    ph, pw = case.pooled
    x = H.randn((case.batch, case.channels, case.height, case.width), gen)
    out = emu.roi_align(x, rois, case.spatial_scale, ph, pw, case.sampling_ratio, aligned)
    g = H.randn(out.shape, gen)
    gx = emu._roi_align_backward(g, rois, case.spatial_scale, ph, pw, case.batch,
                                 case.channels, case.height, case.width,
                                 case.sampling_ratio, aligned)
    lhs, rhs = (out * g).sum(), (x * gx).sum()
    scale = (out.abs() * g.abs()).sum() + 1e-300
    assert abs(lhs - rhs) <= 1e-12 * scale, f"roi_align: {lhs.item()} vs {rhs.item()}"

    y = H.randn((rois.shape[0], case.channels, ph, pw), gen)
    up = emu.roi_unpool(y, rois, case.spatial_scale, case.height, case.width, aligned)
    gu = H.randn(up.shape, gen)
    gy = emu._roi_unpool_backward(gu, rois, case.spatial_scale, ph, pw, aligned)
    lhs, rhs = (up * gu).sum(), (y * gy).sum()
    scale = (up.abs() * gu.abs()).sum() + 1e-300
    assert abs(lhs - rhs) <= 1e-12 * scale, f"roi_unpool: {lhs.item()} vs {rhs.item()}"


@pytest.mark.parametrize("layout", ("contiguous", "channels_last"))
def test_every_element_written_and_thread_independent(emu, layout, restore_threads):
    """The outputs are torch.empty: an element no 'thread' wrote would show
    as garbage that differs between runs. Same bits with 1 and 2 threads."""
    gen = H.make_generator(7)
    rows = [(1, 3.3, 2.1, 40.2, 30.7), (0, -8.0, 5.0, 20.0, 60.0), (1, 0.0, 0.0, 63.9, 63.9),
            (0, 10.0, 10.0, 10.5, 11.0), (1, 30.0, 31.0, 29.0, 12.0)]
    rois = torch.tensor(rows, dtype=torch.float32)
    x = H.lay_out(H.randn((2, 5, 16, 16), gen), torch.float32, "cpu", layout).x.detach()
    runs = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        out = emu.roi_align(x, rois, 0.25, 7, 6, 2, True)
        g = torch.ones_like(out)
        gx = emu._roi_align_backward(g, rois, 0.25, 7, 6, 2, 5, 16, 16, 2, True)
        up = emu.roi_unpool(out, rois, 0.25, 16, 16, True)
        gy = emu._roi_unpool_backward(torch.ones_like(up), rois, 0.25, 7, 6, True)
        runs.append((out, gx, up, gy))
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)


@pytest.fixture
def restore_threads():
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_many_rois_per_image(emu):
    """Per-image ROI lists: interleaved batch indices, empty images, and
    more ROIs than a warp; each image's gradient sums only its own ROIs."""
    gen = H.make_generator(3)
    B, C, Hh, W = 4, 2, 12, 10
    k = 70
    batch = torch.tensor([(3 * i) % B if i % 5 else 3 for i in range(k)], dtype=torch.float64)
    batch[batch == 1] = 2  # image 1 gets no ROI
    xy = torch.rand((k, 4), generator=gen, dtype=torch.float64) * 14 - 2
    rois = torch.cat([batch[:, None], xy], 1)
    x = H.randn((B, C, Hh, W), gen)
    out = emu.roi_align(x, rois, 1.0, 3, 4, 2, True)
    g = H.randn(out.shape, gen)
    gx = emu._roi_align_backward(g, rois, 1.0, 3, 4, B, C, Hh, W, 2, True)
    x64 = x.clone().requires_grad_()
    ref = reference.roi_align(x64, rois, (3, 4), 1.0, 2, True)
    (ref_gx,) = torch.autograd.grad(ref, x64, g)
    torch.testing.assert_close(out, ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=1e-12)
    assert bool((gx[1] == 0).all())


def test_empty_cases(emu):
    x = torch.randn(2, 3, 5, 6)
    none = torch.zeros(0, 5)
    assert emu.roi_align(x, none, 1.0, 2, 3, -1, False).shape == (0, 3, 2, 3)
    assert emu._roi_align_backward(torch.zeros(0, 3, 2, 3), none, 1.0, 2, 3, 2, 3, 5, 6,
                                   -1, False).abs().sum() == 0
    one = torch.tensor([[1.0, 0, 0, 3, 3]])
    assert emu.roi_align(x[:, :0], one, 1.0, 2, 3, -1, False).shape == (1, 0, 2, 3)
    gx = emu._roi_align_backward(torch.zeros(1, 3, 2, 3), one, 1.0, 2, 3, 2, 3, 5, 6, -1, False)
    assert gx.shape == (2, 3, 5, 6)
    assert emu.roi_unpool(torch.zeros(0, 3, 2, 2), none, 1.0, 4, 4, True).shape == (0, 3, 4, 4)
    assert emu.roi_unpool(torch.zeros(1, 0, 2, 2), one, 1.0, 4, 4, True).shape == (1, 0, 4, 4)
    assert emu._roi_unpool_backward(torch.zeros(1, 3, 4, 4), one, 1.0, 2, 2, True).shape == (1, 3, 2, 2)


@pytest.mark.parametrize(
    "rois, match",
    [
        ([[2.0, 0, 0, 1, 1]], "batch index"),
        ([[-1.0, 0, 0, 1, 1]], "batch index"),
        ([[0.5, 0, 0, 1, 1]], "batch index"),
        ([[0.0, float("nan"), 0, 1, 1]], "finite"),
        ([[0.0, 0, 0, float("inf"), 1]], "finite"),
    ],
)
def test_bad_boxes_raise(emu, rois, match):
    x = torch.randn(2, 1, 4, 4)
    r = torch.tensor(rois)
    with pytest.raises(ValueError, match=match):
        emu.roi_align(x, r, 1.0, 2, 2, -1, False)
    with pytest.raises(ValueError, match=match):
        emu._roi_align_backward(torch.zeros(1, 1, 2, 2), r, 1.0, 2, 2, 2, 1, 4, 4, -1, False)
    if match == "finite":
        with pytest.raises(ValueError, match=match):
            emu.roi_unpool(torch.zeros(1, 1, 2, 2), r, 1.0, 4, 4, False)


def test_bad_shapes_raise(emu):
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="rois must be Tensor"):
        emu.roi_align(x, torch.zeros(3, 4), 1.0, 2, 2, -1, False)
    with pytest.raises(ValueError, match="pooled_height must be positive"):
        emu.roi_align(x, torch.zeros(1, 5), 1.0, 0, 2, -1, False)
    with pytest.raises(ValueError, match="grad must be Tensor"):
        emu._roi_align_backward(torch.zeros(1, 1, 3, 2), torch.zeros(1, 5), 1.0, 2, 2, 2, 1,
                                4, 4, -1, False)
    with pytest.raises(ValueError, match="one grid per ROI"):
        emu.roi_unpool(torch.zeros(2, 1, 2, 2), torch.zeros(1, 5), 1.0, 4, 4, False)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        emu.roi_align(x.to(torch.int32), torch.zeros(1, 5), 1.0, 2, 2, -1, False)


def test_huge_boxes_finish(emu):
    """Boxes far larger than the map (adaptive sampling grids of ~10^6 per
    bin) must not make any element loop over off-map samples."""
    x = torch.randn(1, 2, 8, 8)
    rois = torch.tensor([[0, -1e6, -1e6, 1e6, 1e6], [0, 3.0, -1e7, 4.0, 1e7]])
    out = emu.roi_align(x, rois, 1.0, 3, 3, -1, False)
    gx = emu._roi_align_backward(torch.ones_like(out), rois, 1.0, 3, 3, 1, 2, 8, 8, -1, False)
    ref = reference.roi_align(x.double(), rois.double(), (3, 3), 1.0, -1, False,
                              coord_dtype=torch.float32)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(gx).all()


@pytest.mark.parametrize("pooled", [(40, 17), (16, 16), (3, 33)])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 3])
def test_bins_much_smaller_than_a_pixel(emu, pooled, sampling_ratio):
    """Fine grids on small boxes: a pixel is read by dozens of bins, more than
    the backward caches per ROI (its recompute path) and exactly as many."""
    gen = H.make_generator(sum(pooled) + sampling_ratio)
    B, C, Hh, W = 2, 2, 7, 6
    rows = [[0, 0.3, 0.2, 1.9, 2.7], [1, 2.5, 3.1, 5.0, 4.2], [0, -0.8, 4.6, 0.7, 7.5],
            [1, 4.0, 1.0, 6.5, 1.5], [0, 1.0, 1.0, 1.2, 5.5]]
    rois = torch.tensor(rows, dtype=torch.float64)
    x = H.randn((B, C, Hh, W), gen)
    for aligned in (False, True):
        args = (0.9, pooled[0], pooled[1], sampling_ratio, aligned)
        out = emu.roi_align(x, rois, *args)
        g = H.randn(out.shape, gen)
        gx = emu._roi_align_backward(g, rois, 0.9, pooled[0], pooled[1], B, C, Hh, W,
                                     sampling_ratio, aligned)
        x64 = x.clone().requires_grad_()
        ref = reference.roi_align(x64, rois, pooled, 0.9, sampling_ratio, aligned)
        (ref_gx,) = torch.autograd.grad(ref, x64, g)
        torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx, ref_gx, rtol=1e-12, atol=1e-12)
