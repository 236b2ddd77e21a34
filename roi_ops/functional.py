"""Public functional API: ``roi_align``, ``roi_unpool`` and the fused ``roi_unpool_blend``.

Each function checks its arguments (``_validation.py``), converts the boxes
to ``Tensor[K, 5]`` and calls the native op (registered in ``_ops.py``) where
the build has a kernel for the device, else the pure-PyTorch implementation
of ``reference.py`` (with a one-time ``RuntimeWarning``).
"""
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
# Decided once, so tracing sees a constant (see _ops.kernel_device_types).
_BLEND_DEVICE_TYPES = _ops.kernel_device_types("roi_unpool_blend")
# An extension built before the blend took a soft coverage lacks the argument: coverage then runs the reference.
_BLEND_TAKES_COVERAGE = _ops.op_has_argument("roi_unpool_blend", "coverage")
_warned_no_blend_kernel = set()


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


def _use_blend_kernel(device: torch.device) -> bool:
    if not _use_native(device):  # warns once about the pure-PyTorch fallback
        return False
    if device.type in _BLEND_DEVICE_TYPES or device.type == "meta":  # meta: fake kernel
        return True
    if device.type not in _warned_no_blend_kernel:
        _warned_no_blend_kernel.add(device.type)
        warnings.warn(
            f"roi_ops: this build has no roi_unpool_blend kernel for device type "
            f"'{device.type}'; using the unfused pure-PyTorch composition (slower, "
            "materialises [K, C, H, W])",
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


def _same_dtype_and_device(op: str, base: Tensor, name: str, t: Tensor) -> None:
    if t.dtype != base.dtype:
        raise TypeError(f"{op}: {name} must have base's dtype {base.dtype}, got {t.dtype}")
    if t.device != base.device:
        raise RuntimeError(f"{op}: {name} must be on base's device {base.device}, got {t.device}")


def roi_unpool_blend(
    base: Tensor,
    base_logit: Tensor,
    input: Tensor,
    input_logit: Tensor,
    boxes: BoxesLike,
    spatial_scale: float = 1.0,
    aligned: bool = False,
    coverage: Union[Tensor, None] = None,
) -> Tuple[Tensor, Tensor]:
    """Pastes every ROI grid back and blends it with ``base`` by a per-pixel softmax (fused).

    For image ``b`` and pixel ``p``, with ``S(p)`` the boxes of image ``b``
    that cover ``p`` (ROI-Unpool's coverage rule), ``v_k(p)`` and ``l_k(p)``
    the ROI-Unpool of ``input[k]`` and ``input_logit[k]`` at ``p``::

        w_base, {w_k} = softmax(base_logit[b, p], {l_k(p) : k in S(p)})
        out[b, :, p]  = w_base * base[b, :, p] + sum_{k in S(p)} w_k * v_k(p)

    It equals the unfused composition (stack the pasted maps, mask uncovered
    logits with -inf, softmax, sum) without ever allocating anything of size
    ``K * C * H * W``, forward or backward; the backward is deterministic.

    Args:
        base: ``Tensor[B, C, H, W]``, the global output (contiguous or
            channels_last; a channels_last view of token-major
            ``[B, H*W, C]`` states is read in place).
        base_logit: ``Tensor[B, H, W]``, the global output's blending logit.
        input: ``Tensor[K, C, PH, PW]``, one grid per box.
        input_logit: ``Tensor[K, PH, PW]``, each grid cell's blending logit.
        boxes: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` or a
            list of ``B`` tensors ``Tensor[K_b, 4]``; the batch index says
            which image a box blends into.
        spatial_scale: multiplies box coordinates to reach feature units.
        aligned: the half-pixel shift of :func:`roi_ops.roi_unpool`.
        coverage: optional ``Tensor[K, FH, FW]``, each box's soft coverage
            in ``[0, 1]`` (a mask-shaped instance) cropped to the pixels the
            box covers: ``coverage[k, i, j]`` is that of pixel
            ``(y0_k + i, x0_k + j)``, ``(y0_k, x0_k)`` the box's first covered
            pixel (:func:`roi_ops.footprint_crops` makes it from dense
            ``[K, H, W]`` maps). Box ``k``'s softmax term is multiplied by it:
            ``w_k = c_k e^(l_k) / (e^(base_logit) + sum_j c_j e^(l_j))``, so
            it takes part only where ``c_k > 0``; all ones is bitwise
            ``None``. Same dtype and device as ``base``; differentiable.
            ``None`` (default): the plain blend, bitwise unchanged.

    All four tensors share one floating dtype (float16, bfloat16, float32,
    float64) and device; the softmax and sums run in float32 (float64 for
    float64).

    Returns:
        ``(out: Tensor[B, C, H, W], base_weight: Tensor[B, H, W])``: ``out``
        in base's memory format; ``base_weight`` is ``w_base``, exactly 1
        where no box covers the pixel (and there ``out`` is bitwise ``base``).
    """
    op = "roi_unpool_blend"
    check_feature_tensor(op, "base", base, 4)
    check_feature_tensor(op, "base_logit", base_logit, 3)
    check_feature_tensor(op, "input", input, 4)
    check_feature_tensor(op, "input_logit", input_logit, 3)
    for name, t in (("base_logit", base_logit), ("input", input), ("input_logit", input_logit)):
        _same_dtype_and_device(op, base, name, t)
    B, C, H, W = base.shape
    K, _, PH, PW = input.shape
    if tuple(base_logit.shape) != (B, H, W):
        raise ValueError(
            f"{op}: base_logit must be Tensor[B, H, W] = {[B, H, W]} (from base), "
            f"got Tensor{list(base_logit.shape)}"
        )
    if input.shape[1] != C:
        raise ValueError(
            f"{op}: input must be Tensor[K, C, PH, PW] with C = {C} (base's channels), "
            f"got Tensor{list(input.shape)}"
        )
    if PH == 0 or PW == 0:
        raise ValueError(
            f"{op}: input must have a non-empty grid (PH, PW > 0), got Tensor{list(input.shape)}"
        )
    if tuple(input_logit.shape) != (K, PH, PW):
        raise ValueError(
            f"{op}: input_logit must be Tensor[K, PH, PW] = {[K, PH, PW]} (from input), "
            f"got Tensor{list(input_logit.shape)}"
        )
    check_scalars(op, spatial_scale, aligned)
    rois = convert_boxes(op, boxes, base.device, batch_size=B)
    if rois.shape[0] != K:
        raise ValueError(
            f"{op}: input must have one grid per box: input.shape[0] is {K} "
            f"but boxes hold {rois.shape[0]} boxes"
        )
    check_scale_for(op, spatial_scale, base, rois)
    if coverage is not None:
        _check_coverage(op, base, coverage, K)
    if _use_blend_kernel(base.device) and (coverage is None or _BLEND_TAKES_COVERAGE):
        if coverage is None:  # the call of the op before coverage existed, bitwise
            return torch.ops.roi_ops.roi_unpool_blend(
                base, base_logit, input, input_logit, rois, float(spatial_scale), aligned
            )
        return torch.ops.roi_ops.roi_unpool_blend(
            base, base_logit, input, input_logit, rois, float(spatial_scale), aligned, coverage
        )
    check_roi_values(op, rois, B)
    return reference.roi_unpool_blend(
        base, base_logit, input, input_logit, rois, spatial_scale, aligned, coverage=coverage
    )


def _check_coverage(op: str, base: Tensor, coverage: Tensor, K: int) -> None:
    if not isinstance(coverage, Tensor):
        raise TypeError(f"{op}: coverage must be a Tensor[K, FH, FW] or None, got {type(coverage).__name__}")
    _same_dtype_and_device(op, base, "coverage", coverage)
    if coverage.dim() != 3 or coverage.shape[0] != K:
        raise ValueError(
            f"{op}: coverage must be Tensor[K, FH, FW] with K = {K} (one per box), "
            f"got Tensor{list(coverage.shape)}"
        )


def footprint_crops(coverage: Tensor, boxes: BoxesLike, spatial_scale: float = 1.0,
                    aligned: bool = False) -> Tensor:
    """Crops dense per-box maps ``Tensor[K, H, W]`` (e.g. mask coverage at a
    feature map's resolution) to the pixels each box covers, the ``coverage``
    form :func:`roi_unpool_blend` takes: ``Tensor[K, FH, FW]``, ``FH x FW``
    the largest footprint, 0 past a box's own. Differentiable."""
    op = "footprint_crops"
    check_feature_tensor(op, "coverage", coverage, 3)
    check_scalars(op, spatial_scale, aligned)
    rois = convert_boxes(op, boxes, coverage.device)
    if rois.shape[0] != coverage.shape[0]:
        raise ValueError(
            f"{op}: coverage must be Tensor[K, H, W] with one map per box (K = {rois.shape[0]}), "
            f"got Tensor{list(coverage.shape)}"
        )
    check_scale_for(op, spatial_scale, coverage, rois)
    coord = reference.coord_dtype_for(coverage, rois)
    return reference.footprint_crops(coverage, rois, spatial_scale, aligned, coord)
