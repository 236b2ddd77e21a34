"""roi_ops.roi_align against the float64 oracle: random and adversarial boxes,
every dtype, layout and box format, forward and backward; empty cases; the
module; and that the native kernels (not the fallback) are what runs."""
from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import roi_ops
from helpers import (
    DEVICES, FLOAT_DTYPES, LAYOUTS, assert_layouts_bitwise_equal, check_roi_align, dtype_id, lay_out, make_boxes,
    make_generator, assert_native, randn, rois_of, cases,
)

pytestmark = pytest.mark.parametrize("device", DEVICES)


def _run_case(case, device, dtype, layout, aligned, what):
    gen = make_generator(case.seed)
    lo = lay_out(randn((case.batch, case.channels, case.height, case.width), gen), dtype, device, layout)
    boxes_dtype = case.boxes_dtype or dtype
    boxes = make_boxes(case.rows, case.batch, case.boxes_form, boxes_dtype, device)
    check_roi_align(lo, boxes, case.output_size, case.spatial_scale, case.sampling_ratio,
                    aligned, gen, what=f"{what} {case}")


# ---------------------------------------------------------------- native


def test_native_kernels_are_loaded(device):
    # CI must not pass on the pure-PyTorch fallback
    assert_native(device)
    assert hasattr(torch.ops.roi_ops, "roi_align")


def test_public_function_runs_the_custom_op(device):
    assert_native(device)
    x = torch.randn(1, 2, 5, 5, device=device)
    boxes = torch.tensor([[0.0, 0.5, 0.5, 3.5, 4.0]], device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "falling back" warning
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            roi_ops.roi_align(x, boxes, 2)
    names = {e.name for e in prof.events()}
    assert "roi_ops::roi_align" in names, sorted(names)


def test_signature_matches_torchvision(device):
    sig = inspect.signature(roi_ops.roi_align)
    assert list(sig.parameters) == [
        "input", "boxes", "output_size", "spatial_scale", "sampling_ratio", "aligned"]
    defaults = {k: p.default for k, p in sig.parameters.items()
                if p.default is not inspect.Parameter.empty}
    assert defaults == {"spatial_scale": 1.0, "sampling_ratio": -1, "aligned": False}


# ---------------------------------------------------------------- oracle


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@given(case=cases())
def test_matches_oracle_random_boxes(device, dtype, layout, aligned, case):
    _run_case(case, device, dtype, layout, aligned, "random")


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@given(case=cases(adversarial=True), layout=st.sampled_from(LAYOUTS))
def test_matches_oracle_adversarial_boxes(device, dtype, aligned, case, layout):
    _run_case(case, device, dtype, layout, aligned, "adversarial")


# Hand-picked boxes (image units for spatial_scale 1, map 5x6) whose sample
# positions or edges hit every special case of the tap rule exactly.
EXPLICIT_ROWS = [
    (0, -2.0, -2.0, 0.0, 0.0),        # single samples at exactly -1: contribute, clamped to 0
    (0, 5.0, 4.0, 7.0, 6.0),          # samples at exactly W and H: contribute, clamped
    (0, -3.0, 1.0, -1.0, 3.0),        # x samples at -2: nothing
    (0, 0.0, 0.0, 6.0, 5.0),          # the whole map
    (0, 2.0, 2.0, 2.0, 2.0),          # zero size
    (0, 3.0, 3.0, 1.0, 1.0),          # inverted
    (0, -10.0, -10.0, -5.0, -5.0),    # above-left of the map
    (0, 10.0, 10.0, 20.0, 20.0),      # below-right of the map
    (1, -1e6, -1e6, 1e6, 1e6),        # huge: millions of adaptive samples, ~8 on the map
    (1, 2.0, -1e6, 3.0, 1e6),         # huge along one axis
    (1, 5e5, 0.0, 1e6, 5.0),          # huge and far away
    (1, 4.5, 3.5, 5.5, 4.5),          # half-pixel edges (integers once aligned)
    (1, -0.5, -0.5, 5.5, 4.5),
    (1, 0.25, 0.75, 0.25, 3.75),      # zero width, finite height
    (1, 5.0, 4.0, 5.0, 4.0),          # a point on the last pixel
    (0, 1.0, 1.0, 1.0 + 1e-6, 2.0),   # nearly zero width
]


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2])
@pytest.mark.parametrize("pooled", [(1, 1), (2, 3)])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.125])
def test_matches_oracle_explicit_adversarial_boxes(device, dtype, aligned, sampling_ratio,
                                                   pooled, spatial_scale):
    gen = make_generator(7)
    rows = [(b, *(c if abs(c) >= 5e5 else c / spatial_scale for c in r)) for b, *r in EXPLICIT_ROWS]
    lo = lay_out(randn((2, 3, 5, 6), gen), dtype, device, "contiguous")
    boxes = make_boxes(rows, 2, "tensor", torch.float32, device)
    check_roi_align(lo, boxes, pooled, spatial_scale, sampling_ratio, aligned, gen)


def test_huge_boxes_do_not_hang(device):
    # a loop over every adaptive sample would take hours: run it in a child
    # process so a regression fails here instead of hanging the suite
    # Past ~1e10 pixels, thousands of samples round onto each position near
    # the map (float32 sample indices, float32 coordinates): such a box is
    # refused by name (docs/ops.md, "Bounded work"); smaller ones compute.
    code = textwrap.dedent(f"""
        import torch, roi_ops
        x = torch.randn(2, 3, 8, 8, device="{device}", requires_grad=True)
        for big in (1e6, 1e8, 1e12, 3e38):
            for dtype in (torch.float32, torch.float64):
                boxes = torch.tensor([[0, -big, -big, big, big], [1, 2.0, -big, 3.0, big],
                                      [1, -big, 0.5, big, 7.0]], device="{device}", dtype=dtype)
                for aligned in (False, True):
                    try:
                        out = roi_ops.roi_align(x, boxes, (2, 3), 0.5, -1, aligned)
                    except ValueError as e:
                        assert big >= 1e12 and "samples of one bin land on the feature map" in str(e), e
                        continue
                    out.backward(torch.ones_like(out))
                    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all(), big
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_box_formats_give_identical_results(device, dtype):
    # Tensor[K, 5], list of Tensor[K_b, 4] and float16 / float32 box dtypes all
    # lead to the same float32 coordinates, hence to bitwise the same numbers
    gen = make_generator(3)
    x = randn((2, 3, 7, 6), gen).to(device=device, dtype=dtype)
    rows = [(0, 0.5, 1.0, 4.5, 6.0), (1, 1.0, 0.0, 3.0, 2.5), (0, -1.0, 2.0, 8.0, 3.0),
            (1, 2.25, 2.5, 5.75, 6.0)]
    results = []
    for form in ("tensor", "list"):
        for bdtype in (torch.float32, torch.float16, torch.bfloat16, dtype):
            boxes = make_boxes(rows, 2, form, bdtype, device)
            out = roi_ops.roi_align(x, boxes, (3, 2), 0.5, 2, True)
            if form == "list":  # list order is by image: compare in row order
                order = sorted(range(len(rows)), key=lambda i: rows[i][0])
                out = out[torch.argsort(torch.tensor(order, device=device))]
            results.append(((form, bdtype), out))
    for key, out in results[1:]:
        assert torch.equal(out, results[0][1]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_layouts_give_the_same_numbers(device, dtype):
    gen = make_generator(11)
    values = randn((2, 5, 9, 8), gen)
    boxes = torch.tensor([[0, 0.3, 0.7, 6.2, 8.1], [1, 2.0, 1.5, 3.5, 7.0], [1, -2.0, -1.0, 9.0, 4.0],
                          [0, 1.1, 1.2, 5.3, 5.4]] * 4, dtype=dtype, device=device)
    g = randn((16, 5, 3, 4), gen).to(device=device, dtype=dtype)
    assert_layouts_bitwise_equal(lambda x: roi_ops.roi_align(x, boxes, (3, 4), 1.0, -1, True), values, dtype, device, g)


def test_output_memory_format_follows_input(device):
    x = torch.randn(2, 4, 6, 5, device=device)
    boxes = torch.tensor([[0, 0.0, 0.0, 4.0, 5.0], [1, 1.0, 1.0, 3.0, 3.0]], device=device)
    assert roi_ops.roi_align(x, boxes, (2, 3)).is_contiguous()
    out = roi_ops.roi_align(x.contiguous(memory_format=torch.channels_last), boxes, (2, 3))
    assert out.is_contiguous(memory_format=torch.channels_last)
    sliced = x[:, :, ::2, 1:]
    assert roi_ops.roi_align(sliced, boxes, (2, 3)).is_contiguous()


def test_token_major_input_is_not_copied(device):
    assert_native(device)
    B, H, W, C = 2, 7, 9, 5
    hs = torch.randn(B, H * W, C, device=device, requires_grad=True)
    x = hs.view(B, H, W, C).permute(0, 3, 1, 2)
    assert x.data_ptr() == hs.data_ptr()
    boxes = torch.tensor([[0, 0.5, 0.5, 6.0, 5.0], [1, 2.0, 1.0, 8.0, 6.5], [1, 0.0, 0.0, 9.0, 7.0]],
                         device=device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        out = roi_ops.roi_align(x, boxes, (3, 3), 1.0, 2, True)
        out.backward(torch.ones_like(out))
    copies = [(e.name, e.input_shapes) for e in prof.events()
              if e.name in ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::contiguous")
              and any(list(s) in ([B, C, H, W], [B, H * W, C], [B, H, W, C]) for s in e.input_shapes)]
    assert not copies, f"the [B, H*W, C] features were copied: {copies}"


# ---------------------------------------------------------------- empty


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape, boxes_kind, expected", [
    ((2, 3, 5, 6), "no_rows_tensor", (0, 3, 2, 4)),
    ((2, 3, 5, 6), "no_rows_list", (0, 3, 2, 4)),
    ((2, 0, 5, 6), "two_rows", (2, 0, 2, 4)),
    ((0, 3, 5, 6), "no_rows_tensor", (0, 3, 2, 4)),
    ((0, 3, 5, 6), "empty_list", (0, 3, 2, 4)),
])
def test_empty_cases(device, dtype, layout, shape, boxes_kind, expected):
    x = torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    boxes = {
        "no_rows_tensor": torch.zeros(0, 5, device=device),
        "no_rows_list": [torch.zeros(0, 4, device=device) for _ in range(shape[0])],
        "two_rows": torch.tensor([[0, 0.0, 0.0, 3.0, 3.0], [1, 1.0, 1.0, 4.0, 2.0]], device=device),
        "empty_list": [],
    }[boxes_kind]
    out = roi_ops.roi_align(x, boxes, (2, 4), 0.5, 2, True)
    assert tuple(out.shape) == expected and out.dtype == dtype
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert torch.equal(x.grad, torch.zeros_like(x))


# ---------------------------------------------------------------- module


def test_module_repr_and_forward(device):
    m = roi_ops.RoIAlign((3, 4), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    text = repr(m)
    assert text.startswith("RoIAlign(")
    for part in ("output_size=(3, 4)", "spatial_scale=0.5", "sampling_ratio=2", "aligned=True"):
        assert part in text, text
    assert list(m.parameters()) == [] and m.state_dict() == {}
    x = torch.randn(2, 3, 8, 8, device=device)
    boxes = [torch.tensor([[1.0, 2.0, 9.0, 12.0]], device=device),
             torch.tensor([[0.0, 0.0, 16.0, 16.0], [3.5, 2.5, 4.0, 8.0]], device=device)]
    assert torch.equal(m(x, boxes), roi_ops.roi_align(x, boxes, (3, 4), 0.5, 2, True))
    d = roi_ops.RoIAlign(5)
    assert "output_size=5" in repr(d) and "sampling_ratio=-1" in repr(d) and "aligned=False" in repr(d)
    assert torch.equal(d(x, rois_of(boxes).float()), roi_ops.roi_align(x, boxes, 5))
