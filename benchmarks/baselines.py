"""What a user would write without roi_ops: ROI-Align and ROI-Unpool on top of
``torch.nn.functional.grid_sample``. Used only by the benchmarks, as the
baseline measured in the same run.

Both follow docs/spec.md's coordinate frame, so on the same boxes they
compute the same function as roi_ops (tests/test_reference.py checks it, boxes
across the border included). They are written lean, as a user who cares about
speed would: ROI-Align clamps its sample coordinates itself (torchvision's edge
rule), parks the samples outside ``[-1, H] x [-1, W]`` where zeros padding
reads 0, and averages the bins with ``avg_pool2d``: one ``grid_sample`` and
one pooling per image, no mask pass; ROI-Unpool is one ``grid_sample`` with
border padding and a coverage mask.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor


def _pair(size: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _feature_frame(rois: Tensor, spatial_scale: float, aligned: bool, dtype: torch.dtype):
    box = rois[:, 1:5].to(dtype)
    offset = 0.5 if aligned else 0.0
    x1 = box[:, 0] * spatial_scale - offset
    y1 = box[:, 1] * spatial_scale - offset
    rw = box[:, 2] * spatial_scale - offset - x1
    rh = box[:, 3] * spatial_scale - offset - y1
    if not aligned:
        rw = rw.clamp(min=1)
        rh = rh.clamp(min=1)
    return x1, y1, rw, rh


def _normalise(pos: Tensor, size: int) -> Tensor:
    # align_corners=True: -1 and +1 are the centres of the first and last pixel
    if size == 1:
        return torch.zeros_like(pos)
    return pos * (2.0 / (size - 1)) - 1.0


def _normalise_edges(pos: Tensor, size: int) -> Tensor:
    # align_corners=False: -1 and +1 are the outer edges of the first and last pixel. Unlike the form above,
    # a position off a one-pixel axis stays off it (and reads zeros padding).
    return (2.0 * pos + 1.0) / size - 1.0


def grid_sample_roi_align(
    input: Tensor,
    rois: Tensor,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 2,
    aligned: bool = False,
) -> Tensor:
    """ROI-Align as one ``grid_sample`` per image over all its ROIs' sample points.

    input: Tensor[B, C, H, W]; rois: Tensor[K, 5]; returns Tensor[K, C, PH, PW].
    Only a fixed ``sampling_ratio > 0`` is supported: an adaptive grid differs
    per ROI and cannot be one sampling grid.
    """
    if sampling_ratio <= 0:
        raise ValueError(
            f"grid_sample_roi_align needs a fixed sampling_ratio > 0, got {sampling_ratio}"
        )
    PH, PW = _pair(output_size)
    B, C, H, W = input.shape
    K = rois.shape[0]
    g = sampling_ratio
    coord = torch.float64 if torch.float64 in (input.dtype, rois.dtype) else torch.float32
    x1, y1, rw, rh = _feature_frame(rois, spatial_scale, aligned, coord)

    # sample i of the (PH * g) rows sits at y1 + (i + 0.5) * rh / (PH * g)
    fy = (torch.arange(PH * g, dtype=coord, device=input.device) + 0.5) / g
    fx = (torch.arange(PW * g, dtype=coord, device=input.device) + 0.5) / g
    ys = y1[:, None] + fy[None, :] * (rh / PH)[:, None]  # [K, PH*g]
    xs = x1[:, None] + fx[None, :] * (rw / PW)[:, None]  # [K, PW*g]
    # The spec's edge rule without a mask pass: a sample in [-1, H] reads the clamped position (clamping the
    # coordinate ourselves is what border padding does), one outside is sent two pixels off the map, where
    # zeros padding reads exactly 0.
    ys = torch.where((ys >= -1) & (ys <= H), ys.clamp(0, H - 1), -2.0)
    xs = torch.where((xs >= -1) & (xs <= W), xs.clamp(0, W - 1), -2.0)
    grid = torch.stack(
        [
            _normalise_edges(xs, W)[:, None, :].expand(K, PH * g, PW * g),
            _normalise_edges(ys, H)[:, :, None].expand(K, PH * g, PW * g),
        ],
        dim=-1,
    ).to(input.dtype)

    out = input.new_zeros((K, C, PH, PW))
    batch = rois[:, 0].to(torch.int64)
    for b in torch.unique(batch).tolist():
        sel = torch.nonzero(batch == b).squeeze(1)
        n = sel.numel()
        samples = F.grid_sample(
            input[b : b + 1],
            grid[sel].reshape(1, n * PH * g, PW * g, 2),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )  # [1, C, n*PH*g, PW*g]; each ROI's rows are a whole number of g x g bins
        bins = F.avg_pool2d(samples, g) if g > 1 else samples  # [1, C, n*PH, PW]
        out[sel] = bins.view(C, n, PH, PW).transpose(0, 1)
    return out


def grid_sample_roi_unpool(
    input: Tensor,
    rois: Tensor,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    aligned: bool = False,
) -> Tensor:
    """ROI-Unpool as one ``grid_sample`` of every ROI grid at full resolution.

    input: Tensor[K, C, PH, PW]; rois: Tensor[K, 5]; returns Tensor[K, C, H, W]:
    every pixel samples its ROI grid at ``v = (h - y1') * PH / rh - 0.5`` (border
    padding does the clamp to ``[0, PH - 1]``), then is masked by coverage.
    """
    H, W = _pair(output_size)
    K, C, PH, PW = input.shape
    coord = torch.float64 if torch.float64 in (input.dtype, rois.dtype) else torch.float32
    x1, y1, rw, rh = _feature_frame(rois, spatial_scale, aligned, coord)
    hs = torch.arange(H, dtype=coord, device=input.device)[None, :]
    ws = torch.arange(W, dtype=coord, device=input.device)[None, :]
    cov_y = (y1[:, None] <= hs) & (hs < (y1 + rh)[:, None])  # [K, H]
    cov_x = (x1[:, None] <= ws) & (ws < (x1 + rw)[:, None])  # [K, W]
    # uncovered pixels may divide by a zero extent: park them at 0
    v = torch.where(cov_y, (hs - y1[:, None]) * PH / rh[:, None] - 0.5, 0.0)
    u = torch.where(cov_x, (ws - x1[:, None]) * PW / rw[:, None] - 0.5, 0.0)
    grid = torch.stack(
        [_normalise(u, PW)[:, None, :].expand(K, H, W), _normalise(v, PH)[:, :, None].expand(K, H, W)],
        dim=-1,
    ).to(input.dtype)
    out = F.grid_sample(input, grid, mode="bilinear", padding_mode="border", align_corners=True)
    mask = (cov_y[:, :, None] & cov_x[:, None, :]).to(input.dtype)
    return out * mask[:, None]
