"""Public functional API: ``roi_align`` and ``roi_unpool``."""
from __future__ import annotations

import warnings
from typing import Tuple, Union

import torch
from torch import Tensor

from . import _ops, reference
from ._validation import (
    BoxesLike,
    as_size_pair,
    check_feature_tensor,
    check_roi_values,
    check_scalars,
    check_scale_for,
    convert_boxes,
)

Size2 = Union[int, Tuple[int, int]]

_warned_fallback = set()


def _use_native(device: torch.device) -> bool:
    if _ops.native_available(device.type):
        return True
    if device.type == "meta":
        # shape inference: the ops' fake kernels serve meta tensors; the
        # reference would need the box values, which meta tensors do not hold
        if _ops.native_import_error() is None:
            return True
        raise RuntimeError(
            "roi_ops: tensors on the 'meta' device need the native extension "
            f"(its fake kernels infer the shapes), which is not loaded: {_ops.native_import_error()}"
        )
    if device.type not in _warned_fallback:
        _warned_fallback.add(device.type)
        why = _ops.native_import_error()
        reason = f" (extension not loaded: {why})" if why is not None else ""
        warnings.warn(
            f"roi_ops: no native kernel for device type '{device.type}'{reason}; "
            "using the pure-PyTorch implementation (slower, same results)",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


def roi_align(
    input: Tensor,
    boxes: BoxesLike,
    output_size: Size2,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """Crops a fixed-size grid out of ``input`` for each box (ROI-Align).

    Same signature, defaults and numbers as ``torchvision.ops.roi_align``.

    Args:
        input: ``Tensor[B, C, H, W]`` features (contiguous or channels_last;
            float16, bfloat16, float32 or float64).
        boxes: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or a
            list of ``B`` tensors ``Tensor[K_b, 4]`` (the position in the list
            is the batch index). Image pixel units.
        output_size: ``(PH, PW)`` or ``int``: the grid of each ROI (sides
            at most 65536).
        spatial_scale: multiplies box coordinates to reach feature units
            (e.g. 1/8 for a stride-8 map); positive and finite also in the
            coordinate dtype.
        sampling_ratio: samples per bin along each axis, at most 1024;
            ``<= 0`` picks ``ceil(roi_size / output_size)`` adaptively.
        aligned: shift boxes by -0.5 pixel so that pixel centres sit on
            integer coordinates (the correct alignment; False keeps the
            legacy Detectron behaviour, including boxes of at least 1 pixel).

    Returns:
        ``Tensor[K, C, PH, PW]`` in the memory format of ``input``.
    """
    op = "roi_align"
    check_feature_tensor(op, "input", input, 4)
    ph, pw = as_size_pair(op, "output_size", output_size)
    check_scalars(op, spatial_scale, aligned, sampling_ratio)
    rois = convert_boxes(op, boxes, input.device, batch_size=input.shape[0])
    check_scale_for(op, spatial_scale, input, rois)
    if _use_native(input.device):
        return torch.ops.roi_ops.roi_align(
            input, rois, float(spatial_scale), ph, pw, int(sampling_ratio), aligned
        )
    check_roi_values(op, rois, input.shape[0])
    return reference.roi_align(input, rois, (ph, pw), spatial_scale, sampling_ratio, aligned)


def roi_unpool(
    input: Tensor,
    boxes: BoxesLike,
    output_size: Size2,
    spatial_scale: float = 1.0,
    aligned: bool = False,
) -> Tensor:
    """Pastes each ROI's grid back into a full-resolution map (ROI-Unpool).

    Pixel ``(h, w)`` is covered by a box when ``y1' <= h < y1' + rh`` and
    ``x1' <= w < x1' + rw`` in the feature frame (half-open: boxes that tile
    the map cover every pixel once); a covered pixel gets the clamped
    bilinear interpolation of the grid at its grid coordinate, weights
    summing to one; uncovered pixels are exactly 0. The backward is the exact
    adjoint. See ``docs/ops.md``.

    Args:
        input: ``Tensor[K, C, PH, PW]``, one grid per box (e.g. the output of
            :func:`roi_align` after processing).
        boxes: ``Tensor[K, 5]`` or a list of ``Tensor[K_b, 4]``, as for
            :func:`roi_align` (the batch index is checked, not used: each box
            gets its own output map).
        output_size: ``(H, W)`` or ``int``: the feature map size (sides at
            most 65536).
        spatial_scale: multiplies box coordinates to reach feature units.
        aligned: the same half-pixel shift as :func:`roi_align`; use the same
            value for both to make them inverse to each other.

    Returns:
        ``Tensor[K, C, H, W]`` in the memory format of ``input``.
    """
    op = "roi_unpool"
    check_feature_tensor(op, "input", input, 4)
    height, width = as_size_pair(op, "output_size", output_size)
    check_scalars(op, spatial_scale, aligned)
    rois = convert_boxes(op, boxes, input.device)
    if rois.shape[0] != input.shape[0]:
        raise ValueError(
            f"{op}: input must have one grid per box: input.shape[0] is "
            f"{input.shape[0]} but boxes hold {rois.shape[0]} boxes"
        )
    check_scale_for(op, spatial_scale, input, rois)
    if _use_native(input.device):
        return torch.ops.roi_ops.roi_unpool(
            input, rois, float(spatial_scale), height, width, aligned
        )
    check_roi_values(op, rois)
    return reference.roi_unpool(input, rois, (height, width), spatial_scale, aligned)
