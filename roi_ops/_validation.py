"""Argument checks shared by every public op (shapes, dtypes, devices).

Checks on box *values* (finite coordinates, batch index in range) need the
data; on native devices the C++ ops make them (so torch.compile can trace the
Python side), and :func:`check_roi_values` makes them for the pure-PyTorch
fallback. Every message names the argument, what was expected and what came.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from .reference import MAX_OUTPUT_SIDE, MAX_SAMPLING_RATIO, check_spatial_scale, coord_dtype_for

BoxesLike = Union[Tensor, Sequence[Tensor]]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"Tensor{list(x.shape)} of dtype {x.dtype} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def check_feature_tensor(op: str, name: str, x, ndim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {_describe(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}"
        )
    if x.dim() != ndim:
        raise ValueError(
            f"{op}: {name} must be a {ndim}-D tensor, got {x.dim()}-D Tensor{list(x.shape)}"
        )


def as_size_pair(op: str, name: str, size) -> Tuple[int, int]:
    """``int`` or ``(int, int)``, both positive and at most MAX_OUTPUT_SIDE
    (checked before anything is allocated from them)."""
    if isinstance(size, (numbers.Integral, torch.SymInt)) and not isinstance(size, bool):
        pair = (size, size)
    elif (
        isinstance(size, (tuple, list, torch.Size))
        and len(size) == 2
        and all(
            isinstance(s, (numbers.Integral, torch.SymInt)) and not isinstance(s, bool)
            for s in size
        )
    ):
        pair = (size[0], size[1])
    else:
        raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {size!r}")
    if not all(s > 0 for s in pair):
        raise ValueError(f"{op}: {name} must be positive, got {tuple(pair)}")
    if not all(s <= MAX_OUTPUT_SIDE for s in pair):
        raise ValueError(
            f"{op}: {name} must be at most {MAX_OUTPUT_SIDE} per side, got {tuple(pair)}"
        )
    return pair


def check_scalars(op: str, spatial_scale, aligned, sampling_ratio=0) -> None:
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, numbers.Real):
        raise TypeError(f"{op}: spatial_scale must be a float, got {spatial_scale!r}")
    if not (math.isfinite(spatial_scale) and spatial_scale > 0):
        raise ValueError(
            f"{op}: spatial_scale must be a positive finite number, got {spatial_scale!r}"
        )
    if isinstance(sampling_ratio, bool) or not isinstance(sampling_ratio, numbers.Integral):
        raise TypeError(f"{op}: sampling_ratio must be an int, got {sampling_ratio!r}")
    if sampling_ratio > MAX_SAMPLING_RATIO:
        raise ValueError(
            f"{op}: sampling_ratio must be at most {MAX_SAMPLING_RATIO} samples per bin along "
            f"each axis (or <= 0 for the adaptive count), got {sampling_ratio}"
        )
    if not isinstance(aligned, bool):
        raise TypeError(f"{op}: aligned must be a bool, got {aligned!r}")


def _check_box_tensor(op: str, name: str, t, cols: int, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {_describe(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    if t.dim() != 2 or t.shape[1] != cols:
        expected = "Tensor[K, 5] or list of Tensor[L, 4]" if cols == 5 else f"Tensor[L, {cols}]"
        raise ValueError(f"{op}: {name} must be {expected}, got Tensor{list(t.shape)}")
    if t.device != device:
        raise RuntimeError(
            f"{op}: {name} must be on the same device as the features ({device}), got {t.device}"
        )


def convert_boxes(op: str, boxes: BoxesLike, device: torch.device, batch_size=None) -> Tensor:
    """``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` from either box format.

    ``batch_size`` (when known) is the required length of the list format.
    """
    if isinstance(boxes, Tensor):
        _check_box_tensor(op, "boxes", boxes, 5, device)
        return boxes
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(
            f"{op}: boxes must be Tensor[K, 5] or list of Tensor[L, 4], got {_describe(boxes)}"
        )
    if batch_size is not None and len(boxes) != batch_size:
        raise ValueError(
            f"{op}: boxes as a list needs one Tensor[L, 4] per image ({batch_size}), "
            f"got a list of {len(boxes)}"
        )
    for i, b in enumerate(boxes):
        _check_box_tensor(op, f"boxes[{i}]", b, 4, device)
    if len(boxes) == 0:
        return torch.zeros((0, 5), device=device)
    dtype = boxes[0].dtype
    for b in boxes:
        dtype = torch.promote_types(dtype, b.dtype)
    rows: List[Tensor] = []
    for i, b in enumerate(boxes):
        index = torch.full_like(b[:, :1], i, dtype=dtype)
        rows.append(torch.cat([index, b.to(dtype)], dim=1))
    return torch.cat(rows, dim=0)


def check_roi_values(op: str, rois: Tensor, batch_size=None) -> None:
    """Finite coordinates and whole batch indices in ``[0, batch_size)``."""
    if rois.shape[0] == 0:
        return
    if not bool(torch.isfinite(rois).all()):
        raise ValueError(f"{op}: rois must hold finite values (no NaN or inf)")
    idx = rois[:, 0]
    ok = (idx >= 0) & (idx == torch.floor(idx))
    if batch_size is not None:
        ok &= idx < batch_size
    if not bool(ok.all()):
        upper = batch_size if batch_size is not None else "inf"
        raise ValueError(
            f"{op}: rois[:, 0] (batch index) must be whole numbers in [0, {upper}), "
            "got values outside that set"
        )


def check_scale_for(op: str, spatial_scale, features: Tensor, rois: Tensor) -> None:
    """spatial_scale positive and finite in the coordinate dtype of ``features``
    and ``rois`` (float32 unless one is float64), as the kernels use it."""
    check_spatial_scale(op, spatial_scale, coord_dtype_for(features, rois))
