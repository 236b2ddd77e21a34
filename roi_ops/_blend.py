"""The fused paste-back + blend op: fake kernels, autograd and the public function.

``torch.ops.roi_ops.roi_unpool_blend`` (schema in ``csrc/ops.cpp``, kernels in
``csrc/cpu/roi_unpool_blend_kernel.cpp`` and ``csrc/cuda/``) computes, per
pixel, a softmax over the global output's logit and the logits of the ROIs
that cover the pixel, and blends the global output with the pasted-back ROI
grids by those weights, without ever materialising ``[K, C, H, W]``. Its
backward recomputes what it needs from the inputs, so autograd saves only the
inputs (no output, nothing per ROI at full resolution).
"""
from __future__ import annotations

import warnings
from typing import Tuple

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from . import _ops, reference
from ._validation import (
    BoxesLike,
    check_feature_tensor,
    check_roi_values,
    check_scalars,
    check_scale_for,
    convert_boxes,
)
from .functional import _use_native

__all__ = ["roi_unpool_blend"]


def _blend_kernel_device_types() -> frozenset:
    # A build can have the other ops' kernels for a device and not this one's
    # (e.g. a CUDA build older than it); decided once, so tracing sees a constant.
    if _ops.native_import_error() is not None:
        return frozenset()
    return frozenset(
        key.lower()
        for key in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key("roi_ops::roi_unpool_blend", key)
    )


_BLEND_DEVICE_TYPES = _blend_kernel_device_types()
_warned_no_blend_kernel = set()


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


if _ops.native_import_error() is None:
    _lib = torch.ops.roi_ops

    def _empty_in_format(like: Tensor, shape) -> Tensor:
        return torch.empty(shape, dtype=like.dtype, device=like.device,
                           memory_format=suggest_memory_format(like))

    def _check_operands(base, base_logit, input, input_logit, rois):
        torch._check(base.dim() == 4, lambda: f"base must be 4-D, got {base.dim()}-D")
        torch._check(
            rois.dim() == 2 and rois.shape[1] == 5,
            lambda: f"rois must be Tensor[K, 5], got Tensor{list(rois.shape)}",
        )
        B, C, H, W = base.shape
        torch._check(
            base_logit.dim() == 3 and tuple(base_logit.shape) == (B, H, W),
            lambda: f"base_logit must be Tensor[{B}, {H}, {W}], got Tensor{list(base_logit.shape)}",
        )
        torch._check(
            input.dim() == 4 and input.shape[0] == rois.shape[0] and input.shape[1] == C,
            lambda: f"input must be Tensor[{rois.shape[0]}, {C}, PH, PW], got Tensor{list(input.shape)}",
        )
        torch._check(
            input_logit.dim() == 3
            and tuple(input_logit.shape) == (input.shape[0], input.shape[2], input.shape[3]),
            lambda: "input_logit must be Tensor[K, PH, PW] of input, got "
            f"Tensor{list(input_logit.shape)}",
        )

    @torch.library.register_fake("roi_ops::roi_unpool_blend")
    def _roi_unpool_blend_fake(base, base_logit, input, input_logit, rois, spatial_scale, aligned):
        _check_operands(base, base_logit, input, input_logit, rois)
        B, C, H, W = base.shape
        return _empty_in_format(base, (B, C, H, W)), base_logit.new_empty((B, H, W))

    @torch.library.register_fake("roi_ops::_roi_unpool_blend_backward")
    def _roi_unpool_blend_backward_fake(grad_out, grad_base_weight, base, base_logit, input,
                                        input_logit, rois, spatial_scale, aligned):
        _check_operands(base, base_logit, input, input_logit, rois)
        return (
            _empty_in_format(base, base.shape),
            base_logit.new_empty(base_logit.shape),
            _empty_in_format(input, input.shape),
            input_logit.new_empty(input_logit.shape),
        )

    def _setup_context(ctx, inputs, output):
        base, base_logit, input, input_logit, rois, spatial_scale, aligned = inputs
        # only the inputs: the backward recomputes the softmax and the pasted
        # values per pixel instead of keeping anything at full resolution per ROI
        ctx.save_for_backward(base, base_logit, input, input_logit, rois)
        ctx.args = (spatial_scale, aligned)

    def _backward(ctx, grad_out, grad_base_weight):
        base, base_logit, input, input_logit, rois = ctx.saved_tensors
        spatial_scale, aligned = ctx.args
        if grad_out is None:  # only base_weight was used
            grad_out = torch.zeros_like(base)
        grads = _lib._roi_unpool_blend_backward(
            grad_out, grad_base_weight, base, base_logit, input, input_logit, rois,
            spatial_scale, aligned,
        )
        return (*grads, None, None, None)

    torch.library.register_autograd(
        "roi_ops::roi_unpool_blend", _backward, setup_context=_setup_context
    )
    torch.library.register_autograd(
        "roi_ops::_roi_unpool_blend_backward",
        _ops._double_backward_error("roi_unpool_blend"),
        setup_context=lambda ctx, inputs, output: None,
    )


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
    if _use_blend_kernel(base.device):
        out, base_weight = torch.ops.roi_ops.roi_unpool_blend(
            base, base_logit, input, input_logit, rois, float(spatial_scale), aligned
        )
        return out, base_weight
    check_roi_values(op, rois, B)
    return reference.roi_unpool_blend(
        base, base_logit, input, input_logit, rois, spatial_scale, aligned
    )
