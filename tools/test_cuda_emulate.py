"""The CUDA backend's code, run on the host: tests that need no GPU.

tools/cuda_emulate.cpp compiles the CUDA backend's host functions and
per-element kernel bodies with the host compiler and registers them as
``torch.ops.roi_ops_emu.*`` (CPU tensors); only the grid launch is replaced by
a loop. These tests check that every op registered for CUDA is emulated, and
hold that code (roi_align, roi_unpool and the fused roi_unpool_blend, forward
and backward) to the float64 oracles, to the CPU kernels, to the adjoint
identity and to the shared error contract, on random and adversarial boxes,
every dtype and layout. Run by ``make cuda-check`` (not by
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


# ------------------------------------------------------------ every CUDA op

def _registrations(path, namespace, key):
    """{op name: host function} of the TORCH_LIBRARY_IMPL(namespace, key, m) blocks of one file."""
    import re

    text = open(path).read()
    found = {}
    for block in re.finditer(r"TORCH_LIBRARY_IMPL\(\s*%s\s*,\s*%s\s*,\s*\w+\s*\)\s*\{(.*?)\n\}" % (namespace, key),
                             text, re.S):
        for name, fn in re.findall(r'\.impl\(\s*"(\w+)"\s*,\s*TORCH_FN\(\s*([\w:]+)\s*<', block.group(1)):
            found[name] = fn
    return found


def test_every_cuda_op_is_emulated(emu):
    """Every op csrc/cuda registers for CUDA has an emulated twin driven by the
    same host function, with the real op's schema; an op added to the CUDA
    backend without emulation fails here."""
    cuda_dir = os.path.join(ROOT, "csrc", "cuda")
    on_cuda = {}
    for name in sorted(os.listdir(cuda_dir)):
        if name.endswith((".cpp", ".cu", ".h", ".cuh")):
            on_cuda.update(_registrations(os.path.join(cuda_dir, name), "roi_ops", "CUDA"))
    # the parser must see the registrations it is meant to check
    assert {"roi_align", "roi_unpool", "roi_unpool_blend"} <= set(on_cuda), on_cuda
    emulated = _registrations(os.path.join(ROOT, "tools", "cuda_emulate.cpp"), "roi_ops_emu", "CPU")
    missing = sorted(set(on_cuda) - set(emulated))
    assert not missing, f"registered for CUDA but not emulated in tools/cuda_emulate.cpp: {missing}"
    for name, fn in on_cuda.items():
        assert emulated[name] == fn, f"{name}: CUDA runs {fn}, the emulation {emulated[name]}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"roi_ops_emu::{name}", "CPU"), name
        real = str(getattr(torch.ops.roi_ops, name).default._schema)
        mine = str(getattr(emu, name).default._schema)
        assert mine.replace("roi_ops_emu::", "roi_ops::") == real, (mine, real)


# --------------------------------------------------- fused paste-back + blend

import test_blend as TB  # noqa: E402  (tests/test_blend.py: the explicit blend oracle, tolerances)


def _blend_operands(case, dtype, layout, logit_scale, gen):
    rois = _rois(case, dtype)
    K, (ph, pw) = rois.shape[0], case.pooled
    shape = (case.batch, case.channels, case.height, case.width)
    base = H.lay_out(H.randn(shape, gen), dtype, "cpu", layout).x.detach()
    bl = (H.randn((case.batch, case.height, case.width), gen) * logit_scale).to(dtype)
    inp = H.lay_out(H.randn((K, case.channels, ph, pw), gen), dtype, "cpu", layout).x.detach()
    il = (H.randn((K, ph, pw), gen) * logit_scale).to(dtype)
    return base, bl, inp, il, rois


def _check_blend(emu, case, dtype, layout, aligned, logit_scale, with_gbw):
    """Forward and backward of the emulated blend against the float64 oracles
    (roi_ops.reference and the explicit composition of tests/test_blend.py) and
    the CPU kernel; uncovered pixels are exactly base / 1 / grad / 0."""
    gen = H.make_generator(case.seed)
    base, bl, inp, il, rois = _blend_operands(case, dtype, layout, logit_scale, gen)
    s = case.spatial_scale
    out, bw = emu.roi_unpool_blend(base, bl, inp, il, rois, s, aligned)
    g = H.lay_out(H.randn(base.shape, gen), dtype, "cpu", layout).x.detach()
    gbw = H.randn(bl.shape, gen).to(dtype) if with_gbw else None
    grads = emu._roi_unpool_blend_backward(g, gbw, base, bl, inp, il, rois, s, aligned)

    cd = H.coord_dtype_for(dtype, rois.dtype)
    x64 = [t.to(torch.float64).requires_grad_() for t in (base, bl, inp, il)]
    r64 = rois.to(torch.float64)
    cot = (g.double(), gbw.double() if with_gbw else torch.zeros(bl.shape, dtype=torch.float64))
    for name, oracle in (("reference", reference.roi_unpool_blend), ("explicit", TB.explicit_blend)):
        r_out, r_bw = oracle(*x64, r64, s, aligned, coord_dtype=cd)
        r_grads = torch.autograd.grad((r_out, r_bw), x64, cot, allow_unused=True)
        TB._assert_close(out, r_out, dtype, f"emulated blend out vs {name}")
        TB._assert_close(bw, r_bw, dtype, f"emulated blend base_weight vs {name}")
        for label, a, e, t in zip(("base", "base_logit", "input", "input_logit"), grads, r_grads, x64):
            e = torch.zeros_like(t) if e is None else e
            assert a.dtype == dtype and a.shape == t.shape, label
            TB._assert_close(a, e, dtype, f"emulated blend grad {label} vs {name}")

    # the CPU kernel computes the same function; outputs in the same memory format
    cpu_out, cpu_bw = torch.ops.roi_ops.roi_unpool_blend(base, bl, inp, il, rois, s, aligned)
    cpu_grads = torch.ops.roi_ops._roi_unpool_blend_backward(g, gbw, base, bl, inp, il, rois, s, aligned)
    for label, a, c in zip(("out", "base_weight", "grad base", "grad base_logit", "grad input",
                            "grad input_logit"), (out, bw, *grads), (cpu_out, cpu_bw, *cpu_grads)):
        TB._assert_close(a, c, dtype, f"emulated vs CPU blend {label}")
        assert a.stride() == c.stride(), label

    # pixels no ROI covers: the global output and its gradient pass through bitwise
    covered = torch.zeros(bl.shape, dtype=torch.bool)
    if rois.shape[0]:
        cov = reference.roi_unpool_coverage(r64, (case.height, case.width), s, aligned, cd)
        covered.index_put_((rois[:, 0].long(),), cov, accumulate=True)
    free = ~covered
    assert torch.equal(out.permute(0, 2, 3, 1)[free], base.permute(0, 2, 3, 1)[free])
    assert bool((bw[free] == 1).all())
    assert torch.equal(grads[0].permute(0, 2, 3, 1)[free], g.permute(0, 2, 3, 1)[free])
    assert bool((grads[1][free] == 0).all())
    return out, bw, grads


@pytest.mark.parametrize("dtype", H.FLOAT_DTYPES, ids=H.dtype_id)
@given(case=H.cases(adversarial=True, max_size=9, max_pooled=5),
       layout=st.sampled_from(LAYOUTS), aligned=st.booleans(),
       logit_scale=st.sampled_from([1.0, 40.0]), with_gbw=st.booleans())
@SETTINGS
def test_roi_unpool_blend_matches_oracle(emu, dtype, case, layout, aligned, logit_scale, with_gbw):
    _check_blend(emu, case, dtype, layout, aligned, logit_scale, with_gbw)


@pytest.mark.parametrize("with_gbw", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_blend_many_rois_across_tiles(emu, layout, with_gbw):
    """Maps of several 16 x 16 tiles, ROIs spanning tile borders, interleaved
    batch indices, an image without ROIs and more ROIs than a tile list
    usually holds: every tile's list must hold exactly the ROIs that meet it."""
    from helpers import Case

    k, B = 23, 3
    gen = H.make_generator(11)
    xy = torch.rand((k, 4), generator=gen, dtype=torch.float64) * torch.tensor([50.0, 40, 50, 40]) - 4
    batch = torch.tensor([(2 * i) % B for i in range(k)], dtype=torch.float64)
    batch[batch == 1] = 2  # image 1 gets no ROI
    rows = [tuple(r) for r in torch.cat([batch[:, None], xy], 1).tolist()]
    rows += [(0, 0.0, 0.0, 37.0, 35.0), (2, 15.5, 15.5, 16.5, 16.5)]  # whole map; one pixel at a tile corner
    case = Case(B, 3, 35, 37, (3, 4), (3, 4), 1.0, -1, rows, "tensor", torch.float64, 5)
    for aligned in (False, True):
        _, bw, _ = _check_blend(emu, case, torch.float64, layout, aligned, 3.0, with_gbw)
        assert bool((bw[1] == 1).all()) and bool((bw[0] < 1).any())


def test_blend_every_element_written_and_thread_independent(emu, restore_threads):
    """Outputs and gradients are torch.empty: an element no 'thread' wrote
    would show as garbage that differs between runs. Same bits with 1 and 2 threads."""
    gen = H.make_generator(4)
    rows = [(1, 3.3, 2.1, 30.2, 20.7), (0, -8.0, 5.0, 20.0, 60.0), (1, 0.0, 0.0, 33.9, 17.9),
            (0, 10.0, 10.0, 10.5, 11.0), (1, 30.0, 31.0, 29.0, 12.0)]
    rois = torch.tensor(rows, dtype=torch.float32)
    base = H.randn((2, 5, 18, 34), gen).float().contiguous(memory_format=torch.channels_last)
    bl, inp = H.randn((2, 18, 34), gen).float(), H.randn((5, 5, 3, 4), gen).float()
    il, g, gbw = H.randn((5, 3, 4), gen).float(), H.randn(base.shape, gen).float(), H.randn(bl.shape, gen).float()
    runs = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        out, bw = emu.roi_unpool_blend(base, bl, inp, il, rois, 0.5, True)
        grads = emu._roi_unpool_blend_backward(g, gbw, base, bl, inp, il, rois, 0.5, True)
        runs.append((out, bw, *grads))
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)


def test_blend_empty_cases(emu):
    base, bl = torch.randn(2, 3, 5, 6), torch.randn(2, 5, 6)
    none = torch.zeros(0, 5)
    out, bw = emu.roi_unpool_blend(base, bl, torch.zeros(0, 3, 2, 2), torch.zeros(0, 2, 2), none, 1.0, True)
    assert torch.equal(out, base) and bool((bw == 1).all())
    g = torch.randn_like(base)
    gb, gbl, gi, gil, gc = emu._roi_unpool_blend_backward(g, None, base, bl, torch.zeros(0, 3, 2, 2),
                                                          torch.zeros(0, 2, 2), none, 1.0, True)
    assert gc.shape == (0,)
    assert torch.equal(gb, g) and bool((gbl == 0).all()) and gi.shape == (0, 3, 2, 2) and gil.shape == (0, 2, 2)
    one = torch.tensor([[1.0, 0, 0, 3, 3]])
    out, bw = emu.roi_unpool_blend(base[:, :0], bl, torch.zeros(1, 0, 2, 2), torch.zeros(1, 2, 2), one, 1.0, True)
    assert out.shape == (2, 0, 5, 6) and bool((bw[1, :3, :3] < 1).all())
    out, bw = emu.roi_unpool_blend(base[:0], bl[:0], torch.zeros(0, 3, 2, 2), torch.zeros(0, 2, 2), none, 1.0, True)
    assert out.shape == (0, 3, 5, 6) and bw.shape == (0, 5, 6)


def test_blend_bad_input_raises(emu):
    base, bl = torch.randn(2, 1, 4, 4), torch.randn(2, 4, 4)
    inp, il = torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2)
    for rois, match in (([[2.0, 0, 0, 1, 1]], "batch index"), ([[0.0, float("nan"), 0, 1, 1]], "finite")):
        r = torch.tensor(rois)
        with pytest.raises(ValueError, match=match):
            emu.roi_unpool_blend(base, bl, inp, il, r, 1.0, False)
        with pytest.raises(ValueError, match=match):
            emu._roi_unpool_blend_backward(torch.zeros_like(base), None, base, bl, inp, il, r, 1.0, False)
    with pytest.raises(ValueError, match="base_logit must be"):
        emu.roi_unpool_blend(base, bl[:1], inp, il, torch.zeros(1, 5), 1.0, False)
    with pytest.raises(TypeError, match="dtype"):
        emu.roi_unpool_blend(base, bl.double(), inp, il, torch.zeros(1, 5), 1.0, False)
    with pytest.raises(ValueError, match="grad_out must have base's shape"):
        emu._roi_unpool_blend_backward(torch.zeros(2, 1, 4, 3), None, base, bl, inp, il, torch.zeros(1, 5),
                                       1.0, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=H.dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_gbw", [False, True])
def test_blend_with_coverage_matches_cpu_and_reference(emu, dtype, layout, with_gbw):
    """The soft coverage (docs/spec.md, "Soft coverage"): forward and all five gradients of the emulated
    kernels against the CPU kernel and the float64 reference, with soft, zero and one-valued cells, pixels
    where no ROI takes part (an ROI of coverage 0 still has a coverage gradient there), several tiles."""
    gen = H.make_generator(21)
    rows = [(0, 1.0, 1.0, 20.0, 14.0), (0, 5.5, 3.2, 30.0, 19.0), (1, 0.0, 0.0, 34.0, 19.0),
            (1, 10.0, 2.0, 18.5, 9.5), (0, -4.0, 12.0, 9.0, 30.0)]
    rois = torch.tensor(rows, dtype=dtype)
    Bn, Cn, Hn, Wn, P = 2, 3, 19, 34, 3
    base = H.randn((Bn, Cn, Hn, Wn), gen).to(dtype)
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    bl = H.randn((Bn, Hn, Wn), gen).to(dtype) * 2
    inp, il = H.randn((5, Cn, P, P), gen).to(dtype), H.randn((5, P, P), gen).to(dtype) * 2
    dense = torch.rand((5, Hn, Wn), generator=gen, dtype=torch.float64)
    dense[dense < 0.25] = 0  # not taking part there
    dense[dense > 0.85] = 1
    dense[3] = 0  # an ROI taking part nowhere
    cov = roi_ops.footprint_crops(dense.to(dtype), rois, 1.0, True)
    g = H.randn(base.shape, gen).to(dtype)
    gbw = H.randn(bl.shape, gen).to(dtype) if with_gbw else None
    out, bw = emu.roi_unpool_blend(base, bl, inp, il, rois, 1.0, True, cov)
    grads = emu._roi_unpool_blend_backward(g, gbw, base, bl, inp, il, rois, 1.0, True, cov)
    cpu_out, cpu_bw = torch.ops.roi_ops.roi_unpool_blend(base, bl, inp, il, rois, 1.0, True, cov)
    cpu_grads = torch.ops.roi_ops._roi_unpool_blend_backward(g, gbw, base, bl, inp, il, rois, 1.0, True, cov)
    labels = ("out", "base_weight", "grad base", "grad base_logit", "grad input", "grad input_logit",
              "grad coverage")
    for label, a, c in zip(labels, (out, bw, *grads), (cpu_out, cpu_bw, *cpu_grads)):
        TB._assert_close(a, c, dtype, f"emulated vs CPU blend with coverage: {label}")
    x64 = [t.to(torch.float64).requires_grad_() for t in (base, bl, inp, il, cov)]
    r_out, r_bw = reference.roi_unpool_blend(*x64[:4], rois.double(), 1.0, True, coverage=x64[4])
    cot = (g.double(), gbw.double() if with_gbw else torch.zeros(bl.shape, dtype=torch.float64))
    r_grads = torch.autograd.grad((r_out, r_bw), x64, cot)
    TB._assert_close(out, r_out, dtype, "emulated blend with coverage vs reference: out")
    TB._assert_close(bw, r_bw, dtype, "emulated blend with coverage vs reference: base_weight")
    for label, a, e in zip(labels[2:], grads, r_grads):
        TB._assert_close(a, e, dtype, f"emulated blend with coverage vs reference: {label}")
    # coverage all ones is bitwise no coverage; an ROI of coverage 0 everywhere is bitwise absent
    ones = emu.roi_unpool_blend(base, bl, inp, il, rois, 1.0, True, torch.ones_like(cov))
    plain = emu.roi_unpool_blend(base, bl, inp, il, rois, 1.0, True)
    assert all(torch.equal(a, b) for a, b in zip(ones, plain))
    keep = [0, 1, 2, 4]
    absent = emu.roi_unpool_blend(base, bl, inp[keep], il[keep], rois[keep], 1.0, True, cov[keep])
    assert all(torch.equal(a, b) for a, b in zip((out, bw), absent))


def test_host_syncs_counted_and_skipped_for_trusted_boxes(emu):
    """The CUDA host code reads the box table on the host (a device-to-host copy: one device sync on a GPU) once
    per op call, and never inside a trusted scope (roi_ops._ops.trusted_boxes, which the ROICtrl adapter opens
    around the ops of a layer): one adapter layer's op calls (ROI-Align, the fused blend, the coverage
    ROI-Unpool, and their backward) make 0 reads there and give the same results; an overflowing box is still
    refused outside the scope."""
    gen = torch.Generator().manual_seed(3)
    B, C, H, W, P = 2, 4, 9, 7, 3
    x = torch.randn(B, C, H, W, generator=gen)
    rois = torch.tensor([[0, 0.5, 1.0, 5.5, 8.0], [1, 2.0, 0.0, 7.0, 6.5], [1, 1.0, 3.0, 3.0, 4.0]])
    base_logit = torch.randn(B, H, W, generator=gen)

    def layer():
        crops = emu.roi_align(x, rois, 1.0, P, P, -1, True)
        logit = crops.mean(1)
        out, weight = emu.roi_unpool_blend(x, base_logit, crops, logit, rois, 1.0, True)
        cover = emu.roi_unpool(torch.ones(3, 1, 1, 1), rois, 1.0, H, W, True)
        g_crops = emu._roi_align_backward(crops, rois, 1.0, P, P, B, C, H, W, -1, True)
        g_unpool = emu._roi_unpool_backward(cover.expand(3, C, H, W), rois, 1.0, P, P, True)
        grads = emu._roi_unpool_blend_backward(out, weight, x, base_logit, crops, logit, rois, 1.0, True)
        return [crops, out, weight, cover, g_crops, g_unpool, *grads]

    def reads_of(fn):
        before = emu._host_box_reads()
        result = fn()
        return emu._host_box_reads() - before, result

    checked, want = reads_of(layer)
    assert checked == 6  # one read (one sync) per op call
    previous = emu._set_trusted_boxes(True)
    try:
        trusted, got = reads_of(layer)
    finally:
        emu._set_trusted_boxes(previous)
    assert trusted == 0
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # outside the scope, boxes that overflow the batch or the coordinate dtype are refused, as before
    with pytest.raises(ValueError, match="batch index"):
        emu.roi_align(x, torch.tensor([[2.0, 0, 0, 1, 1]]), 1.0, P, P, -1, True)
    with pytest.raises(ValueError, match="not a finite box in the feature frame"):
        emu.roi_align(x, torch.tensor([[0, 0.0, 0.0, 1e30, 3.0]]), 1e10, P, P, -1, True)
