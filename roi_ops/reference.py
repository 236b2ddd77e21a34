"""Pure-PyTorch reference implementations of the roi-ops operators.

This module is the test oracle (exact to float64 rounding) and the portable
fallback on devices without native kernels. Everything is plain ``torch`` ops,
so it runs on any device and autograd supplies the backward.

Both ops are separable: a 2-D bilinear weight is the product of two 1-D taps.
They are computed as dense per-ROI 1-D interpolation matrices contracted with
``einsum``:

* ROI-Align: ``out[k] = My[k] @ input[b_k] @ Mx[k]^T`` with ``My: [K, PH, H]``
  (summed 1-D tap weights of each bin's samples, divided by the samples per
  bin) and ``Mx: [K, PW, W]``; images are visited one at a time, so the
  largest intermediate is ``[K_b, C, PH, W]`` (or ``[K_b, C, H, PW]``), built a
  bounded number of ROIs at a time.
* ROI-Unpool: ``out[k] = Wy[k] @ input[k] @ Wx[k]^T`` with ``Wy: [K, H, PH]``
  and ``Wx: [K, W, PW]``; rows of uncovered pixels are zero.

Box arithmetic follows the expression order of ``csrc/common/roi_math.h``
(see ``docs/spec.md``) in the coordinate dtype, so every floor, ceil and
border test falls exactly where the native kernels put it.

Because the contraction is dense, a non-finite feature value reaches every
output of its ROI (or, for ROI-Align, of every ROI on its image) as NaN,
whereas the native kernels only read the cells a sample touches.
"""

from __future__ import annotations

import math
import struct
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

__all__ = [
    "roi_align",
    "roi_unpool",
    "roi_unpool_blend",
    "roi_unpool_coverage",
    "roi_unpool_footprint",
    "footprint_crops",
    "roi_align_matrices",
    "roi_unpool_matrices",
    "coord_dtype_for",
    "accumulate_dtype_for",
    "MAX_SAMPLES_PER_BIN",
    "MAX_SAMPLING_RATIO",
    "MAX_OUTPUT_SIDE",
    "align_visit_limit",
    "check_spatial_scale",
    "check_roi_geometry",
]

# Adaptive grids wider than this many samples per bin are clamped; must equal
# kMaxSamplesPerBin in csrc/common/roi_math.h. Only boxes ~10^12 pixels wide
# are affected.
MAX_SAMPLES_PER_BIN = 1 << 40

# Largest explicit sampling_ratio; must equal kMaxSamplingRatio.
MAX_SAMPLING_RATIO = 1024

# Largest side of a grid or map an op allocates from a size argument; must
# equal kMaxOutputSide.
MAX_OUTPUT_SIDE = 1 << 16


def align_visit_limit(size: int) -> int:
    """Most samples of one ROI-Align bin that may land on an axis of ``size``
    pixels (mirror of math::align_visit_limit): an adaptive grid puts at most
    ``2 * size + 3`` there, an explicit one at most MAX_SAMPLING_RATIO; more
    means coordinates too large for the coordinate dtype to separate samples."""
    return max(MAX_SAMPLING_RATIO, 2 * size + 8)

# Samples enumerated per chunk when building the ROI-Align matrices (bounds the
# temporary memory whatever the box size).
_SAMPLE_CHUNK_ELEMENTS = 1 << 20

# Largest ROI-Align intermediate ([k, C, PH, W] or [k, C, H, PW]) built at once.
_CONTRACT_CHUNK_ELEMENTS = 1 << 24


def coord_dtype_for(*tensors: Tensor) -> torch.dtype:
    """dtype of the box arithmetic: float64 if any tensor is float64, else float32.

    Call it as ``coord_dtype_for(input, rois)`` (the native kernels' rule).
    """
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def accumulate_dtype_for(*tensors: Tensor) -> torch.dtype:
    """dtype of the accumulation: float64 if any tensor is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _resolve_coord_dtype(coord_dtype: Optional[torch.dtype], *tensors: Tensor) -> torch.dtype:
    if coord_dtype is None:
        return coord_dtype_for(*tensors)
    if coord_dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"coord_dtype must be torch.float32, torch.float64 or None, got {coord_dtype}"
        )
    return coord_dtype


def _memory_format_of(t: Tensor) -> torch.memory_format:
    # The native kernels' rule (Tensor::suggest_memory_format on the strides),
    # not "is_contiguous first": a [B, C, 1, 1] token-major view is both
    # contiguous and channels_last, and its results must come out
    # channels_last like the native ones (and the fake kernels').
    if t.dim() == 4:
        return suggest_memory_format(t)
    return torch.contiguous_format


def _empty_result(source: Tensor, shape, dtype: torch.dtype) -> Tensor:
    # Zeros that stay attached to the graph, so backward of an empty result
    # gives zero gradients instead of "does not require grad".
    return torch.zeros(shape, dtype=dtype, device=source.device) + source.reshape(-1)[:0].sum().to(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_spatial_scale(op: str, spatial_scale: float, coord: torch.dtype) -> None:
    """spatial_scale must stay positive and finite once cast to the coordinate
    dtype (1e-50 is 0 and 1e39 is inf in float32); mirror of the C++ check."""
    in_coord = float(spatial_scale)
    if coord != torch.float64:
        # the C cast to float, in pure Python (no tensor, so no host read-back in traced or profiled code)
        try:
            in_coord = struct.unpack("f", struct.pack("f", in_coord))[0]
        except OverflowError:
            in_coord = math.copysign(math.inf, in_coord)
    if not (math.isfinite(in_coord) and in_coord > 0):
        raise ValueError(
            f"{op}: spatial_scale must be positive and finite in the coordinate dtype "
            f"{_dtype_name(coord)}, got {spatial_scale!r} ({in_coord!r} in {_dtype_name(coord)})"
        )


def _mapped_edges(rois: Tensor, spatial_scale: float, aligned: bool, coord: torch.dtype):
    """(x1', y1', x2', y2'), each Tensor[K] in the coordinate dtype (math::map_edges)."""
    box = rois[:, 1:5].detach().to(coord)
    scale = torch.tensor(spatial_scale, dtype=coord, device=rois.device)
    offset = 0.5 if aligned else 0.0
    return tuple(box[:, i] * scale - offset for i in range(4))


def check_roi_geometry(op: str, rois: Tensor, spatial_scale: float, aligned: bool,
                       coord: torch.dtype) -> None:
    """Every box's mapped edges and extent are finite in the coordinate dtype
    (math::roi_frame_finite); raises ValueError naming the first box that is not."""
    if rois.shape[0] == 0:
        return
    x1, y1, x2, y2 = _mapped_edges(rois, spatial_scale, aligned, coord)
    parts = torch.stack([x1, y1, x2, y2, x2 - x1, y2 - y1], dim=1)
    bad = ~torch.isfinite(parts).all(1)
    if bool(bad.any()):
        k = int(bad.nonzero()[0, 0])
        e = [float(v) for v in parts[k].tolist()]
        raise ValueError(
            f"{op}: rois[{k}] = {tuple(float(v) for v in rois[k].tolist())} is not a finite box "
            f"in the feature frame: with spatial_scale = {spatial_scale!r} its edges are "
            f"{tuple(e[:4])} and its width and height {tuple(e[4:])} in {_dtype_name(coord)}; every edge "
            "and both extents must be finite"
        )


def _feature_frame(rois: Tensor, spatial_scale: float, aligned: bool, coord: torch.dtype,
                   op: str = "roi_ops.reference"):
    """(x1', y1', rw, rh), each Tensor[K] in the coordinate dtype; refuses
    (ValueError) a spatial_scale or a box that is not finite there."""
    check_spatial_scale(op, spatial_scale, coord)
    check_roi_geometry(op, rois, spatial_scale, aligned, coord)
    x1, y1, x2, y2 = _mapped_edges(rois, spatial_scale, aligned, coord)
    rw = x2 - x1
    rh = y2 - y1
    if not aligned:
        # torchvision's rule, written as in roi_math.h (NaN -> 1)
        one = torch.ones((), dtype=coord, device=rois.device)
        rw = torch.where(rw > 1, rw, one)
        rh = torch.where(rh > 1, rh, one)
    return x1, y1, rw, rh


def _batch_indices(rois: Tensor) -> Tensor:
    # truncation toward zero, as static_cast<int64_t>(roi[0])
    return rois[:, 0].detach().to(torch.int64)


# ------------------------------------------------------------------ ROI-Align


class _AlignAxis:
    """One axis of every ROI for ROI-Align (mirror of math::AlignAxis)."""

    def __init__(self, start: Tensor, extent: Tensor, pooled: int, sampling_ratio: int, size: int):
        coord = start.dtype
        device = start.device
        k = start.shape[0]
        self.size = size
        self.bin = extent / pooled  # [K]
        if sampling_ratio > 0:
            self.grid = torch.full((k,), sampling_ratio, dtype=torch.int64, device=device)
        else:
            g = torch.ceil(extent / pooled)
            g = torch.where(g >= 0, g, torch.zeros_like(g))  # also maps NaN to 0
            g = torch.clamp(g, max=float(MAX_SAMPLES_PER_BIN))
            self.grid = g.to(torch.int64)
        self.grid_t = self.grid.to(coord)
        p = torch.arange(pooled, dtype=coord, device=device)
        self.bin_start = start[:, None] + p[None, :] * self.bin[:, None]  # [K, P]

    def sample(self, i: Tensor) -> Tensor:
        """Position of sample i ([K, P, n] int64) of each bin, in the coordinate dtype."""
        # static_cast<T>(static_cast<float>(iy) + 0.5f): torchvision's order
        half_step = (i.to(torch.float32) + 0.5).to(self.bin.dtype)
        return self.bin_start[..., None] + (half_step * self.bin[:, None, None]) / self.grid_t[:, None, None]


def _first_true(pred, upper: Tensor) -> Tensor:
    """Smallest i in [0, upper] with pred(i) true (upper if none), elementwise.

    pred must be monotone (false ... false true ... true) in i over [0, upper).
    """
    lo = torch.zeros_like(upper)
    hi = upper.clone()
    if upper.numel() == 0:
        return lo
    steps = int(upper.max()).bit_length() + 1
    for _ in range(steps):
        active = lo < hi
        mid = lo + (hi - lo) // 2
        p = pred(mid)
        hi = torch.where(active & p, mid, hi)
        lo = torch.where(active & ~p, mid + 1, lo)
    return lo


def _contributing_range(axis: _AlignAxis) -> Tuple[Tensor, Tensor]:
    """Exact range [first, first + count) of the samples of each bin whose
    position lies in [-1, size] ([K, P] each).

    The position is a composition of monotone roundings, hence monotone in the
    sample index (non-decreasing when bin >= 0, non-increasing otherwise), so
    the set is contiguous and a binary search finds it. This is what keeps a
    box 10^6 pixels wide from enumerating millions of off-map samples.
    """
    upper = axis.grid[:, None].expand_as(axis.bin_start).contiguous()
    increasing = (axis.bin >= 0)[:, None]
    low_bound, high_bound = -1.0, float(axis.size)

    def y(i):
        return axis.sample(i[..., None])[..., 0]

    def enters(i):
        v = y(i)
        return torch.where(increasing, v >= low_bound, v <= high_bound)

    def leaves(i):
        v = y(i)
        return torch.where(increasing, v > high_bound, v < low_bound)

    first = _first_true(enters, upper)
    last = _first_true(leaves, upper)
    return first, torch.clamp(last - first, min=0)


def _align_taps(y: Tensor, size: int, valid: Tensor):
    """torchvision's 1-D bilinear tap (mirror of math::align_tap).

    Returns (lo, hi, w_lo, w_hi); invalid samples get index 0 and weight 0.
    """
    inside = valid & (y >= -1) & (y <= size)
    zero = torch.zeros((), dtype=y.dtype, device=y.device)
    y = torch.where(y <= 0, zero, y)
    low = torch.floor(y)
    top = torch.full((), size - 1, dtype=y.dtype, device=y.device)
    at_end = low >= top
    low = torch.where(at_end, top, low)
    y = torch.where(at_end, low, y)
    frac = y - low
    w_lo = torch.where(inside, 1 - frac, zero)
    w_hi = torch.where(inside, frac, zero)
    lo = torch.where(inside, low, zero).to(torch.int64)
    hi = torch.where(inside & ~at_end, lo + 1, lo)
    return lo, hi, w_lo, w_hi


def _align_matrix(axis: _AlignAxis, acc: torch.dtype, rois: Tensor, name: str) -> Tensor:
    """Dense [K, P, size] matrix: row (k, p) holds the summed tap weights of
    bin p's samples, each divided by the samples per bin.

    Refuses (ValueError naming the box) a bin with more than
    align_visit_limit(size) samples on the map, as the native host checks do."""
    k, pooled = axis.bin_start.shape
    device = axis.bin_start.device
    if k == 0 or axis.size == 0:
        return torch.zeros((k, pooled, axis.size), dtype=acc, device=device)
    first, count = _contributing_range(axis)
    limit = align_visit_limit(axis.size)
    over = (count > limit).any(1)
    if bool(over.any()):
        r = int(over.nonzero()[0, 0])
        raise ValueError(
            f"roi_align: rois[{r}] = {tuple(float(v) for v in rois[r].tolist())} is too large for "
            f"{_dtype_name(axis.bin.dtype)} coordinates: {int(count[r].max())} samples "
            f"of one bin land on the feature map along {name}, more than the limit "
            f"max({MAX_SAMPLING_RATIO}, 2 * size + 8) = {limit}, because the coordinate dtype cannot "
            "tell them apart; use float64 boxes or clip the box to the image"
        )
    m = torch.zeros((k, pooled, axis.size), dtype=acc, device=device)
    longest = int(count.max())
    if longest == 0:
        return m
    inv_grid = (1 / axis.grid.clamp(min=1).to(acc))[:, None, None]
    chunk = max(1, _SAMPLE_CHUNK_ELEMENTS // (k * pooled))
    for t0 in range(0, longest, chunk):
        t = torch.arange(t0, min(longest, t0 + chunk), dtype=torch.int64, device=device)
        i = first[..., None] + t
        valid = t < count[..., None]
        lo, hi, w_lo, w_hi = _align_taps(axis.sample(i), axis.size, valid)
        m.scatter_add_(2, lo, w_lo.to(acc) * inv_grid)
        m.scatter_add_(2, hi, w_hi.to(acc) * inv_grid)
    return m


def roi_align_matrices(
    rois: Tensor,
    input_size: Tuple[int, int],
    output_size: Tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    coord_dtype: torch.dtype = torch.float32,
    accumulate_dtype: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor]:
    """The separable form of ROI-Align: ``(My: Tensor[K, PH, H], Mx: Tensor[K, PW, W])``.

    ``roi_align(input)[k, c] == My[k] @ input[b_k, c] @ Mx[k].T``. Only samples
    whose position lies in ``[-1, size]`` are enumerated, so huge boxes cost
    no more than boxes the size of the map.
    """
    H, W = input_size
    PH, PW = output_size
    if sampling_ratio > MAX_SAMPLING_RATIO:
        raise ValueError(
            f"roi_align: sampling_ratio must be at most {MAX_SAMPLING_RATIO} samples per bin "
            f"along each axis (or <= 0 for the adaptive count), got {sampling_ratio}"
        )
    x1, y1, rw, rh = _feature_frame(rois, spatial_scale, aligned, coord_dtype, "roi_align")
    my = _align_matrix(_AlignAxis(y1, rh, PH, sampling_ratio, H), accumulate_dtype, rois, "y")
    mx = _align_matrix(_AlignAxis(x1, rw, PW, sampling_ratio, W), accumulate_dtype, rois, "x")
    return my, mx


def _contract_align(my: Tensor, image: Tensor, mx: Tensor) -> Tensor:
    """[k, C, PH, PW] = my[k] @ image[c] @ mx[k]^T, a bounded number of ROIs at a time."""
    k, ph, h = my.shape
    _, pw, w = mx.shape
    # contract the axis that leaves the smaller intermediate first
    rows_first = ph * w <= h * pw
    per_roi = image.shape[0] * (ph * w if rows_first else h * pw)
    step = max(1, _CONTRACT_CHUNK_ELEMENTS // max(1, per_roi))
    pieces = []
    for k0 in range(0, k, step):
        a, b = my[k0 : k0 + step], mx[k0 : k0 + step]
        if rows_first:
            t = torch.einsum("kph,chw->kcpw", a, image)
            pieces.append(torch.einsum("kcpw,kqw->kcpq", t, b))
        else:
            t = torch.einsum("chw,kqw->kchq", image, b)
            pieces.append(torch.einsum("kph,kchq->kcpq", a, t))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    coord_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """ROI-Align (torchvision semantics) in pure PyTorch.

    Args:
        input: Tensor[B, C, H, W], any floating dtype.
        rois: Tensor[K, 5] of validated rows (batch_index, x1, y1, x2, y2).
        output_size: (PH, PW).
        spatial_scale: factor from box coordinates to feature pixels.
        sampling_ratio: samples per bin along each axis; <= 0 means adaptive
            (ceil of the bin size).
        aligned: shift the box by -0.5 pixel (pixel centres at integers).
        coord_dtype: dtype of the box arithmetic; None picks
            ``coord_dtype_for(input, rois)``.

    Returns:
        Tensor[K, C, PH, PW] in input's dtype and memory format.
    """
    PH, PW = (int(s) for s in output_size)
    B, C, H, W = input.shape
    K = rois.shape[0]
    coord = _resolve_coord_dtype(coord_dtype, input, rois)
    acc = accumulate_dtype_for(input)
    fmt = _memory_format_of(input)
    if K == 0 or C == 0 or H == 0 or W == 0:
        return _empty_result(input, (K, C, PH, PW), acc).to(input.dtype).contiguous(memory_format=fmt)

    my, mx = roi_align_matrices(
        rois, (H, W), (PH, PW), spatial_scale, sampling_ratio, aligned, coord, acc
    )
    batch = _batch_indices(rois)
    images = torch.unique(batch).tolist()
    if len(images) == 1:
        out = _contract_align(my, input[images[0]].to(acc), mx)
    else:
        pieces, order = [], []
        for b in images:
            sel = torch.nonzero(batch == b).squeeze(1)
            pieces.append(_contract_align(my[sel], input[b].to(acc), mx[sel]))
            order.append(sel)
        perm = torch.cat(order)
        out = torch.cat(pieces).index_select(0, torch.argsort(perm))
    return out.to(input.dtype).contiguous(memory_format=fmt)


# ----------------------------------------------------------------- ROI-Unpool


def _unpool_axis(start: Tensor, extent: Tensor, pooled: int, size: int):
    """Coverage [K, size] and the 1-D taps (mirror of math::unpool_tap)."""
    coord = start.dtype
    pix = torch.arange(size, dtype=coord, device=start.device)[None, :]
    end = start + extent
    covered = (start[:, None] <= pix) & (pix < end[:, None])
    v = ((pix - start[:, None]) * pooled) / extent[:, None] - 0.5
    zero = torch.zeros((), dtype=coord, device=start.device)
    v = torch.where(covered, v, zero)  # keeps NaN/inf of uncovered pixels out of the indices
    vc = torch.clamp(v, min=0, max=pooled - 1)
    lo_f = torch.floor(vc)
    frac = vc - lo_f
    lo = lo_f.to(torch.int64)
    hi = torch.clamp(lo + 1, max=pooled - 1)
    w_lo = torch.where(covered, 1 - frac, zero)
    w_hi = torch.where(covered, frac, zero)
    return covered, lo, hi, w_lo, w_hi


def _unpool_matrix(start: Tensor, extent: Tensor, pooled: int, size: int, acc: torch.dtype):
    covered, lo, hi, w_lo, w_hi = _unpool_axis(start, extent, max(pooled, 1), size)
    m = torch.zeros((start.shape[0], size, pooled), dtype=acc, device=start.device)
    if pooled == 0:  # an empty grid pastes nothing (covered pixels read no cell)
        return covered, m
    m.scatter_add_(2, lo[..., None], w_lo.to(acc)[..., None])
    m.scatter_add_(2, hi[..., None], w_hi.to(acc)[..., None])
    return covered, m


def roi_unpool_matrices(
    rois: Tensor,
    input_size: Tuple[int, int],
    output_size: Tuple[int, int],
    spatial_scale: float = 1.0,
    aligned: bool = False,
    coord_dtype: torch.dtype = torch.float32,
    accumulate_dtype: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The separable form of ROI-Unpool.

    Returns ``(covered_y: Tensor[K, H] bool, covered_x: Tensor[K, W] bool,
    Wy: Tensor[K, H, PH], Wx: Tensor[K, W, PW])`` with
    ``roi_unpool(input)[k, c] == Wy[k] @ input[k, c] @ Wx[k].T`` (rows of
    uncovered pixels are zero). ``input_size`` is (PH, PW), ``output_size`` (H, W).
    """
    PH, PW = input_size
    H, W = output_size
    x1, y1, rw, rh = _feature_frame(rois, spatial_scale, aligned, coord_dtype, "roi_unpool")
    cov_y, wy = _unpool_matrix(y1, rh, PH, H, accumulate_dtype)
    cov_x, wx = _unpool_matrix(x1, rw, PW, W, accumulate_dtype)
    return cov_y, cov_x, wy, wx


def roi_unpool_coverage(
    rois: Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float = 1.0,
    aligned: bool = False,
    coord_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Tensor[K, H, W] bool: pixel (h, w) is covered by ROI k
    (``y1' <= h < y1' + rh`` and ``x1' <= w < x1' + rw``)."""
    cov_y, cov_x = _covered_rows_and_columns(rois, output_size, spatial_scale, aligned, coord_dtype, "roi_unpool")
    return cov_y[:, :, None] & cov_x[:, None, :]


def _covered_rows_and_columns(rois, output_size, spatial_scale, aligned, coord_dtype, op) -> Tuple[Tensor, Tensor]:
    """``(Tensor[K, H] bool, Tensor[K, W] bool)``: the rows and the columns each ROI covers (ROI-Unpool's rule)."""
    H, W = output_size
    x1, y1, rw, rh = _feature_frame(rois, spatial_scale, aligned, coord_dtype, op)
    return _unpool_axis(y1, rh, 1, H)[0], _unpool_axis(x1, rw, 1, W)[0]


def _first_and_count(covered: Tensor) -> Tuple[Tensor, Tensor]:
    """First covered index and number of covered pixels of each row of a [K, size] coverage (contiguous runs)."""
    count = covered.sum(1)
    first = torch.where(count > 0, covered.to(torch.int8).argmax(1), torch.zeros_like(count))
    return first, first + count


def roi_unpool_footprint(
    rois: Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float = 1.0,
    aligned: bool = False,
    coord_dtype: torch.dtype = torch.float32,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y0, y1, x0, x1)``, each LongTensor[K]: ROI k covers the rows ``[y0, y1)`` and the columns ``[x0, x1)``
    of an ``output_size`` map (ROI-Unpool's coverage rule; ``y0 == y1`` when it covers no row). This is the
    footprint the soft ``coverage`` of :func:`roi_unpool_blend` is cropped to (``math::unpool_axis`` first/last).
    """
    cov_y, cov_x = _covered_rows_and_columns(rois, output_size, spatial_scale, aligned, coord_dtype,
                                             "roi_unpool_footprint")
    y0, y_end = _first_and_count(cov_y)
    x0, x_end = _first_and_count(cov_x)
    return y0, y_end, x0, x_end


def footprint_crops(
    coverage: Tensor,
    rois: Tensor,
    spatial_scale: float = 1.0,
    aligned: bool = False,
    coord_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Crop dense per-ROI maps ``Tensor[K, H, W]`` to each ROI's footprint: ``Tensor[K, FH, FW]`` with
    ``crop[k, i, j] = coverage[k, y0_k + i, x0_k + j]`` (:func:`roi_unpool_footprint`), ``FH, FW`` the largest
    footprint; cells past ROI k's own footprint are 0. Differentiable (a gather)."""
    K, H, W = coverage.shape
    y0, y1, x0, x1 = roi_unpool_footprint(rois, (H, W), spatial_scale, aligned, coord_dtype)
    FH = int((y1 - y0).max()) if K else 0
    FW = int((x1 - x0).max()) if K else 0
    i = torch.arange(FH, device=coverage.device)
    j = torch.arange(FW, device=coverage.device)
    rows = (y0[:, None] + i).clamp(max=max(H - 1, 0))  # [K, FH]
    cols = (x0[:, None] + j).clamp(max=max(W - 1, 0))  # [K, FW]
    inside = ((i < (y1 - y0)[:, None])[:, :, None] & (j < (x1 - x0)[:, None])[:, None, :])
    if K == 0 or H == 0 or W == 0:
        return coverage.new_zeros(K, FH, FW)
    crop = coverage.gather(1, rows[:, :, None].expand(K, FH, W)).gather(2, cols[:, None, :].expand(K, FH, FW))
    return torch.where(inside, crop, torch.zeros((), dtype=coverage.dtype, device=coverage.device))


def coverage_from_crops(
    crops: Tensor,
    rois: Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float = 1.0,
    aligned: bool = False,
    coord_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The inverse of :func:`footprint_crops`: dense ``Tensor[K, H, W]``, 0 outside each ROI's footprint.
    Raises ValueError when a crop is smaller than its ROI's footprint."""
    H, W = output_size
    K, FH, FW = crops.shape
    y0, y1, x0, x1 = roi_unpool_footprint(rois, (H, W), spatial_scale, aligned, coord_dtype)
    if K:
        need_h, need_w = int((y1 - y0).max()), int((x1 - x0).max())
        if need_h > FH or need_w > FW:
            raise ValueError(
                f"roi_unpool_blend: coverage must be Tensor[K, FH, FW] with FH >= {need_h} and FW >= {need_w} "
                f"(the largest footprint of the boxes on the {H}x{W} map), got Tensor{list(crops.shape)}"
            )
    h = torch.arange(H, device=crops.device)
    w = torch.arange(W, device=crops.device)
    inside = (((h >= y0[:, None]) & (h < y1[:, None]))[:, :, None]
              & ((w >= x0[:, None]) & (w < x1[:, None]))[:, None, :])
    if K == 0 or FH == 0 or FW == 0 or H == 0 or W == 0:
        return crops.new_zeros(K, H, W)
    rows = (h[None, :] - y0[:, None]).clamp(0, FH - 1)  # [K, H]
    cols = (w[None, :] - x0[:, None]).clamp(0, FW - 1)  # [K, W]
    dense = crops.gather(1, rows[:, :, None].expand(K, H, FW)).gather(2, cols[:, None, :].expand(K, H, W))
    return torch.where(inside, dense, torch.zeros((), dtype=crops.dtype, device=crops.device))


def _roi_unpool_acc(input: Tensor, rois: Tensor, output_size, spatial_scale, aligned, coord, acc):
    """ROI-Unpool in the accumulation dtype; also returns the coverage [K, H, W]."""
    K, C, PH, PW = input.shape
    H, W = (int(s) for s in output_size)
    cov_y, cov_x, wy, wx = roi_unpool_matrices(
        rois, (PH, PW), (H, W), spatial_scale, aligned, coord, acc
    )
    covered = cov_y[:, :, None] & cov_x[:, None, :]
    if K == 0 or C == 0 or H == 0 or W == 0:
        return _empty_result(input, (K, C, H, W), acc), covered
    grid = input.to(acc)
    if H * PW <= PH * W:
        t = torch.einsum("khi,kcij->kchj", wy, grid)
        out = torch.einsum("kchj,kwj->kchw", t, wx)
    else:
        t = torch.einsum("kcij,kwj->kciw", grid, wx)
        out = torch.einsum("khi,kciw->kchw", wy, t)
    # exactly +0 outside the box, whatever the grid holds
    out = torch.where(covered[:, None], out, torch.zeros((), dtype=acc, device=out.device))
    return out, covered


def roi_unpool(
    input: Tensor,
    rois: Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float = 1.0,
    aligned: bool = False,
    coord_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """ROI-Unpool (paste each ROI's grid back at full resolution) in pure PyTorch.

    Args:
        input: Tensor[K, C, PH, PW], one grid per ROI, any floating dtype.
        rois: Tensor[K, 5] of validated rows (batch_index, x1, y1, x2, y2); the
            batch index is not used.
        output_size: (H, W) of the output maps.
        spatial_scale: factor from box coordinates to output pixels.
        aligned: shift the box by -0.5 pixel (pixel centres at integers).
        coord_dtype: dtype of the box arithmetic; None picks
            ``coord_dtype_for(input, rois)``.

    Returns:
        Tensor[K, C, H, W] in input's dtype and memory format; exactly 0 on
        pixels the ROI does not cover.
    """
    coord = _resolve_coord_dtype(coord_dtype, input, rois)
    acc = accumulate_dtype_for(input)
    out, _ = _roi_unpool_acc(input, rois, output_size, spatial_scale, aligned, coord, acc)
    return out.to(input.dtype).contiguous(memory_format=_memory_format_of(input))


# ------------------------------------------------------- paste-back and blend


def roi_unpool_blend(
    base: Tensor,
    base_logit: Tensor,
    input: Tensor,
    input_logit: Tensor,
    rois: Tensor,
    spatial_scale: float = 1.0,
    aligned: bool = False,
    coord_dtype: Optional[torch.dtype] = None,
    coverage: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Paste every ROI back and blend it with ``base`` by a per-pixel softmax.

    The straightforward unfused composition (it materialises ``[K_b, C, H, W]``
    per image): the oracle for a fused kernel.

    Args:
        base: Tensor[B, C, H, W], the global output.
        base_logit: Tensor[B, H, W].
        input: Tensor[K, C, PH, PW], one grid per ROI.
        input_logit: Tensor[K, PH, PW].
        rois: Tensor[K, 5] (batch_index, x1, y1, x2, y2); the batch index says
            which image each ROI belongs to.
        coverage: optional Tensor[K, FH, FW], each ROI's soft coverage in
            [0, 1] cropped to its footprint (:func:`footprint_crops`); it
            multiplies the ROI's softmax term (docs/spec.md). ``None``: the
            plain blend.

    Returns:
        ``(out: Tensor[B, C, H, W], base_weight: Tensor[B, H, W])`` where, per
        pixel, ``softmax(base_logit, {roi_unpool(input_logit)_k : k covers it})``
        weighs ``base`` and the pasted ROIs; ``base_weight`` is exactly 1 where
        no ROI covers the pixel. ``out`` has base's dtype, ``base_weight``
        base_logit's dtype.
    """
    if base.dim() != 4:
        raise ValueError(f"base must be Tensor[B, C, H, W], got Tensor{list(base.shape)}")
    B, C, H, W = base.shape
    if tuple(base_logit.shape) != (B, H, W):
        raise ValueError(
            f"base_logit must be Tensor[{B}, {H}, {W}] (B, H, W of base), got Tensor{list(base_logit.shape)}"
        )
    if input.dim() != 4 or input.shape[1] != C:
        raise ValueError(f"input must be Tensor[K, {C}, PH, PW], got Tensor{list(input.shape)}")
    K, _, PH, PW = input.shape
    if tuple(input_logit.shape) != (K, PH, PW):
        raise ValueError(
            f"input_logit must be Tensor[{K}, {PH}, {PW}] (K, PH, PW of input), got Tensor{list(input_logit.shape)}"
        )
    if rois.dim() != 2 or rois.shape[0] != K or rois.shape[1] != 5:
        raise ValueError(f"rois must be Tensor[{K}, 5], got Tensor{list(rois.shape)}")
    batch = _batch_indices(rois)
    if K and not bool(((batch >= 0) & (batch < B)).all()):
        raise ValueError(f"rois[:, 0] (batch index) must lie in [0, {B}), got {batch.tolist()}")

    coord = _resolve_coord_dtype(coord_dtype, base, input, rois)
    acc = accumulate_dtype_for(base, input)
    values, covered = _roi_unpool_acc(input, rois, (H, W), spatial_scale, aligned, coord, acc)
    logits, _ = _roi_unpool_acc(input_logit[:, None], rois, (H, W), spatial_scale, aligned, coord, acc)
    if coverage is None:
        return blend_pasted(base, base_logit, values, logits[:, 0], covered, batch)
    if coverage.dim() != 3 or coverage.shape[0] != K:
        raise ValueError(f"coverage must be Tensor[{K}, FH, FW], got Tensor{list(coverage.shape)}")
    dense = coverage_from_crops(coverage, rois, (H, W), spatial_scale, aligned, coord)
    return blend_pasted(base, base_logit, values, logits[:, 0], covered, batch, coverage=dense)


def blend_pasted(
    base: Tensor,
    base_logit: Tensor,
    values: Tensor,
    logits: Tensor,
    covered: Tensor,
    batch: Tensor,
    coverage: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """The blend step of :func:`roi_unpool_blend`, whatever pasted the ROIs back.

    Args:
        base: Tensor[B, C, H, W]; base_logit: Tensor[B, H, W].
        values: Tensor[K, C, H, W], logits: Tensor[K, H, W]: the pasted ROIs and their logits.
        covered: BoolTensor[K, H, W], the pixels each ROI takes part in; batch: Tensor[K] long, its image.
        coverage: optional Tensor[K, H, W] (dense), each ROI's soft coverage: its softmax term is multiplied by
            it, and it takes part only where it is > 0 (docs/spec.md, "Soft coverage"). ``None``: the plain
            softmax, bitwise as before coverage existed.

    Returns ``(out, base_weight)`` as :func:`roi_unpool_blend` (computed in
    ``accumulate_dtype_for(base, values)``).
    """
    if coverage is not None:
        return _blend_pasted_weighted(base, base_logit, values, logits, covered, batch, coverage)
    B, C, H, W = base.shape
    acc = accumulate_dtype_for(base, values)
    values = values.to(acc)
    neg_inf = torch.full((), float("-inf"), dtype=acc, device=base.device)
    logits = torch.where(covered, logits.to(acc), neg_inf)

    outs, weights = [], []
    for b in range(B):
        sel = torch.nonzero(batch == b).squeeze(1)
        stacked = torch.cat([base_logit[b][None].to(acc), logits[sel]])  # [1 + K_b, H, W]
        w = torch.softmax(stacked, dim=0)
        blended = w[0] * base[b].to(acc) + (w[1:, None] * values[sel]).sum(0)
        outs.append(blended)
        weights.append(w[0])
    return _stack_blended(base, base_logit, outs, weights, acc)



def _stack_blended(
    base: Tensor, base_logit: Tensor, outs: list, weights: list, acc: torch.dtype
) -> Tuple[Tensor, Tensor]:
    """The per-image results of a blend stacked into ``(out, base_weight)`` in the inputs' dtypes, ``out`` in
    ``base``'s memory format (empty tensors for an empty batch)."""
    B, C, H, W = base.shape
    if B == 0:
        out = _empty_result(base, (0, C, H, W), acc)
        base_weight = _empty_result(base_logit, (0, H, W), acc)
    else:
        out = torch.stack(outs)
        base_weight = torch.stack(weights)
    out = out.to(base.dtype).contiguous(memory_format=_memory_format_of(base))
    return out, base_weight.to(base_logit.dtype)

def _blend_pasted_weighted(
    base: Tensor, base_logit: Tensor, values: Tensor, logits: Tensor, covered: Tensor, batch: Tensor,
    coverage: Tensor,
) -> Tuple[Tensor, Tensor]:
    """:func:`blend_pasted` with soft coverage ``c_k``: ``w_k = c_k e^(l_k - m) / z`` and ``w_base = e^(b - m) / z``,
    ``z = e^(b - m) + sum_k c_k e^(l_k - m)``, ``m`` the max of the base logit and the logits of the ROIs taking
    part (``c_k > 0``). Where no ROI takes part, ``out`` is ``base`` and ``w_base`` exactly 1."""
    B, C, H, W = base.shape
    acc = accumulate_dtype_for(base, values)
    values = values.to(acc)
    cov = torch.where(covered, coverage.to(acc), torch.zeros((), dtype=acc, device=base.device))
    take = cov > 0
    neg_inf = torch.full((), float("-inf"), dtype=acc, device=base.device)
    logits = logits.to(acc)
    outs, weights = [], []
    for b in range(B):
        sel = torch.nonzero(batch == b).squeeze(1)
        bl = base_logit[b].to(acc)
        m = torch.maximum(bl, torch.where(take[sel], logits[sel], neg_inf).amax(0)) if sel.numel() else bl
        m = m.detach()  # a stabiliser: the weights do not depend on it
        # exp(l_k - m) for every pixel the box covers (the coverage gradient needs it where c_k = 0 too)
        # (clamped: a box with c_k = 0 whose logit passes m by ~88 has e = inf, and 0 * inf must stay 0)
        e = torch.where(covered[sel], logits[sel] - m, neg_inf).exp().clamp(max=torch.finfo(acc).max)
        u = cov[sel] * e
        e_base = (bl - m).exp()
        z = e_base + u.sum(0)
        # where no box takes part m is the base logit, z = 1, w0 = 1 and wk = 0 exactly (no torch.where: the
        # coverage's gradient there, exp(l_k - m) (v_k - base), must flow)
        w0 = e_base / z
        wk = u / z
        blended = w0 * base[b].to(acc) + (wk[:, None] * values[sel]).sum(0)
        # ... and out is bitwise base there (the value of base, the gradient of blended)
        own = base[b].detach().to(acc) + (blended - blended.detach())
        outs.append(torch.where(take[sel].any(0), blended, own))
        weights.append(w0)
    return _stack_blended(base, base_logit, outs, weights, acc)
