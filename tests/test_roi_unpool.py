"""roi_ops.roi_unpool against the float64 oracle: random and adversarial boxes,
every dtype, layout and box format, forward and backward; empty cases; the
module; and that the native kernels (not the fallback) are what runs."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import roi_ops
from helpers import (
    DEVICES, FLOAT_DTYPES, LAYOUTS, assert_layouts_bitwise_equal, cases, check_roi_unpool, dtype_id, lay_out,
    make_boxes,
    make_generator, assert_native, randn, rois_of,
)

pytestmark = pytest.mark.parametrize("device", DEVICES)


def _run_case(case, device, dtype, layout, aligned, what):
    gen = make_generator(case.seed)
    K = len(case.rows)
    ph, pw = case.pooled
    lo = lay_out(randn((K, case.channels, ph, pw), gen), dtype, device, layout)
    boxes = make_boxes(case.rows, case.batch, case.boxes_form, case.boxes_dtype or dtype, device)
    size = case.height if case.height == case.width and case.seed % 2 else (case.height, case.width)
    check_roi_unpool(lo, boxes, size, case.spatial_scale, aligned, gen, what=f"{what} {case}")


# ---------------------------------------------------------------- native


def test_native_kernels_are_loaded(device):
    assert_native(device)
    assert hasattr(torch.ops.roi_ops, "roi_unpool")


def test_public_function_runs_the_custom_op(device):
    assert_native(device)
    x = torch.randn(1, 2, 3, 3, device=device)
    boxes = torch.tensor([[0.0, 0.5, 0.5, 3.5, 4.0]], device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            roi_ops.roi_unpool(x, boxes, 5)
    names = {e.name for e in prof.events()}
    assert "roi_ops::roi_unpool" in names, sorted(names)


def test_signature(device):
    sig = inspect.signature(roi_ops.roi_unpool)
    assert list(sig.parameters) == ["input", "boxes", "output_size", "spatial_scale", "aligned"]
    assert sig.parameters["spatial_scale"].default == 1.0
    assert sig.parameters["aligned"].default is False


# ---------------------------------------------------------------- oracle


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@given(case=cases(max_per_image=4, max_size=9))
def test_matches_oracle_random_boxes(device, dtype, layout, aligned, case):
    _run_case(case, device, dtype, layout, aligned, "random")


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@given(case=cases(adversarial=True, max_per_image=4, max_size=9), layout=st.sampled_from(LAYOUTS))
def test_matches_oracle_adversarial_boxes(device, dtype, aligned, case, layout):
    _run_case(case, device, dtype, layout, aligned, "adversarial")


# Hand-picked boxes (image units for spatial_scale 1, output map 5x6) whose
# edges and grid coordinates hit the special cases of coverage and clamping.
EXPLICIT_ROWS = [
    (0, 0.0, 0.0, 6.0, 5.0),          # the whole map
    (0, 1.0, 1.0, 3.0, 4.0),          # edges on pixels: start covered, end not
    (0, 0.5, 0.5, 3.5, 4.5),          # edges on half pixels
    (0, 2.0, 2.0, 2.0, 2.0),          # zero size: covers nothing when aligned
    (0, 3.0, 3.0, 1.0, 1.0),          # inverted: covers nothing when aligned
    (0, -10.0, -10.0, -5.0, -5.0),    # outside
    (0, 10.0, 10.0, 20.0, 20.0),      # outside
    (1, -1e6, -1e6, 1e6, 1e6),        # huge: every pixel, all near the grid centre
    (1, 2.0, -1e6, 3.0, 1e6),
    (1, 5e5, 0.0, 1e6, 5.0),
    (1, -3.0, -2.0, 2.0, 1.0),        # partly outside
    (1, 5.0, 4.0, 5.0, 4.0),          # a point on the last pixel
    (1, 1.0, 1.0, 1.0 + 1e-6, 2.0),   # nearly zero width
    (1, 0.25, 0.75, 5.75, 4.25),
]


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("pooled", [(1, 1), (2, 3), (4, 4)])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.125])
def test_matches_oracle_explicit_adversarial_boxes(device, dtype, aligned, pooled, spatial_scale):
    gen = make_generator(5)
    rows = [(b, *(c if abs(c) >= 5e5 else c / spatial_scale for c in r)) for b, *r in EXPLICIT_ROWS]
    lo = lay_out(randn((len(rows), 3, *pooled), gen), dtype, device, "contiguous")
    boxes = make_boxes(rows, 2, "tensor", torch.float32, device)
    check_roi_unpool(lo, boxes, (5, 6), spatial_scale, aligned, gen)


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_box_formats_give_identical_results(device, dtype):
    gen = make_generator(4)
    rows = [(0, 0.5, 1.0, 4.5, 6.0), (0, -1.0, 2.0, 8.0, 3.0), (1, 1.0, 0.0, 3.0, 2.5),
            (1, 2.25, 2.5, 5.75, 6.0)]  # sorted by image: list and tensor orders agree
    x = randn((4, 3, 3, 2), gen).to(device=device, dtype=dtype)
    results = []
    for form in ("tensor", "list"):
        for bdtype in (torch.float32, torch.float16, torch.bfloat16, dtype):
            boxes = make_boxes(rows, 2, form, bdtype, device)
            results.append(((form, bdtype), roi_ops.roi_unpool(x, boxes, (7, 6), 1.0, True)))
    for key, out in results[1:]:
        assert torch.equal(out, results[0][1]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_layouts_give_the_same_numbers(device, dtype):
    gen = make_generator(12)
    boxes = torch.tensor([[0, 0.3, 0.7, 6.2, 8.1], [1, 2.0, 1.5, 3.5, 7.0], [1, -2.0, -1.0, 9.0, 4.0],
                          [0, 1.1, 1.2, 5.3, 5.4]] * 3, dtype=dtype, device=device)
    values = randn((12, 5, 3, 4), gen)
    g = randn((12, 5, 9, 8), gen).to(device=device, dtype=dtype)
    assert_layouts_bitwise_equal(lambda x: roi_ops.roi_unpool(x, boxes, (9, 8), 1.0, True), values, dtype, device, g)


def test_output_memory_format_follows_input(device):
    x = torch.randn(2, 4, 3, 3, device=device)
    boxes = torch.tensor([[0, 0.0, 0.0, 4.0, 5.0], [1, 1.0, 1.0, 3.0, 3.0]], device=device)
    assert roi_ops.roi_unpool(x, boxes, (6, 5)).is_contiguous()
    out = roi_ops.roi_unpool(x.contiguous(memory_format=torch.channels_last), boxes, (6, 5))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert roi_ops.roi_unpool(x[:, :, ::2], boxes, (6, 5)).is_contiguous()


# ---------------------------------------------------------------- empty


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape, boxes_kind", [
    ((0, 3, 2, 4), "no_rows_tensor"),
    ((0, 3, 2, 4), "no_rows_list"),
    ((0, 3, 2, 4), "empty_list"),
    ((2, 0, 2, 4), "two_rows"),
])
def test_empty_cases(device, dtype, layout, shape, boxes_kind):
    x = torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    boxes = {
        "no_rows_tensor": torch.zeros(0, 5, device=device),
        "no_rows_list": [torch.zeros(0, 4, device=device) for _ in range(2)],
        "empty_list": [],
        "two_rows": torch.tensor([[0, 0.0, 0.0, 3.0, 3.0], [1, 1.0, 1.0, 4.0, 2.0]], device=device),
    }[boxes_kind]
    out = roi_ops.roi_unpool(x, boxes, (5, 6), 0.5, True)
    assert tuple(out.shape) == (shape[0], shape[1], 5, 6) and out.dtype == dtype
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.equal(x.grad, torch.zeros_like(x))


# ---------------------------------------------------------------- module


def test_module_repr_and_forward(device):
    m = roi_ops.RoIUnpool((9, 7), spatial_scale=0.5, aligned=True)
    text = repr(m)
    assert text.startswith("RoIUnpool(")
    for part in ("output_size=(9, 7)", "spatial_scale=0.5", "aligned=True"):
        assert part in text, text
    assert list(m.parameters()) == [] and m.state_dict() == {}
    boxes = [torch.tensor([[1.0, 2.0, 9.0, 12.0]], device=device),
             torch.tensor([[0.0, 0.0, 16.0, 16.0], [3.5, 2.5, 4.0, 8.0]], device=device)]
    x = torch.randn(3, 2, 4, 3, device=device)
    assert torch.equal(m(x, boxes), roi_ops.roi_unpool(x, boxes, (9, 7), 0.5, True))
    d = roi_ops.RoIUnpool(6)
    assert "output_size=6" in repr(d) and "aligned=False" in repr(d)
    assert torch.equal(d(x, rois_of(boxes).float()), roi_ops.roi_unpool(x, boxes, 6))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_reads_strided_and_expanded_gradients_in_place(device, layout):
    """The backward takes any gradient strides: an expanded one (``.sum().backward()``, stride 0 everywhere), a
    broadcast channel row, a slice of a larger tensor, a transposed one: each gives the same result as its dense
    copy (what reading in place saves is measured by benchmarks/bench_unpool_sum.py)."""
    gen = torch.Generator().manual_seed(11)
    K, C, PH, PW, H, W = 3, 5, 4, 3, 9, 11
    grids = torch.randn(K, C, PH, PW, generator=gen, dtype=torch.float64)
    if layout == "channels_last":
        grids = grids.contiguous(memory_format=torch.channels_last)
    rois = torch.tensor([[0, 0.5, 1.0, 7.5, 8.0], [0, 2.0, 0.0, 11.0, 9.0], [0, 3.2, 4.1, 4.4, 5.0]],
                        dtype=torch.float64)
    args = (rois, 1.0, PH, PW, True)
    big = torch.randn(K, C + 2, H + 1, W * 2, generator=gen, dtype=torch.float64)
    grads = {
        "expanded scalar": torch.tensor(0.7, dtype=torch.float64).expand(K, C, H, W),
        "expanded channel row": torch.randn(1, C, 1, 1, generator=gen, dtype=torch.float64).expand(K, C, H, W),
        "slice": big[:, 1 : C + 1, :H, ::2],
        "transposed": torch.randn(K, C, W, H, generator=gen, dtype=torch.float64).transpose(2, 3),
    }
    for name, g in grads.items():
        got = torch.ops.roi_ops._roi_unpool_backward(g.to(device), rois.to(device), *args[1:])
        want = torch.ops.roi_ops._roi_unpool_backward(g.contiguous().to(device), rois.to(device), *args[1:])
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13, msg=lambda m: f"{name}: {m}")
    # through autograd: .sum().backward() against the dense gradient of ones
    x = grids.to(device).requires_grad_()
    roi_ops.roi_unpool(x, rois.to(device), (H, W), 1.0, True).sum().backward()
    want = torch.ops.roi_ops._roi_unpool_backward(torch.ones(K, C, H, W, dtype=torch.float64, device=device),
                                                  rois.to(device), 1.0, PH, PW, True)
    torch.testing.assert_close(x.grad, want, rtol=1e-13, atol=1e-13)
