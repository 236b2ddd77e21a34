"""The CUDA kernels on a real GPU (skipped cleanly where CUDA is unavailable).

CUDA against the CPU kernels and the float64 oracle on random and adversarial
boxes, every dtype and layout; gradcheck, opcheck and torch.compile on CUDA;
bitwise-reproducible gradients (repeated runs, deterministic mode, streams);
bad inputs raising instead of faulting; empty cases; 64-bit indexing.

The core suites (test_roi_align.py, test_roi_unpool.py, test_determinism.py,
test_compile_opcheck.py, ...) also run on "cuda" when it is available; this
file adds what is specific to the CUDA backend. Without a GPU the same device
code is exercised on the host by tools/test_cuda_emulate.py (make cuda-check).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import roi_ops
from roi_ops import reference

import helpers as H

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")

OPS = ("roi_align", "_roi_align_backward", "roi_unpool", "_roi_unpool_backward")
LAYOUTS = ("contiguous", "channels_last", "strided", "token_major")


@pytest.fixture(autouse=True)
def _cuda_kernels_loaded():
    # fail, never fall back silently to the pure-PyTorch path
    H.assert_native("cuda")


def test_every_op_has_a_cuda_kernel():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"roi_ops::{op}", "CUDA"), op


def _boxes_away_from_edges(gen, batch, height, width, k, dtype, device):
    u = lambda *s: torch.rand(s, generator=gen, dtype=torch.float64)  # noqa: E731
    x1 = torch.floor(u(k) * (width - 2)) + 0.1 + 0.3 * u(k)
    y1 = torch.floor(u(k) * (height - 2)) + 0.1 + 0.3 * u(k)
    x2 = x1 + 1.2 + torch.floor(u(k) * (width - 1))
    y2 = y1 + 1.2 + torch.floor(u(k) * (height - 1))
    idx = torch.randint(0, batch, (k,), generator=gen).double()
    return torch.stack([idx, x1, y1, x2, y2], 1).to(device, dtype)


# ---------------------------------------------------------------- vs the oracle


@pytest.mark.parametrize("dtype", H.FLOAT_DTYPES, ids=H.dtype_id)
@given(case=H.cases(adversarial=True, max_size=9, max_pooled=5),
       layout=st.sampled_from(LAYOUTS), aligned=st.booleans())
@settings(max_examples=30, deadline=None, derandomize=True)
def test_roi_align_matches_oracle(dtype, case, layout, aligned):
    gen = H.make_generator(case.seed)
    values = H.randn((case.batch, case.channels, case.height, case.width), gen)
    lo = H.lay_out(values, dtype, "cuda", layout)
    boxes = H.make_boxes(case.rows, case.batch, case.boxes_form, case.boxes_dtype or dtype, "cuda")
    H.check_roi_align(lo, boxes, case.output_size, case.spatial_scale, case.sampling_ratio,
                      aligned, gen, what=f"cuda roi_align ({layout})")


@pytest.mark.parametrize("dtype", H.FLOAT_DTYPES, ids=H.dtype_id)
@given(case=H.cases(adversarial=True, max_size=9, max_pooled=5),
       layout=st.sampled_from(LAYOUTS), aligned=st.booleans())
@settings(max_examples=30, deadline=None, derandomize=True)
def test_roi_unpool_matches_oracle(dtype, case, layout, aligned):
    gen = H.make_generator(case.seed)
    k = len(case.rows)
    ph, pw = case.pooled
    values = H.randn((k, case.channels, ph, pw), gen)
    lo = H.lay_out(values, dtype, "cuda", layout)
    boxes = H.make_boxes(case.rows, case.batch, case.boxes_form, case.boxes_dtype or dtype, "cuda")
    H.check_roi_unpool(lo, boxes, (case.height, case.width), case.spatial_scale, aligned, gen,
                       what=f"cuda roi_unpool ({layout})")


# ---------------------------------------------------------------- vs the CPU kernels


def _roi_align_both(x, rois, args, g):
    out = {}
    for device in ("cpu", "cuda"):
        xd, rd, gd = x.to(device), rois.to(device), g.to(device)
        y = torch.ops.roi_ops.roi_align(xd, rd, *args)
        gx = torch.ops.roi_ops._roi_align_backward(gd, rd, args[0], args[1], args[2], *x.shape,
                                                   args[3], args[4])
        out[device] = (y, gx)
    return out


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", H.FLOAT_DTYPES, ids=H.dtype_id)
@pytest.mark.parametrize("aligned", [False, True])
def test_cuda_matches_cpu_on_a_realistic_shape(dtype, layout, aligned):
    """ROICtrl's 512px level-1 shape in small: many overlapping boxes of 1..6
    feature pixels, 25x25 grids. Same coordinates on both devices, so only
    accumulation order differs (the tolerance is relative to the sum of
    |terms|, from the oracle)."""
    gen = H.make_generator(11)
    B, C, Hh, W, K = 2, 8, 64, 64, 50
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = H.randn((B, C, Hh, W), gen).to(dtype).contiguous(memory_format=fmt)
    u = torch.rand((K, 4), generator=gen, dtype=torch.float64)
    x1, y1 = u[:, 0] * 448, u[:, 1] * 448
    side = 8 + u[:, 2:] * 40
    rois = torch.stack([torch.arange(K) % B, x1, y1, x1 + side[:, 0], y1 + side[:, 1]], 1)
    rois = rois.to(torch.float32)
    args = (1 / 8, 25, 25, 2, aligned)
    g = H.randn((K, C, 25, 25), gen).to(dtype)
    res = _roi_align_both(x, rois, args, g)
    (y_cpu, gx_cpu), (y_cuda, gx_cuda) = res["cpu"], res["cuda"]
    assert y_cuda.stride() == y_cpu.stride() and gx_cuda.stride() == gx_cpu.stride()
    cd = H.coord_dtype_for(dtype, rois.dtype)
    x64 = x.double().requires_grad_()
    kw = dict(output_size=(25, 25), spatial_scale=1 / 8, sampling_ratio=2, aligned=aligned,
              coord_dtype=cd)
    ref = reference.roi_align(x64, rois.double(), **kw)
    with torch.no_grad():
        bound = reference.roi_align(x64.abs(), rois.double(), **kw)
    gx_bound = H.vjp(ref, x64, g.double().abs())
    H.assert_within(y_cuda, y_cpu, 2 * bound, dtype, "roi_align forward, cuda vs cpu")
    H.assert_within(gx_cuda, gx_cpu, 2 * gx_bound, dtype, "roi_align backward, cuda vs cpu")

    grids = H.randn((K, C, 25, 25), gen).to(dtype).contiguous(memory_format=fmt)
    up = {d: torch.ops.roi_ops.roi_unpool(grids.to(d), rois.to(d), 1 / 8, Hh, W, aligned)
          for d in ("cpu", "cuda")}
    gu = H.randn(up["cpu"].shape, gen).to(dtype)
    gy = {d: torch.ops.roi_ops._roi_unpool_backward(gu.to(d), rois.to(d), 1 / 8, 25, 25, aligned)
          for d in ("cpu", "cuda")}
    ukw = dict(output_size=(Hh, W), spatial_scale=1 / 8, aligned=aligned, coord_dtype=cd)
    g64 = grids.double().requires_grad_()
    uref = reference.roi_unpool(g64, rois.double(), **ukw)
    with torch.no_grad():
        ubound = reference.roi_unpool(g64.abs(), rois.double(), **ukw)
    gy_bound = H.vjp(uref, g64, gu.double().abs())
    # the same coordinates give the same covered pixels on both devices
    ones = torch.ones_like(grids)
    covered = [torch.ops.roi_ops.roi_unpool(ones.to(d), rois.to(d), 1 / 8, Hh, W, aligned).cpu() != 0
               for d in ("cpu", "cuda")]
    assert torch.equal(covered[0], covered[1])
    H.assert_within(up["cuda"], up["cpu"], 2 * ubound, dtype, "roi_unpool forward, cuda vs cpu")
    H.assert_within(gy["cuda"], gy["cpu"], 2 * gy_bound, dtype, "roi_unpool backward, cuda vs cpu")


# ---------------------------------------------------------------- autograd, opcheck, compile


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("seed", [0, 1])
def test_gradcheck(seed, layout):
    gen = H.make_generator(seed)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = H.randn((2, 2, 6, 7), gen).cuda().contiguous(memory_format=fmt).requires_grad_()
    boxes = _boxes_away_from_edges(gen, 2, 6, 7, 4, torch.float64, "cuda")
    for aligned, sr in ((False, -1), (True, 2)):
        fn = lambda t: roi_ops.roi_align(t, boxes, (3, 2), 1.0, sr, aligned)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, rtol=1e-6)
    grids = H.randn((4, 2, 3, 2), gen).cuda().contiguous(memory_format=fmt).requires_grad_()
    for aligned in (False, True):
        fn = lambda t: roi_ops.roi_unpool(t, boxes, (6, 7), 1.0, aligned)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (grids,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=H.dtype_id)
def test_opcheck(dtype):
    gen = H.make_generator(1)
    x = H.randn((2, 3, 6, 5), gen).to("cuda", dtype).requires_grad_()
    rois = _boxes_away_from_edges(gen, 2, 6, 5, 3, dtype, "cuda")
    grids = H.randn((3, 3, 3, 2), gen).to("cuda", dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    ops = torch.ops.roi_ops
    torch.library.opcheck(ops.roi_align.default, (x, rois, 0.5, 3, 2, 2, True))
    torch.library.opcheck(ops.roi_unpool.default, (grids, rois, 0.5, 6, 5, False))
    torch.library.opcheck(ops._roi_align_backward.default,
                          (grids.detach(), rois, 0.5, 3, 2, 2, 3, 6, 5, 2, True))
    torch.library.opcheck(ops._roi_unpool_backward.default,
                          (H.randn((3, 3, 6, 5), gen).to("cuda", dtype), rois, 0.5, 3, 2, False))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()

    def chain(x, boxes):
        crops = roi_ops.roi_align(x, boxes, (3, 2), 0.5, 2, True)
        return roi_ops.roi_unpool(crops * 2.0, boxes, (x.shape[2], x.shape[3]), 0.5, True)

    gen = H.make_generator(5)
    x = H.randn((2, 3, 8, 7), gen).float().cuda()
    boxes = _boxes_away_from_edges(gen, 2, 8, 7, 4, torch.float32, "cuda")
    boxes[:, 1:] *= 2
    results = []
    for fn in (chain, torch.compile(chain, backend=backend, fullgraph=True)):
        xi = x.clone().requires_grad_()
        out = fn(xi, boxes)
        out.square().sum().backward()
        results.append((out.detach(), xi.grad))
    (o0, g0), (o1, g1) = results
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- determinism


def _forward_backward(op, dtype, layout, seed=22):
    """Many boxes over the centre of a map: each pixel there gathers from
    dozens of ROIs, bins and samples (where an atomic scatter would vary)."""
    gen = H.make_generator(seed)
    B, C, Hh, W, K, P = 2, 32, 48, 40, 200, 7
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    u = lambda *s: torch.rand(s, generator=gen, dtype=torch.float64)  # noqa: E731
    rois = torch.stack([torch.randint(0, B, (K,), generator=gen).double(),
                        u(K) * W * 0.45, u(K) * Hh * 0.45,
                        W * 0.55 + u(K) * W * 0.5, Hh * 0.55 + u(K) * Hh * 0.5], 1)
    rois = rois.to("cuda", dtype)
    if op == "roi_align":
        x = H.randn((B, C, Hh, W), gen).to("cuda", dtype).contiguous(memory_format=fmt)
        x.requires_grad_()
        out = roi_ops.roi_align(x, rois, (P, P), 1.0, -1, True)
    else:
        x = H.randn((K, C, P, P), gen).to("cuda", dtype).contiguous(memory_format=fmt)
        x.requires_grad_()
        out = roi_ops.roi_unpool(x, rois, (Hh, W), 1.0, True)
    g = H.randn(out.shape, gen).to("cuda", dtype)
    (gx,) = torch.autograd.grad(out, x, g)
    return out.detach(), gx


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=H.dtype_id)
@pytest.mark.parametrize("op", ["roi_align", "roi_unpool"])
def test_gradients_are_bitwise_reproducible(op, dtype, layout, deterministic_algorithms):
    # deterministic mode on (fixture): the ops must run without raising
    runs = [_forward_backward(op, dtype, layout) for _ in range(5)]
    torch.use_deterministic_algorithms(False)
    runs.append(_forward_backward(op, dtype, layout))
    for out, gx in runs[1:]:
        assert torch.equal(out, runs[0][0]), f"{op}: forward differs between runs"
        assert torch.equal(gx, runs[0][1]), (
            f"{op}: backward differs in {int((gx != runs[0][1]).sum())} elements")


def test_side_stream():
    """Kernels run on the current stream: work queued on a side stream gives
    the default stream's bits once synchronised."""
    expected = _forward_backward("roi_align", torch.float32, "contiguous")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = _forward_backward("roi_align", torch.float32, "contiguous")
    stream.synchronize()
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_device_guard_second_gpu():
    gen = H.make_generator(4)
    x = H.randn((1, 2, 9, 9), gen).float()
    rois = torch.tensor([[0, 1.0, 1.5, 7.0, 8.0]])
    expected = roi_ops.roi_align(x.cuda(0), rois.cuda(0), 3, 1.0, 2, True).cpu()
    with torch.cuda.device(0):
        got = roi_ops.roi_align(x.cuda(1), rois.cuda(1), 3, 1.0, 2, True)
    assert got.device == torch.device("cuda", 1)
    assert torch.equal(got.cpu(), expected)


# ---------------------------------------------------------------- bad input, empty cases


def _still_healthy():
    # a device-side fault would make every later CUDA call fail
    torch.cuda.synchronize()
    assert float(torch.ones(4, device="cuda").sum()) == 4.0


@pytest.mark.parametrize("bad", [2.0, -1.0, 0.5, 1e9])
def test_batch_index_out_of_range_raises(bad):
    x = torch.randn(2, 3, 8, 8, device="cuda")
    rois = torch.tensor([[0, 1.0, 1, 5, 5], [bad, 1.0, 1, 5, 5]], device="cuda")
    with pytest.raises(ValueError, match="batch index"):
        roi_ops.roi_align(x, rois, 2)
    with pytest.raises(ValueError, match="batch index"):
        torch.ops.roi_ops.roi_align(x, rois, 1.0, 2, 2, -1, False)
    with pytest.raises(ValueError, match="batch index"):
        torch.ops.roi_ops._roi_align_backward(torch.zeros(2, 3, 2, 2, device="cuda"), rois,
                                              1.0, 2, 2, 2, 3, 8, 8, -1, False)
    _still_healthy()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_boxes_raise(value):
    rois = torch.tensor([[0, 1.0, value, 5, 5]], device="cuda")
    with pytest.raises(ValueError, match="finite"):
        torch.ops.roi_ops.roi_align(torch.randn(1, 2, 6, 6, device="cuda"), rois,
                                    1.0, 2, 2, -1, False)
    with pytest.raises(ValueError, match="finite"):
        torch.ops.roi_ops.roi_unpool(torch.randn(1, 2, 2, 2, device="cuda"), rois,
                                     1.0, 6, 6, False)
    _still_healthy()


def test_mixed_devices_raise():
    x = torch.randn(1, 2, 6, 6, device="cuda")
    rois = torch.tensor([[0, 1.0, 1, 5, 5]])
    with pytest.raises((RuntimeError, ValueError), match="device"):
        roi_ops.roi_align(x, rois, 2)
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.roi_ops.roi_align(x, rois, 1.0, 2, 2, -1, False)
    _still_healthy()


def test_empty_cases():
    x = torch.randn(2, 3, 5, 6, device="cuda", requires_grad=True)
    none = torch.zeros(0, 5, device="cuda")
    out = roi_ops.roi_align(x, none, (2, 3))
    assert out.shape == (0, 3, 2, 3)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and not x.grad.any()
    one = torch.tensor([[1.0, 0, 0, 3, 3]], device="cuda")
    assert roi_ops.roi_align(x[:, :0], one, 2).shape == (1, 0, 2, 2)
    assert roi_ops.roi_align(torch.zeros(0, 3, 5, 6, device="cuda"), none, 2).shape == (0, 3, 2, 2)
    grids = torch.zeros(0, 3, 2, 2, device="cuda", requires_grad=True)
    up = roi_ops.roi_unpool(grids, none, (4, 5))
    assert up.shape == (0, 3, 4, 5)
    up.sum().backward()
    assert grids.grad.shape == grids.shape
    _still_healthy()


# ---------------------------------------------------------------- 64-bit indexing


def _free_bytes():
    free, _ = torch.cuda.mem_get_info()
    return free


@pytest.mark.skipif(not torch.cuda.is_available() or _free_bytes() < 24 * 2**30,
                    reason="needs CUDA with 24 GiB of free GPU memory")
def test_sizes_past_2_pow_31():
    """Tensors of more than 2^31 elements: elements past the 32-bit range are
    read and written where they are (not wrapped onto the start)."""
    side = 46341  # side**2 > 2**31: the end of the last row is past 2**31
    f16 = dict(device="cuda", dtype=torch.float16)
    full = torch.tensor([[0, 0.0, 0.0, side, side]], device="cuda")
    corner = torch.tensor([[0, side - 2.0, side - 2.0, side, side]], device="cuda")

    # unpool forward writes [1, 1, side, side]; the bottom-right pixels clamp
    # onto the last cell, the top-left onto the first
    grid = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]]]], **f16)
    up = roi_ops.roi_unpool(grid, full, (side, side), 1.0, True)
    assert up.numel() > 2**31
    assert float(up[0, 0, -1, -1]) == 7.0 and float(up[0, 0, 0, 0]) == 1.0
    last_row = up[0, 0, -1].float()
    assert float(last_row[0]) == 5.0 and bool((last_row[1:] >= last_row[:-1]).all())
    del up, last_row

    # unpool backward reads [1, 1, side, side]: only the last pixel is non-zero
    g = torch.zeros(1, 1, side, side, **f16)
    g[0, 0, -1, -1] = 1.0
    gy = torch.ops.roi_ops._roi_unpool_backward(g, full, 1.0, 2, 2, True)
    assert gy.flatten().tolist() == [0.0, 0.0, 0.0, 1.0]
    del g

    # align forward reads and align backward writes the last pixel: the one
    # sample of this box (aligned=False, 1 sample) sits exactly on it
    x = torch.zeros(1, 1, side, side, **f16)
    x[0, 0, -1, -1] = 3.0
    x.requires_grad_()
    out = roi_ops.roi_align(x, corner, 1, 1.0, 1, False)
    assert float(out.detach()) == 3.0
    out.backward(torch.ones_like(out))
    assert float(x.grad[0, 0, -1, -1]) == 1.0
    assert float(x.grad.float().sum()) == 1.0
