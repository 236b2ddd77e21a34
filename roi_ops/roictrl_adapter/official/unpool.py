"""ROI-Unpool as the official release's CUDA op computes it (``unpool="official"``), in PyTorch.

The paste rule :data:`roi_ops.roictrl_adapter.paste.OFFICIAL` pastes with it.
"""

from __future__ import annotations

import torch

__all__ = ["roi_unpool_quantized"]


def _quantized_axis(lo: torch.Tensor, hi: torch.Tensor, pooled: int, size: int):
    """One axis of :func:`roi_unpool_quantized`: ``[K, size, pooled]`` tap weights (illegal taps dropped),
    ``[K, size]`` inside-the-box flags and ``[K, size]`` sums of the legal weights."""
    start = torch.ceil(lo - 0.5)
    end = torch.ceil(hi - 0.5)
    pix = torch.arange(size, device=lo.device, dtype=lo.dtype)
    inside = (pix >= start[:, None]) & (pix < end[:, None])
    pos = (pix - start[:, None]) / (end - start)[:, None] * pooled
    pos = torch.where(inside, pos, torch.zeros_like(pos))  # outside the box: any value, masked below
    low = pos.floor()
    frac = pos - low
    high_legal = (pos.ceil() < pooled).to(pos.dtype)
    low_i = low.long().clamp(max=pooled - 1)
    high_i = pos.ceil().long().clamp(max=pooled - 1)
    taps = torch.zeros(*pos.shape, pooled, dtype=pos.dtype, device=pos.device)
    taps.scatter_add_(-1, low_i.unsqueeze(-1), (1 - frac).unsqueeze(-1))
    taps.scatter_add_(-1, high_i.unsqueeze(-1), (frac * high_legal).unsqueeze(-1))
    return taps, inside, (1 - frac) + frac * high_legal


def roi_unpool_quantized(
    input: torch.Tensor, boxes: torch.Tensor, output_size: tuple[int, int], spatial_scale: float = 1.0
) -> torch.Tensor:
    """ROI-Unpool as the official ROICtrl release computes it (its CUDA op with ``aligned=True``), in PyTorch.

    For a box with corners ``c1 <= c2`` (feature units ``c * spatial_scale``), the covered pixels along an axis are
    ``ceil(c1 - 0.5) <= h < ceil(c2 - 0.5)`` (quantised, half-open); pixel ``h`` reads the grid at
    ``(h - start) / (end - start) * pooled`` (no half-cell offset) by bilinear interpolation whose taps outside
    the grid are dropped, and a pixel whose remaining weights sum to less than ``1 - 1e-5`` gets 0 (the zeroed
    rim along the far edges of boxes larger than the grid). Uncovered pixels are 0.

    Unlike ``roi_ops.roi_unpool`` this is not the adjoint of ROI-Align and leaves holes: use it to reproduce the
    released model, not otherwise. ``input`` ``Tensor[K, C, PH, PW]``, ``boxes`` ``Tensor[K, 5]``; returns
    ``Tensor[K, C, H, W]``. Materialises ``[K, C, H, W]`` (autograd through plain tensor ops).
    """
    if input.dim() != 4 or boxes.dim() != 2 or boxes.shape[1] != 5 or boxes.shape[0] != input.shape[0]:
        raise ValueError(
            "roi_unpool_quantized needs input Tensor[K, C, PH, PW] and boxes Tensor[K, 5] with the same K, got "
            f"input {list(input.shape)} and boxes {list(boxes.shape)}"
        )
    H, W = output_size
    K, C, PH, PW = input.shape
    coord = torch.float64 if input.dtype == torch.float64 else torch.float32
    b = boxes.to(coord) * spatial_scale
    my, in_y, sum_y = _quantized_axis(b[:, 2], b[:, 4], PH, H)
    mx, in_x, sum_x = _quantized_axis(b[:, 1], b[:, 3], PW, W)
    keep = (in_y[:, :, None] & in_x[:, None, :]) & ((1 - sum_y[:, :, None] * sum_x[:, None, :]) < 1e-5)
    rows = torch.matmul(my.to(input.dtype).unsqueeze(1), input)  # [K, C, H, PW]
    out = torch.matmul(rows, mx.to(input.dtype).transpose(1, 2).unsqueeze(1))  # [K, C, H, W]
    return out * keep.unsqueeze(1).to(input.dtype)
