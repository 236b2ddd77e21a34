"""Tests that make roi_ops.reference trustworthy as the oracle.

The reference is compared with deliberately naive scalar loops written straight
from docs/spec.md (its ROI-Align and ROI-Unpool sections), in float64 and with
float32 box arithmetic (numpy float32 scalars round like the kernels), on
random and adversarial boxes; huge boxes are compared with a brute-force
enumeration of every sample.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from roi_ops import reference as ref

REPO = Path(__file__).resolve().parents[1]


def _load_baselines():
    spec = importlib.util.spec_from_file_location("roi_ops_bench_baselines", REPO / "benchmarks" / "baselines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


NP_COORD = {torch.float32: np.float32, torch.float64: np.float64}


# ------------------------------------------------------------ naive oracles


def naive_frame(roi, scale, aligned, T):
    """(x1', y1', rw, rh) of one roi row, in numpy scalar type T."""
    off = T(0.5) if aligned else T(0)
    s = T(scale)
    x1 = T(roi[1]) * s - off
    y1 = T(roi[2]) * s - off
    x2 = T(roi[3]) * s - off
    y2 = T(roi[4]) * s - off
    rw = x2 - x1
    rh = y2 - y1
    if not aligned:
        rw = max(rw, T(1))
        rh = max(rh, T(1))
    return x1, y1, rw, rh


def naive_bilinear(img, y, x, T):
    """torchvision's bilinear sample of img [C, H, W] (float64) at (y, x)."""
    C, H, W = img.shape
    if y < T(-1) or y > T(H) or x < T(-1) or x > T(W):
        return np.zeros(C)
    if y <= T(0):
        y = T(0)
    if x <= T(0):
        x = T(0)
    yl = int(np.floor(y))
    if yl >= H - 1:
        yl = yh = H - 1
        y = T(yl)
    else:
        yh = yl + 1
    xl = int(np.floor(x))
    if xl >= W - 1:
        xl = xh = W - 1
        x = T(xl)
    else:
        xh = xl + 1
    ly = y - T(yl)
    lx = x - T(xl)
    hy = float(T(1) - ly)
    hx = float(T(1) - lx)
    ly, lx = float(ly), float(lx)
    return hy * hx * img[:, yl, xl] + hy * lx * img[:, yl, xh] + ly * hx * img[:, yh, xl] + ly * lx * img[:, yh, xh]


def naive_roi_align(x, rois, output_size, scale, sampling_ratio, aligned, coord=torch.float64):
    T = NP_COORD[coord]
    x = x.double().numpy()
    rois = rois.double().numpy()
    PH, PW = output_size
    K = rois.shape[0]
    out = np.zeros((K, x.shape[1], PH, PW))
    for k in range(K):
        img = x[int(rois[k, 0])]
        x1, y1, rw, rh = naive_frame(rois[k], scale, aligned, T)
        bin_h = rh / T(PH)
        bin_w = rw / T(PW)
        gh = sampling_ratio if sampling_ratio > 0 else int(np.ceil(rh / T(PH)))
        gw = sampling_ratio if sampling_ratio > 0 else int(np.ceil(rw / T(PW)))
        count = max(gh * gw, 1)
        for ph in range(PH):
            for pw in range(PW):
                total = np.zeros(x.shape[1])
                for iy in range(gh):
                    y = y1 + T(ph) * bin_h + T(iy + 0.5) * bin_h / T(gh)
                    for ix in range(gw):
                        xx = x1 + T(pw) * bin_w + T(ix + 0.5) * bin_w / T(gw)
                        total = total + naive_bilinear(img, y, xx, T)
                out[k, :, ph, pw] = total / count
    return torch.from_numpy(out)


def naive_covers(start, extent, pixel, T):
    p = T(pixel)
    return start <= p and p < start + extent


def naive_unpool_tap(start, extent, pooled, pixel, T):
    v = ((T(pixel) - start) * T(pooled)) / extent - T(0.5)
    vc = min(max(v, T(0)), T(pooled - 1))
    i0 = int(np.floor(vc))
    i1 = min(i0 + 1, pooled - 1)
    frac = vc - T(i0)
    return i0, i1, float(T(1) - frac), float(frac)


def naive_coverage(rois, output_size, scale, aligned, coord=torch.float64):
    T = NP_COORD[coord]
    H, W = output_size
    rois = rois.double().numpy()
    cov = np.zeros((rois.shape[0], H, W), dtype=bool)
    for k in range(rois.shape[0]):
        x1, y1, rw, rh = naive_frame(rois[k], scale, aligned, T)
        for h in range(H):
            for w in range(W):
                cov[k, h, w] = naive_covers(y1, rh, h, T) and naive_covers(x1, rw, w, T)
    return torch.from_numpy(cov)


def naive_roi_unpool(grid, rois, output_size, scale, aligned, coord=torch.float64):
    T = NP_COORD[coord]
    g = grid.double().numpy()
    rois = rois.double().numpy()
    K, C, PH, PW = g.shape
    H, W = output_size
    out = np.zeros((K, C, H, W))
    for k in range(K):
        x1, y1, rw, rh = naive_frame(rois[k], scale, aligned, T)
        for h in range(H):
            if not naive_covers(y1, rh, h, T):
                continue
            i0, i1, a0, a1 = naive_unpool_tap(y1, rh, PH, h, T)
            for w in range(W):
                if not naive_covers(x1, rw, w, T):
                    continue
                j0, j1, b0, b1 = naive_unpool_tap(x1, rw, PW, w, T)
                out[k, :, h, w] = (
                    a0 * b0 * g[k, :, i0, j0]
                    + a0 * b1 * g[k, :, i0, j1]
                    + a1 * b0 * g[k, :, i1, j0]
                    + a1 * b1 * g[k, :, i1, j1]
                )
    return torch.from_numpy(out)


def naive_blend(base, base_logit, grid, grid_logit, rois, scale, aligned):
    """Per-pixel loop: softmax over base and the ROIs of that image covering the pixel."""
    B, C, H, W = base.shape
    values = naive_roi_unpool(grid, rois, (H, W), scale, aligned).numpy()
    logits = naive_roi_unpool(grid_logit[:, None], rois, (H, W), scale, aligned).numpy()[:, 0]
    cov = naive_coverage(rois, (H, W), scale, aligned).numpy()
    batch = rois[:, 0].long().tolist()
    out = np.zeros((B, C, H, W))
    weight = np.zeros((B, H, W))
    for b in range(B):
        for h in range(H):
            for w in range(W):
                members = [k for k in range(rois.shape[0]) if batch[k] == b and cov[k, h, w]]
                ls = [float(base_logit[b, h, w])] + [float(logits[k, h, w]) for k in members]
                top = max(ls)
                e = [math.exp(v - top) for v in ls]
                z = sum(e)
                out[b, :, h, w] = e[0] / z * base[b, :, h, w].double().numpy()
                for k, ek in zip(members, e[1:]):
                    out[b, :, h, w] += ek / z * values[k, :, h, w]
                weight[b, h, w] = e[0] / z
    return torch.from_numpy(out), torch.from_numpy(weight)


# ------------------------------------------------------------ box sets

# In feature-map units (before dividing by spatial_scale), for a 5 x 6 map.
ADVERSARIAL_FEATURE_BOXES = [
    (0.0, 0.0, 6.0, 5.0),  # the whole map
    (-1.5, -1.5, -0.5, -0.5),  # a sample exactly at -1 (grid 1)
    (5.5, 4.5, 6.5, 5.5),  # a sample exactly at H and W (grid 1)
    (-1.0, -1.0, 7.0, 6.0),  # slightly larger than the map
    (-3.0, -4.0, -1.25, -2.0),  # entirely outside, negative
    (7.0, 6.0, 9.0, 9.0),  # entirely outside, positive
    (2.0, 2.0, 2.0, 2.0),  # zero size
    (3.5, 1.0, 3.5, 4.0),  # zero width
    (4.0, 4.0, 1.0, 2.0),  # inverted
    (9.0, 8.0, -3.0, -2.5),  # inverted and larger than the map: samples walk backwards across it
    (-2.0, -3.0, 3.0, 4.0),  # across the top-left corner
    (3.25, 2.75, 8.0, 9.5),  # across the bottom-right corner
    (0.5, 0.5, 1.5, 1.0),  # smaller than a pixel in height
    (-6.0, -6.0, 12.0, 11.0),  # much larger than the map
    (1.0, 0.0, 4.0, 4.0),  # integer edges
]


def make_rois(feature_boxes, batch_size, scale, dtype=torch.float64):
    rows = [
        (k % batch_size, x1 / scale, y1 / scale, x2 / scale, y2 / scale)
        for k, (x1, y1, x2, y2) in enumerate(feature_boxes)
    ]
    return torch.tensor(rows, dtype=dtype)


def random_feature_boxes(gen, n, H, W, margin=3.0, quarter=False):
    """Random boxes in feature units around an H x W map; quarter=True snaps
    corners to multiples of 0.25 so samples land on pixels and borders."""
    lo = torch.tensor([-margin, -margin])
    hi = torch.tensor([W + margin, H + margin])
    a = lo + (hi - lo) * torch.rand(n, 2, generator=gen, dtype=torch.float64)
    b = lo + (hi - lo) * torch.rand(n, 2, generator=gen, dtype=torch.float64)
    if quarter:
        a, b = torch.round(a * 4) / 4, torch.round(b * 4) / 4
    boxes = torch.cat([torch.minimum(a, b), torch.maximum(a, b)], dim=1)
    return [tuple(r) for r in boxes.tolist()]


def box_set(seed, H, W):
    gen = torch.Generator().manual_seed(seed)
    return (
        ADVERSARIAL_FEATURE_BOXES
        + random_feature_boxes(gen, 4, H, W)
        + random_feature_boxes(gen, 4, H, W, quarter=True)
    )


# ------------------------------------------------------------ ROI-Align


@pytest.mark.parametrize("coord", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_matches_naive(aligned, sampling_ratio, scale, coord):
    H, W = 5, 6
    gen = torch.Generator().manual_seed(int(scale * 8) + 3 * sampling_ratio + 17 * aligned)
    x = torch.randn(2, 2, H, W, generator=gen, dtype=torch.float64)
    rois = make_rois(box_set(int(scale * 4) + sampling_ratio, H, W), 2, scale)
    out = ref.roi_align(x, rois, (2, 3), scale, sampling_ratio, aligned, coord_dtype=coord)
    expected = naive_roi_align(x, rois, (2, 3), scale, sampling_ratio, aligned, coord)
    assert out.dtype == torch.float64 and out.shape == (rois.shape[0], 2, 2, 3)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_float32_rounding_of_inexact_scale(aligned):
    # spatial_scale 1/3 and irregular coordinates: float32 products round, so
    # only the exact expression order reproduces every border decision.
    H, W = 6, 5
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, H, W, generator=gen, dtype=torch.float64)
    boxes = random_feature_boxes(gen, 12, H, W, margin=2.0) + random_feature_boxes(gen, 12, H, W, quarter=True)
    rois = make_rois(boxes, 1, 1 / 3).float()
    for sr in (-1, 2):
        out = ref.roi_align(x, rois, (3, 2), 1 / 3, sr, aligned, coord_dtype=torch.float32)
        expected = naive_roi_align(x, rois, (3, 2), 1 / 3, sr, aligned, torch.float32)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_roi_align_output_size_one_and_single_pixel_maps():
    gen = torch.Generator().manual_seed(2)
    for H, W in [(1, 1), (1, 4), (3, 1)]:
        x = torch.randn(1, 2, H, W, generator=gen, dtype=torch.float64)
        rois = make_rois(ADVERSARIAL_FEATURE_BOXES, 1, 1.0)
        for aligned in (False, True):
            out = ref.roi_align(x, rois, (1, 1), 1.0, -1, aligned)
            torch.testing.assert_close(out, naive_roi_align(x, rois, (1, 1), 1.0, -1, aligned), rtol=0, atol=1e-12)


def brute_align_matrix(start, extent, pooled, sampling_ratio, size, T, window=None):
    """Every sample of every bin (or those of `window`, whose edges must be
    shown to lie off the map), enumerated with numpy in coordinate type T."""
    bin_size = extent / T(pooled)
    if sampling_ratio > 0:
        g = sampling_ratio
    else:
        g = int(min(max(float(np.ceil(extent / T(pooled))), 0.0), float(ref.MAX_SAMPLES_PER_BIN)))
    m = np.zeros((pooled, size))

    def positions(i):
        half = (i.astype(np.float32) + np.float32(0.5)).astype(T)
        return (start + T(p) * bin_size) + (half * bin_size) / T(g)

    for p in range(pooled):
        lo, hi = (0, g) if window is None else window(p, g)
        if window is not None:  # monotone positions: nothing outside the window can contribute
            if lo > 0:
                assert positions(np.array([lo - 1]))[0] < -1
            if hi < g:
                assert positions(np.array([hi]))[0] > size
        for c0 in range(lo, hi, 1 << 20):
            y = positions(np.arange(c0, min(hi, c0 + (1 << 20)), dtype=np.int64))
            y = y[(y >= T(-1)) & (y <= T(size))]
            y = np.where(y <= T(0), T(0), y)
            low = np.floor(y)
            end = low >= T(size - 1)
            low = np.where(end, T(size - 1), low)
            y = np.where(end, low, y)
            frac = y - low
            high = np.where(end, low, low + 1)
            np.add.at(m[p], low.astype(np.int64), (T(1) - frac).astype(np.float64) / g)
            np.add.at(m[p], high.astype(np.int64), frac.astype(np.float64) / g)
    return m


@pytest.mark.parametrize(
    "coord,box",
    [
        (torch.float64, (-1e6, -1e6, 1e6, 1e6)),
        (torch.float32, (-1e6, -1e6, 1e6, 1e6)),
        (torch.float32, (-1e6 + 0.3, -2.7e6, 3.7, 2.9e6)),
        (torch.float64, (-2e6 - 0.4, 2.5, 6.25, 1e6 + 0.1)),
    ],
)
def test_roi_align_huge_boxes_match_brute_force(coord, box):
    T = NP_COORD[coord]
    H, W, PH, PW = 5, 6, 2, 3
    rois = torch.tensor([[0.0, *box]], dtype=coord)
    my, mx = ref.roi_align_matrices(rois, (H, W), (PH, PW), 1.0, -1, False, coord, torch.float64)
    x1, y1, rw, rh = naive_frame(rois[0].double().numpy(), 1.0, False, T)
    by = brute_align_matrix(y1, rh, PH, -1, H, T)
    bx = brute_align_matrix(x1, rw, PW, -1, W, T)
    assert np.abs(by).sum() > 0 or np.abs(bx).sum() > 0  # the box does reach the map
    np.testing.assert_allclose(my[0].numpy(), by, rtol=0, atol=1e-15)
    np.testing.assert_allclose(mx[0].numpy(), bx, rtol=0, atol=1e-15)
    x = torch.randn(1, 2, H, W, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    out = ref.roi_align(x, rois, (PH, PW), 1.0, -1, False, coord_dtype=coord)
    expected = np.einsum("ph,chw,qw->cpq", by, x[0].numpy(), bx)
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("coord,extent", [(torch.float64, 1e12), (torch.float32, 1e8)])
def test_roi_align_gigantic_boxes_only_touch_the_map(coord, extent):
    # ~10^11 samples per bin: the reference must not enumerate them. The
    # brute force enumerates a window around the map, proven to hold every
    # contributing sample, in the kernels' arithmetic ((float)iy + 0.5f).
    T = NP_COORD[coord]
    H, W, P = 4, 4, 2
    rois = torch.tensor([[0.0, -extent / 2, -extent / 2 + 0.3, extent / 2, extent / 2]], dtype=coord)
    my, mx = ref.roi_align_matrices(rois, (H, W), (P, P), 1.0, -1, True, coord, torch.float64)
    x1, y1, rw, rh = naive_frame(rois[0].double().numpy(), 1.0, True, T)

    def window_for(start, extent_):
        bin_size = float(extent_) / P

        def window(p, g):
            step = bin_size / g
            base = float(start) + p * bin_size
            centre_lo = (-1 - base) / step - 0.5
            centre_hi = (H + 1 - base) / step - 0.5
            pad = 4096 + 64 * max(H, W) / step
            return max(0, int(centre_lo - pad)), min(g, int(centre_hi + pad) + 1)

        return window

    by = brute_align_matrix(y1, rh, P, -1, H, T, window_for(y1, rh))
    bx = brute_align_matrix(x1, rw, P, -1, W, T, window_for(x1, rw))
    assert by.sum() > 0 and bx.sum() > 0
    np.testing.assert_allclose(my[0].numpy(), by, rtol=0, atol=1e-18)
    np.testing.assert_allclose(mx[0].numpy(), bx, rtol=0, atol=1e-18)


def test_chunked_enumeration_and_contraction_agree(monkeypatch):
    # tiny chunk limits force many sample chunks and many ROI chunks per image
    gen = torch.Generator().manual_seed(15)
    H, W = 5, 6
    rois = make_rois(box_set(61, H, W), 2, 0.5)
    x = torch.randn(2, 3, H, W, generator=gen, dtype=torch.float64)
    whole = ref.roi_align(x, rois, (2, 3), 0.5, -1, False)
    monkeypatch.setattr(ref, "_SAMPLE_CHUNK_ELEMENTS", 7)
    monkeypatch.setattr(ref, "_CONTRACT_CHUNK_ELEMENTS", 50)
    chunked = ref.roi_align(x, rois, (2, 3), 0.5, -1, False)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-14)
    torch.testing.assert_close(chunked, naive_roi_align(x, rois, (2, 3), 0.5, -1, False), rtol=0, atol=1e-12)


# ------------------------------------------------------------ ROI-Unpool


@pytest.mark.parametrize("coord", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.25, 1 / 3])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("grid_size", [(3, 2), (1, 1), (4, 5)])
def test_roi_unpool_matches_naive(grid_size, aligned, scale, coord):
    H, W = 5, 6
    gen = torch.Generator().manual_seed(7 + grid_size[0])
    rois = make_rois(box_set(11 + grid_size[1], H, W), 2, scale)
    grid = torch.randn(rois.shape[0], 2, *grid_size, generator=gen, dtype=torch.float64)
    out = ref.roi_unpool(grid, rois, (H, W), scale, aligned, coord_dtype=coord)
    expected = naive_roi_unpool(grid, rois, (H, W), scale, aligned, coord)
    assert out.dtype == torch.float64 and out.shape == (rois.shape[0], 2, H, W)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    cov = naive_coverage(rois, (H, W), scale, aligned, coord)
    assert torch.equal(ref.roi_unpool_coverage(rois, (H, W), scale, aligned, coord), cov)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_unpool_partition_of_unity(aligned):
    H, W = 7, 6
    for scale in (1.0, 0.5, 1 / 3):
        rois = make_rois(box_set(21, H, W), 1, scale)
        grid = torch.full((rois.shape[0], 1, 3, 4), 2.5, dtype=torch.float64)
        grid[::2] = -1.75  # a negative constant too
        out = ref.roi_unpool(grid, rois, (H, W), scale, aligned)
        cov = naive_coverage(rois, (H, W), scale, aligned)[:, None]
        assert cov.any() and (~cov).any()
        torch.testing.assert_close(out, torch.where(cov, grid[:, :, :1, :1].expand_as(out), 0.0), rtol=0, atol=1e-14)
        outside = out[~cov.expand_as(out)]
        assert torch.equal(outside, torch.zeros_like(outside)) and not torch.signbit(outside).any()


def test_roi_unpool_tiling_boxes_cover_each_pixel_once():
    # dyadic edges, so x1' + (x2' - x1') == x2' exactly and the half-open
    # coverage of neighbours meets without gap or overlap
    H, W = 6, 7
    cuts_y, cuts_x = [-0.5, 2.5, 3.75, 6.0], [0.0, 3.25, 7.0]
    boxes = [(cuts_x[j], cuts_y[i], cuts_x[j + 1], cuts_y[i + 1]) for i in range(3) for j in range(2)]
    rois = make_rois(boxes, 1, 1.0)
    ones = torch.ones(len(boxes), 1, 2, 2, dtype=torch.float64)
    for aligned in (False, True):
        total = ref.roi_unpool(ones, rois, (H, W), 1.0, aligned).sum(0)
        assert torch.equal(total, torch.ones_like(total))


def test_roi_unpool_inverts_roi_align_on_affine_fields():
    H, W, PH, PW = 16, 14, 4, 5
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    field = torch.stack([0.7 + 0.3 * ys - 0.2 * xs, -1.0 + 0.05 * ys + 0.4 * xs])[None]
    boxes = [(2.0, 1.5, 11.0, 13.25), (3.25, 4.0, 9.5, 8.0), (1.0, 1.0, 13.5, 15.5)]
    rois = make_rois(boxes, 1, 1.0)
    crops = ref.roi_align(field, rois, (PH, PW), 1.0, 1, True)
    pasted = ref.roi_unpool(crops, rois, (H, W), 1.0, True)
    checked = 0
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        x1, y1, rw, rh = naive_frame(rois[k].numpy(), 1.0, True, np.float64)
        for h in range(H):
            v = (h - y1) * PH / rh - 0.5
            if not (naive_covers(y1, rh, h, np.float64) and 0 <= v <= PH - 1):
                continue
            for w in range(W):
                u = (w - x1) * PW / rw - 0.5
                if naive_covers(x1, rw, w, np.float64) and 0 <= u <= PW - 1:
                    torch.testing.assert_close(pasted[k, :, h, w], field[0, :, h, w], rtol=0, atol=1e-12)
                    checked += 1
    assert checked > 50


# ------------------------------------------------------------ autograd


def _adjoint_gap(fn, x, gen):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    g = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    (grad,) = torch.autograd.grad(y, x, g)
    return (y * g).sum().item(), (x * grad).sum().item()


@pytest.mark.parametrize("aligned", [False, True])
def test_adjoint_identity(aligned):
    gen = torch.Generator().manual_seed(9)
    H, W = 5, 6
    rois = make_rois(box_set(31, H, W), 3, 0.5)
    x = torch.randn(3, 2, H, W, generator=gen, dtype=torch.float64)
    for sr in (-1, 2):
        lhs, rhs = _adjoint_gap(lambda t: ref.roi_align(t, rois, (3, 2), 0.5, sr, aligned), x, gen)
        assert lhs != 0 and math.isclose(lhs, rhs, rel_tol=1e-12, abs_tol=1e-12)
    grid = torch.randn(rois.shape[0], 2, 3, 4, generator=gen, dtype=torch.float64)
    lhs, rhs = _adjoint_gap(lambda t: ref.roi_unpool(t, rois, (H, W), 0.5, aligned), grid, gen)
    assert lhs != 0 and math.isclose(lhs, rhs, rel_tol=1e-12, abs_tol=1e-12)


def test_gradcheck_small():
    gen = torch.Generator().manual_seed(4)
    rois = make_rois([(0.5, -0.5, 4.0, 3.5), (-1.0, 1.25, 2.0, 6.0), (2.0, 2.0, 2.0, 2.0)], 2, 1.0)
    x = torch.randn(2, 2, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ref.roi_align(t, rois, (2, 2), 1.0, 2, True), (x,))
    g = torch.randn(3, 2, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ref.roi_unpool(t, rois, (4, 5), 1.0, False), (g,))


# ------------------------------------------------------------ dtypes, layouts, empties


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
@pytest.mark.parametrize("box_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes_match_float64(dtype, atol, box_dtype):
    gen = torch.Generator().manual_seed(6)
    H, W = 5, 6
    rois = make_rois(box_set(41, H, W), 2, 0.5, dtype=box_dtype)
    coord = ref.coord_dtype_for(torch.empty(0, dtype=dtype), rois)
    assert coord == (torch.float64 if box_dtype == torch.float64 else torch.float32)
    x = torch.randn(2, 3, H, W, generator=gen).to(dtype)
    out = ref.roi_align(x, rois, (2, 3), 0.5, -1, True)
    assert out.dtype == dtype
    expected = ref.roi_align(x.double(), rois, (2, 3), 0.5, -1, True, coord_dtype=coord)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=atol)
    grid = torch.randn(rois.shape[0], 3, 2, 3, generator=gen).to(dtype)
    pasted = ref.roi_unpool(grid, rois, (H, W), 0.5, True)
    assert pasted.dtype == dtype
    expected = ref.roi_unpool(grid.double(), rois, (H, W), 0.5, True, coord_dtype=coord)
    torch.testing.assert_close(pasted.double(), expected, rtol=0, atol=atol)


def test_layouts_give_the_same_numbers():
    gen = torch.Generator().manual_seed(8)
    H, W = 5, 6
    rois = make_rois(box_set(51, H, W), 2, 1.0)
    x = torch.randn(2, 3, H, W, generator=gen, dtype=torch.float64)
    base = ref.roi_align(x, rois, (2, 3), 1.0, 2, False)
    cl = ref.roi_align(x.contiguous(memory_format=torch.channels_last), rois, (2, 3), 1.0, 2, False)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, base, rtol=0, atol=1e-14)
    wide = torch.randn(2, 3, H, 2 * W, generator=gen, dtype=torch.float64)
    wide[..., ::2] = x
    torch.testing.assert_close(ref.roi_align(wide[..., ::2], rois, (2, 3), 1.0, 2, False), base, rtol=0, atol=1e-14)

    grid = torch.randn(rois.shape[0], 3, 3, 2, generator=gen, dtype=torch.float64)
    base = ref.roi_unpool(grid, rois, (H, W), 1.0, True)
    cl = ref.roi_unpool(grid.contiguous(memory_format=torch.channels_last), rois, (H, W), 1.0, True)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, base, rtol=0, atol=1e-14)
    strided = grid.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(ref.roi_unpool(strided, rois, (H, W), 1.0, True), base, rtol=0, atol=1e-14)


def test_empty_cases_have_shapes_and_zero_gradients():
    rois0 = torch.zeros(0, 5, dtype=torch.float64)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    out = ref.roi_align(x, rois0, (2, 2))
    assert out.shape == (0, 3, 2, 2)
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))

    xb = torch.randn(0, 3, 4, 5, requires_grad=True)
    assert ref.roi_align(xb, torch.zeros(0, 5), (2, 3)).shape == (0, 3, 2, 3)

    rois = make_rois([(0.0, 0.0, 3.0, 3.0), (1.0, 1.0, 2.0, 4.0)], 2, 1.0)
    xc = torch.randn(2, 0, 4, 5, dtype=torch.float64, requires_grad=True)
    out = ref.roi_align(xc, rois, (2, 2))
    assert out.shape == (2, 0, 2, 2)
    out.sum().backward()
    assert xc.grad.shape == xc.shape

    g0 = torch.randn(0, 3, 2, 2, requires_grad=True)
    out = ref.roi_unpool(g0, torch.zeros(0, 5), (4, 5))
    assert out.shape == (0, 3, 4, 5)
    out.sum().backward()
    assert torch.equal(g0.grad, torch.zeros_like(g0))
    gc = torch.randn(2, 0, 2, 2, dtype=torch.float64)
    assert ref.roi_unpool(gc, rois, (4, 5)).shape == (2, 0, 4, 5)


def test_rejects_bad_coord_dtype():
    x = torch.randn(1, 1, 3, 3)
    rois = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0]])
    with pytest.raises(ValueError, match="coord_dtype must be torch.float32, torch.float64 or None, got torch.float16"):
        ref.roi_align(x, rois, (2, 2), coord_dtype=torch.float16)


# ------------------------------------------------------------ blend


def test_roi_unpool_blend_matches_loop():
    gen = torch.Generator().manual_seed(12)
    B, C, H, W = 3, 2, 5, 6
    boxes = [
        (0.0, 0.0, 4.0, 3.0),
        (2.5, 1.0, 6.0, 5.0),
        (-2.0, -1.0, 1.5, 2.0),
        (1.0, 1.0, 1.0, 3.0),
        (3.0, 2.0, 5.0, 4.5),
    ]
    rois = make_rois(boxes, 2, 0.5)  # images 0 and 1 only: image 2 has no ROI
    base = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    base_logit = torch.randn(B, H, W, generator=gen, dtype=torch.float64)
    grid = torch.randn(len(boxes), C, 3, 2, generator=gen, dtype=torch.float64)
    grid_logit = 2 * torch.randn(len(boxes), 3, 2, generator=gen, dtype=torch.float64)
    for aligned in (False, True):
        out, weight = ref.roi_unpool_blend(base, base_logit, grid, grid_logit, rois, 0.5, aligned)
        exp_out, exp_weight = naive_blend(base, base_logit, grid, grid_logit, rois, 0.5, aligned)
        torch.testing.assert_close(out, exp_out, rtol=0, atol=1e-12)
        torch.testing.assert_close(weight, exp_weight, rtol=0, atol=1e-12)
        cov = naive_coverage(rois, (H, W), 0.5, aligned)
        covered = torch.zeros(B, H, W, dtype=torch.bool)
        for k in range(len(boxes)):
            covered[int(rois[k, 0])] |= cov[k]
        assert covered.any() and (~covered).any() and (weight[covered] < 1).all()
        assert torch.equal(weight[~covered], torch.ones_like(weight[~covered]))
        assert torch.equal(out[2], base[2])


def test_roi_unpool_blend_gradients():
    gen = torch.Generator().manual_seed(13)
    B, C, H, W = 2, 2, 4, 5
    rois = make_rois([(0.0, 0.0, 3.0, 3.0), (1.5, 0.5, 5.0, 4.0), (0.0, 1.0, 2.0, 4.0)], 2, 1.0)
    tensors = (
        torch.randn(B, C, H, W, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(B, H, W, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(3, C, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True),
        torch.randn(3, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(lambda *t: ref.roi_unpool_blend(*t, rois, 1.0, True), tensors, fast_mode=True)


def test_roi_unpool_blend_checks_shapes():
    base = torch.zeros(1, 2, 4, 4)
    with pytest.raises(ValueError, match=r"base_logit must be Tensor\[1, 4, 4\]"):
        ref.roi_unpool_blend(
            base, torch.zeros(1, 4, 3), torch.zeros(0, 2, 2, 2), torch.zeros(0, 2, 2), torch.zeros(0, 5)
        )
    with pytest.raises(ValueError, match=r"rois\[:, 0\] \(batch index\) must lie in \[0, 1\)"):
        ref.roi_unpool_blend(
            base, torch.zeros(1, 4, 4), torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2), torch.tensor([[1.0, 0, 0, 2, 2]])
        )


# ------------------------------------------------------------ benchmark baselines


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_grid_sample_baselines_agree_with_reference(aligned, scale):
    bl = _load_baselines()
    gen = torch.Generator().manual_seed(14)
    B, C, H, W = 2, 3, 9, 11
    # strictly inside: every sample and every box edge within [0, H-1] x [0, W-1]
    boxes = [(1.0, 1.0, 6.5, 7.0), (2.25, 0.75, 9.5, 4.0), (4.0, 3.0, 9.0, 7.5), (1.5, 2.5, 3.0, 3.5)]
    rois = make_rois(boxes, B, scale)
    x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    for sr in (1, 2):
        torch.testing.assert_close(
            bl.grid_sample_roi_align(x, rois, (3, 4), scale, sr, aligned),
            ref.roi_align(x, rois, (3, 4), scale, sr, aligned),
            rtol=0,
            atol=1e-12,
        )
    grid = torch.randn(len(boxes), C, 3, 4, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        bl.grid_sample_roi_unpool(grid, rois, (H, W), scale, aligned),
        ref.roi_unpool(grid, rois, (H, W), scale, aligned),
        rtol=0,
        atol=1e-12,
    )
    with pytest.raises(ValueError, match="fixed sampling_ratio > 0, got -1"):
        bl.grid_sample_roi_align(x, rois, (3, 4), scale, -1, aligned)


@pytest.mark.parametrize("aligned", [False, True])
def test_grid_sample_roi_align_baseline_follows_the_edge_rule(aligned):
    # Boxes across every border and beyond it: samples in [-1, 0) and (H-1, H] read the edge pixel, samples
    # past -1 or H read 0 (the spec's rule), which the baseline gets by clamping and parking coordinates.
    # One-pixel axes too, where a parked sample must still read 0.
    bl = _load_baselines()
    gen = torch.Generator().manual_seed(15)
    boxes = [(-3.0, -2.5, 4.0, 5.0), (6.0, 5.5, 14.0, 12.0), (-6.0, 2.0, 17.0, 4.5), (10.2, 8.4, 11.3, 9.6)]
    for B, C, H, W in ((2, 3, 9, 11), (2, 3, 1, 11), (2, 3, 9, 1)):
        rois = make_rois(boxes, B, 1.0)
        x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
        for sr in (1, 2, 3):
            expected = ref.roi_align(x, rois, (3, 4), 1.0, sr, aligned)
            torch.testing.assert_close(bl.grid_sample_roi_align(x, rois, (3, 4), 1.0, sr, aligned), expected,
                                       rtol=0, atol=1e-12, msg=lambda m: f"{H}x{W} map, sampling_ratio={sr}: {m}")
