"""Bitwise reproducibility: repeated runs, torch.use_deterministic_algorithms,
and the number of threads never change a single bit of the results, even
with many overlapping boxes (where an order-dependent scatter would show)."""
from __future__ import annotations

import pytest
import torch

import roi_ops
from helpers import DEVICES, dtype_id, make_generator, randn

pytestmark = pytest.mark.parametrize("device", DEVICES)

B, C, H, W = 2, 16, 24, 20
K, PH, PW = 96, 7, 7


def _overlapping_boxes(device, dtype):
    # every box contains the centre of the map: each pixel there is read by
    # (and receives gradient from) dozens of boxes, bins and samples
    gen = make_generator(21)
    u = lambda *s: torch.rand(s, generator=gen, dtype=torch.float64)  # noqa: E731
    x1 = u(K) * W * 0.45
    y1 = u(K) * H * 0.45
    x2 = W * 0.55 + u(K) * W * 0.5
    y2 = H * 0.55 + u(K) * H * 0.5
    idx = torch.randint(0, B, (K,), generator=gen).double()
    return torch.stack([idx, x1, y1, x2, y2], 1).to(device, dtype)


def _run(op, device, dtype, layout):
    gen = make_generator(22)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    boxes = _overlapping_boxes(device, dtype)
    if op == "roi_align":
        x = randn((B, C, H, W), gen).to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
        out = roi_ops.roi_align(x, boxes, (PH, PW), 1.0, -1, True)
    else:
        x = randn((K, C, PH, PW), gen).to(device, dtype).contiguous(memory_format=fmt).requires_grad_()
        out = roi_ops.roi_unpool(x, boxes, (H, W), 1.0, True)
    g = randn(out.shape, gen).to(device, dtype)
    (gx,) = torch.autograd.grad(out, x, g)
    return out.detach(), gx


def _assert_bitwise(a, b, what):
    out_a, grad_a = a
    out_b, grad_b = b
    assert torch.equal(out_a, out_b), f"{what}: forward differs"
    assert torch.equal(grad_a, grad_b), (
        f"{what}: backward differs in {int((grad_a != grad_b).sum())} elements, "
        f"max {float((grad_a.double() - grad_b.double()).abs().max())}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("op", ["roi_align", "roi_unpool"])
def test_repeated_runs_are_bitwise_identical(device, op, dtype, layout, deterministic_algorithms):
    # with deterministic algorithms on the ops must run (no error) and agree
    first = _run(op, device, dtype, layout)
    assert first[1].abs().sum() > 0
    for _ in range(3):
        _assert_bitwise(first, _run(op, device, dtype, layout), f"{op} {dtype} {layout}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("op", ["roi_align", "roi_unpool"])
def test_thread_count_does_not_change_results(device, op, dtype, layout, restore_num_threads):
    torch.set_num_threads(1)
    single = _run(op, device, dtype, layout)
    for threads in (2, 3):
        torch.set_num_threads(threads)
        _assert_bitwise(single, _run(op, device, dtype, layout), f"{op} {dtype} {layout}, {threads} threads")
