"""The spec's properties, each checked on the native kernels without the oracle:
partition of unity, half-open coverage (tiling), exact inverse on affine
fields, the adjoint identity, linearity, and locality."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import roi_ops
from helpers import (
    AXIS_MODES_ADVERSARIAL, DEVICES, FLOAT_DTYPES, TOLERANCES, box_rows, boxes_dtype_of, cases,
    coord_dtype_for, dtype_id, make_boxes, make_generator, randn, rois_of,
)

pytestmark = pytest.mark.parametrize("device", DEVICES)


def feature_frame(rois: torch.Tensor, spatial_scale: float, aligned: bool, dtype: torch.dtype):
    """(x1', y1', rw, rh) per the spec, in `dtype` and the spec's expression order."""
    r = rois.to(dtype)
    s = torch.tensor(spatial_scale, dtype=dtype, device=rois.device)
    off = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (r[:, i] * s - off for i in (1, 2, 3, 4))
    rw, rh = x2 - x1, y2 - y1
    if not aligned:
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    return x1, y1, rw, rh


def spec_coverage(rois, size_hw, spatial_scale, aligned, dtype) -> torch.Tensor:
    """Tensor[K, H, W] bool: y1' <= h < y1' + rh and x1' <= w < x1' + rw."""
    H, W = size_hw
    x1, y1, rw, rh = feature_frame(rois, spatial_scale, aligned, dtype)
    h = torch.arange(H, dtype=dtype, device=rois.device)
    w = torch.arange(W, dtype=dtype, device=rois.device)
    cov_y = (y1[:, None] <= h) & (h < (y1 + rh)[:, None])
    cov_x = (x1[:, None] <= w) & (w < (x1 + rw)[:, None])
    return cov_y[:, :, None] & cov_x[:, None, :]


def grid_coordinate(rois, size_hw, pooled, spatial_scale, aligned, dtype):
    """(v: Tensor[K, H], u: Tensor[K, W]): each pixel's grid coordinate, in
    `dtype` and the spec's expression order ((h - y1') * PH) / rh - 0.5."""
    H, W = size_hw
    x1, y1, rw, rh = feature_frame(rois, spatial_scale, aligned, dtype)
    h = torch.arange(H, dtype=dtype, device=rois.device)
    w = torch.arange(W, dtype=dtype, device=rois.device)
    v = ((h[None] - y1[:, None]) * pooled[0]) / rh[:, None] - 0.5
    u = ((w[None] - x1[:, None]) * pooled[1]) / rw[:, None] - 0.5
    return v, u


# ---------------------------------------------------------------- 1. partition of unity


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@given(case=cases(adversarial=True, max_per_image=4, max_size=9))
def test_partition_of_unity(device, dtype, aligned, case):
    # a constant grid c pastes back as c on every covered pixel and exactly 0
    # elsewhere: no dark rim, no leak outside the box
    gen = make_generator(case.seed)
    K, C = len(case.rows), case.channels
    H, W = case.height, case.width
    boxes = make_boxes(case.rows, case.batch, case.boxes_form, case.boxes_dtype or dtype, device)
    rois = rois_of(boxes).to(device)
    consts = (torch.rand((K, C), generator=gen, dtype=torch.float64) * 3 + 0.5)
    consts = (consts * torch.where(torch.rand((K, C), generator=gen) < 0.5, -1.0, 1.0)).to(dtype)
    grid = consts[:, :, None, None].expand(K, C, *case.pooled).contiguous().to(device)
    out = roi_ops.roi_unpool(grid, boxes, (H, W), case.spatial_scale, aligned)
    covered = spec_coverage(rois, (H, W), case.spatial_scale, aligned,
                            coord_dtype_for(dtype, boxes_dtype_of(boxes)))
    nonzero = out != 0
    expected_nonzero = covered[:, None].expand(K, C, H, W)
    assert torch.equal(nonzero, expected_nonzero), (
        f"pixels nonzero != covered pixels: {torch.nonzero(nonzero != expected_nonzero)[:5].tolist()}")
    rtol, atol = TOLERANCES[dtype]
    c = consts.to(device, torch.float64)[:, :, None, None].expand(K, C, H, W)
    err = (out.to(torch.float64) - c).abs()[expected_nonzero]
    allowed = (rtol * c.abs() + atol)[expected_nonzero]
    assert bool((err <= allowed).all()), f"covered pixels off the constant by up to {err.max()}"


@st.composite
def tiling(draw, size: int, aligned: bool):
    """Cut points (feature frame, multiples of 1/4: exact in every dtype) of
    intervals that tile [first, last) with first <= 0 and last > size - 1."""
    first = draw(st.sampled_from([0.0, -0.25, -0.75, -2.0]))
    last = draw(st.sampled_from([size - 0.75, size - 0.5, float(size), size + 3.0]))
    lo, hi = int(first * 4) + 1, int(last * 4) - 1
    inner = draw(st.lists(st.integers(lo, hi), max_size=4, unique=True)) if lo <= hi else []
    cuts = [first] + sorted(q / 4 for q in inner) + [last]
    if not aligned:
        # torchvision's max(size, 1) rule widens a narrower box to the right,
        # over its neighbour: keep every tile but the last one pixel wide
        kept = [cuts[0]]
        for c in cuts[1:-1]:
            if c - kept[-1] >= 1:
                kept.append(c)
        cuts = kept + [last]
    return cuts


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
@given(data=st.data())
def test_tiling_boxes_cover_every_pixel_exactly_once(device, dtype, aligned, data):
    H = data.draw(st.integers(1, 9), label="H")
    W = data.draw(st.integers(1, 9), label="W")
    scale = data.draw(st.sampled_from([1.0, 0.5, 0.125]), label="spatial_scale")
    ys = data.draw(tiling(H, aligned), label="y cuts")
    xs = data.draw(tiling(W, aligned), label="x cuts")
    off = 0.5 if aligned else 0.0
    img = lambda f: (f + off) / scale  # noqa: E731  feature frame -> image units, exact
    rows = [(0, img(x0), img(y0), img(x1), img(y1))
            for y0, y1 in zip(ys, ys[1:]) for x0, x1 in zip(xs, xs[1:])]
    boxes = torch.tensor(rows, dtype=dtype, device=device)
    pooled = data.draw(st.sampled_from([(1, 1), (2, 3), (3, 2)]), label="pooled")
    grid = torch.ones((len(rows), 1, *pooled), dtype=dtype, device=device)
    out = roi_ops.roi_unpool(grid, boxes, (H, W), scale, aligned)
    count = (out[:, 0] != 0).sum(0)
    assert torch.equal(count, torch.ones_like(count)), f"cover counts:\n{count}"


# ---------------------------------------------------------------- 2. affine exactness


@st.composite
def affine_case(draw):
    """Boxes whose ROI-Align samples (sampling_ratio=1, aligned=True) all lie
    in [0, H-1] x [0, W-1], with at least a pixel of grid coordinates inside."""
    batch = draw(st.integers(1, 2))
    H, W = draw(st.integers(3, 9)), draw(st.integers(3, 9))
    PH, PW = draw(st.integers(2, 5)), draw(st.integers(2, 5))
    scale = draw(st.sampled_from([1.0, 0.5]))
    margin = 1e-3

    def axis(size, pooled):
        # first and last sample positions s0 < s1, at least a pixel apart
        s0 = draw(st.floats(margin, size - 2 - margin))
        # min(): s0 + 1 can round above the upper bound when s0 is drawn at its own
        s1 = draw(st.floats(min(s0 + 1, size - 1 - margin), size - 1 - margin))
        step = (s1 - s0) / (pooled - 1)
        start = s0 - 0.5 * step
        return (start + 0.5) / scale, (start + pooled * step + 0.5) / scale

    rows = []
    for b in range(batch):
        for _ in range(draw(st.integers(1, 3))):
            x1, x2 = axis(W, PW)
            y1, y2 = axis(H, PH)
            rows.append((b, x1, y1, x2, y2))
    return batch, H, W, (PH, PW), scale, rows, draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@given(case=affine_case())
def test_align_then_unpool_is_exact_on_affine_fields(device, dtype, case):
    batch, H, W, pooled, scale, rows, seed = case
    gen = make_generator(seed)
    C = 3
    coef = randn((3, batch, C), gen)  # f = a + b*y + c*x per image and channel
    yy = torch.arange(H, dtype=torch.float64)[:, None]
    xx = torch.arange(W, dtype=torch.float64)[None, :]
    field = coef[0, :, :, None, None] + coef[1, :, :, None, None] * yy + coef[2, :, :, None, None] * xx
    boxes = torch.tensor(rows, dtype=dtype, device=device)
    x = field.to(device=device, dtype=dtype)
    crops = roi_ops.roi_align(x, boxes, pooled, scale, sampling_ratio=1, aligned=True)
    back = roi_ops.roi_unpool(crops, boxes, (H, W), scale, aligned=True)

    rois = rois_of(boxes)
    covered = spec_coverage(rois, (H, W), scale, True, torch.float64)
    v, u = grid_coordinate(rois, (H, W), pooled, scale, True, torch.float64)
    inside = ((v >= 0) & (v <= pooled[0] - 1))[:, :, None] & ((u >= 0) & (u <= pooled[1] - 1))[:, None, :]
    check = (covered & inside).cpu()
    # by construction [s0, s1] holds a whole pixel; rounding of the box can
    # only push one exactly on an end out
    assume(bool(check.any(dim=(1, 2)).all()))
    batch_idx = rois[:, 0].long().cpu()
    expected = field[batch_idx]  # [K, C, H, W]
    magnitude = coef.abs()[0] + coef.abs()[1] * H + coef.abs()[2] * W  # [B, C]
    tol = TOLERANCES[dtype][0] * magnitude[batch_idx][:, :, None, None]
    err = (back.to("cpu", torch.float64) - expected).abs()
    mask = check[:, None].expand_as(err)
    bad = mask & (err > tol)
    assert not bool(bad.any()), (
        f"{int(bad.sum())} pixels off the affine field, worst {err[mask].max().item()} "
        f"(tolerance {tol.max().item()})")


# ---------------------------------------------------------------- 3. adjoint identity


def _random_boxes(draw, batch, H, W, scale, dtype):
    counts = draw(st.lists(st.integers(0, 4), min_size=batch, max_size=batch))
    return draw(box_rows(counts, H, W, scale, AXIS_MODES_ADVERSARIAL, 1e6 if dtype != torch.float16 else 6e4))


@pytest.mark.parametrize("op", ["roi_align", "roi_unpool"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=dtype_id)
@given(data=st.data())
def test_adjoint_identity(device, dtype, aligned, op, data):
    # <A x, g> == <x, A^T g> with A^T g what autograd returns
    batch, C = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    H, W = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    PH, PW = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    scale = data.draw(st.sampled_from([1.0, 0.5, 0.125]))
    sr = data.draw(st.sampled_from([-1, 1, 2]))
    rows = _random_boxes(data.draw, batch, H, W, scale, dtype)
    gen = make_generator(data.draw(st.integers(0, 2**31 - 1)))
    boxes = torch.tensor(rows, dtype=dtype, device=device).reshape(-1, 5)
    K = len(rows)
    if op == "roi_align":
        shape = (batch, C, H, W)
        apply = lambda t: roi_ops.roi_align(t, boxes, (PH, PW), scale, sr, aligned)  # noqa: E731
    else:
        shape = (K, C, PH, PW)
        apply = lambda t: roi_ops.roi_unpool(t, boxes, (H, W), scale, aligned)  # noqa: E731
    x = randn(shape, gen).to(device=device, dtype=dtype).requires_grad_()
    out = apply(x)
    g = randn(out.shape, gen).to(device=device, dtype=dtype)
    (atg,) = torch.autograd.grad(out, x, g)
    lhs = (out.double() * g.double()).sum().item()
    rhs = (x.detach().double() * atg.double()).sum().item()
    with torch.no_grad():
        magnitude = (apply(x.detach().abs()).double() * g.double().abs()).sum().item()
    rtol, _ = TOLERANCES[dtype]
    assert abs(lhs - rhs) <= 2 * rtol * magnitude + 1e-300, (lhs, rhs, magnitude)


# ---------------------------------------------------------------- 4. linearity, locality


@pytest.mark.parametrize("op", ["roi_align", "roi_unpool"])
@pytest.mark.parametrize("aligned", [False, True])
@given(data=st.data())
def test_linearity(device, aligned, op, data):
    dtype = torch.float64
    batch, C = 2, 2
    H, W = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 8))
    rows = _random_boxes(data.draw, batch, H, W, 0.5, dtype)
    boxes = torch.tensor(rows, dtype=dtype, device=device).reshape(-1, 5)
    gen = make_generator(data.draw(st.integers(0, 2**31 - 1)))
    shape = (batch, C, H, W) if op == "roi_align" else (len(rows), C, 3, 2)
    if op == "roi_align":
        apply = lambda t: roi_ops.roi_align(t, boxes, (3, 2), 0.5, -1, aligned)  # noqa: E731
    else:
        apply = lambda t: roi_ops.roi_unpool(t, boxes, (H, W), 0.5, aligned)  # noqa: E731
    x, y = randn(shape, gen).to(device), randn(shape, gen).to(device)
    a, b = 1.7, -0.3
    lhs = apply(a * x + b * y)
    rhs = a * apply(x) + b * apply(y)
    bound = abs(a) * apply(x.abs()) + abs(b) * apply(y.abs())
    assert bool(((lhs - rhs).abs() <= 4 * TOLERANCES[dtype][0] * bound).all())


def _align_support(rois, H, W, scale, aligned):
    """Per ROI, the rectangle of pixels its samples may read: Tensor[K, H, W] bool
    (widened by a pixel on every side: rounding cannot leave it)."""
    x1, y1, rw, rh = feature_frame(rois, scale, aligned, torch.float64)
    masks = []
    for k in range(rois.shape[0]):
        def span(start, extent, size):
            lo = min(start, start + extent)
            hi = max(start, start + extent)
            idx = torch.arange(size, dtype=torch.float64)
            return (idx >= math.floor(lo) - 1) & (idx <= math.ceil(hi) + 1)
        sy = span(y1[k].item(), rh[k].item(), H)
        sx = span(x1[k].item(), rw[k].item(), W)
        masks.append(sy[:, None] & sx[None, :])
    return torch.stack(masks) if masks else torch.zeros((0, H, W), dtype=torch.bool)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@given(data=st.data())
def test_align_locality(device, dtype, aligned, layout, data):
    # ROI k reads only its own image, near its box: changing any other pixel,
    # or any other box, leaves its output bitwise unchanged, and its gradient
    # is exactly 0 outside that region
    batch, C, H, W = 3, 2, data.draw(st.integers(2, 9)), data.draw(st.integers(2, 9))
    scale = data.draw(st.sampled_from([1.0, 0.5]))
    counts = data.draw(st.lists(st.integers(0, 3), min_size=batch, max_size=batch))
    assume(sum(counts) > 0)
    rows = data.draw(box_rows(counts, H, W, scale, ("inside", "random", "edge", "tiny", "inverted"), 1e6))
    sr = data.draw(st.sampled_from([-1, 1, 2]))
    gen = make_generator(data.draw(st.integers(0, 2**31 - 1)))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    boxes = torch.tensor(rows, dtype=dtype, device=device)
    x = randn((batch, C, H, W), gen).to(device, dtype).contiguous(memory_format=fmt)
    out = roi_ops.roi_align(x, boxes, (2, 3), scale, sr, aligned)
    support = _align_support(rois_of(boxes).cpu(), H, W, scale, aligned).to(device)
    for k, row in enumerate(rows):
        b = int(row[0])
        reads = torch.zeros((batch, 1, H, W), dtype=torch.bool, device=device)
        reads[b, 0] = support[k]
        noise = randn((batch, C, H, W), gen).to(device, dtype) * 10
        perturbed = torch.where(reads, x, x + noise).contiguous(memory_format=fmt)
        out_p = roi_ops.roi_align(perturbed, boxes, (2, 3), scale, sr, aligned)
        assert torch.equal(out_p[k], out[k]), f"ROI {k} read pixels outside its box or image"
        alone = roi_ops.roi_align(x, boxes[k:k + 1], (2, 3), scale, sr, aligned)
        assert torch.equal(alone[0], out[k]), f"ROI {k} depends on other boxes"
        xg = x.detach().requires_grad_()
        g = torch.zeros_like(out)
        g[k] = randn(out[k].shape, gen).to(device, dtype)
        (grad,) = torch.autograd.grad(roi_ops.roi_align(xg, boxes, (2, 3), scale, sr, aligned), xg, g)
        assert not bool((grad != 0)[~reads.expand_as(grad)].any()), f"ROI {k} wrote gradient outside its box"


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
@given(data=st.data())
def test_unpool_locality(device, dtype, aligned, data):
    # a grid cell reaches only the pixels whose bilinear footprint holds it;
    # other ROIs' grids never reach ROI k's map
    H, W = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    PH, PW = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    scale = data.draw(st.sampled_from([1.0, 0.5]))
    rows = data.draw(box_rows([data.draw(st.integers(1, 4))], H, W, scale,
                              ("inside", "random", "edge", "tiny"), 1e6))
    gen = make_generator(data.draw(st.integers(0, 2**31 - 1)))
    boxes = torch.tensor(rows, dtype=dtype, device=device)
    K, C = len(rows), 2
    x = randn((K, C, PH, PW), gen).to(device, dtype)
    out = roi_ops.roi_unpool(x, boxes, (H, W), scale, aligned)
    rois = rois_of(boxes).cpu()
    cd = coord_dtype_for(dtype, dtype)
    covered = spec_coverage(rois, (H, W), scale, aligned, cd).to(device)
    # the kernel's own grid coordinates (same dtype and expression order), so
    # which cells a pixel reads is known exactly
    v, u = grid_coordinate(rois, (H, W), (PH, PW), scale, aligned, cd)
    vc = v.clamp(min=0).clamp(max=PH - 1).to(device)
    uc = u.clamp(min=0).clamp(max=PW - 1).to(device)

    def reads(c, i, pooled):
        lo = c.floor()
        hi = (lo + 1).clamp(max=pooled - 1)
        return (lo == i) | ((hi == i) & (c > lo))
    for k in range(K):
        others = x.clone()
        others[torch.arange(K, device=device) != k] += 5.0
        assert torch.equal(roi_ops.roi_unpool(others, boxes, (H, W), scale, aligned)[k], out[k])
        alone = roi_ops.roi_unpool(x[k:k + 1], boxes[k:k + 1], (H, W), scale, aligned)
        assert torch.equal(alone[0], out[k]), f"ROI {k} depends on other boxes"
        i = data.draw(st.integers(0, PH - 1))
        j = data.draw(st.integers(0, PW - 1))
        bumped = x.clone()
        bumped[k, :, i, j] += 4.0
        changed = (roi_ops.roi_unpool(bumped, boxes, (H, W), scale, aligned)[k] != out[k]).any(0)
        may = covered[k] & reads(vc[k], i, PH)[:, None] & reads(uc[k], j, PW)[None, :]
        # both 1-D weights >= 1/2 there: a change of at least 1 must show
        must = covered[k] & ((vc[k] - i).abs() <= 0.5)[:, None] & ((uc[k] - j).abs() <= 0.5)[None, :]
        assert not bool((changed & ~may).any()), f"cell ({i}, {j}) of ROI {k} reached pixels it does not cover"
        assert not bool((must & ~changed).any()), f"cell ({i}, {j}) of ROI {k} missing where it dominates"
