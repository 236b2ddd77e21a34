"""Loads the C++ kernels and registers fake kernels and autograd for them.

The schemas live in ``csrc/ops.cpp``. Autograd is registered with
``torch.library.register_autograd``, which wraps each op in a
``torch.autograd.Function`` that ``torch.compile`` can trace; the backward
calls the private C++ backward ops, which themselves refuse double backward.
"""
from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format

try:
    from . import _C  # noqa: F401  (registers torch.ops.roi_ops.*)

    _IMPORT_ERROR = None
except ImportError as exc:  # not built: the pure-PyTorch fallback takes over
    _IMPORT_ERROR = exc


def _native_dispatch_keys() -> frozenset:
    if _IMPORT_ERROR is not None:
        return frozenset()
    return frozenset(
        key.lower()
        for key in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key("roi_ops::roi_align", key)
    )


NATIVE_DEVICE_TYPES = _native_dispatch_keys()


def native_available(device_type: str = "cpu") -> bool:
    """True when the C++/CUDA kernels are loaded for ``device_type``."""
    return device_type in NATIVE_DEVICE_TYPES


def native_import_error():
    """Why the extension failed to load (None when it loaded)."""
    return _IMPORT_ERROR


def _double_backward_error(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"roi_ops: double backward of {name} is not supported "
            "(its backward is not differentiable)"
        )

    return backward


if _IMPORT_ERROR is None:
    ops = torch.ops.roi_ops

    def _empty_like_format(like, shape):
        # outputs are contiguous in the memory format of the op's input
        return torch.empty(shape, dtype=like.dtype, device=like.device,
                           memory_format=suggest_memory_format(like))

    def _check_rois(rois):
        torch._check(
            rois.dim() == 2 and rois.shape[1] == 5,
            lambda: f"rois must be Tensor[K, 5], got Tensor{list(rois.shape)}",
        )

    @torch.library.register_fake("roi_ops::roi_align")
    def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width,
                        sampling_ratio, aligned):
        _check_rois(rois)
        torch._check(input.dim() == 4, lambda: f"input must be 4-D, got {input.dim()}-D")
        return _empty_like_format(input, (rois.shape[0], input.shape[1], pooled_height, pooled_width))

    @torch.library.register_fake("roi_ops::_roi_align_backward")
    def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width,
                                 batch_size, channels, height, width, sampling_ratio,
                                 aligned):
        _check_rois(rois)
        return _empty_like_format(grad, (batch_size, channels, height, width))

    @torch.library.register_fake("roi_ops::roi_unpool")
    def _roi_unpool_fake(input, rois, spatial_scale, height, width, aligned):
        _check_rois(rois)
        torch._check(input.dim() == 4, lambda: f"input must be 4-D, got {input.dim()}-D")
        torch._check(
            input.shape[0] == rois.shape[0],
            lambda: "input must have one grid per ROI: input.shape[0] == "
            f"{input.shape[0]} but rois has {rois.shape[0]} rows",
        )
        return _empty_like_format(input, (input.shape[0], input.shape[1], height, width))

    @torch.library.register_fake("roi_ops::_roi_unpool_backward")
    def _roi_unpool_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width,
                                  aligned):
        _check_rois(rois)
        return _empty_like_format(grad, (grad.shape[0], grad.shape[1], pooled_height, pooled_width))

    def _roi_align_setup(ctx, inputs, output):
        input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
        ctx.save_for_backward(rois)
        ctx.input_shape = input.shape
        ctx.args = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)

    def _roi_align_backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.args
        batch, channels, height, width = ctx.input_shape
        grad_input = ops._roi_align_backward(
            grad, rois, spatial_scale, pooled_height, pooled_width,
            batch, channels, height, width, sampling_ratio, aligned,
        )
        return grad_input, None, None, None, None, None, None

    def _roi_unpool_setup(ctx, inputs, output):
        input, rois, spatial_scale, height, width, aligned = inputs
        ctx.save_for_backward(rois)
        ctx.args = (spatial_scale, input.shape[2], input.shape[3], aligned)

    def _roi_unpool_backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        spatial_scale, pooled_height, pooled_width, aligned = ctx.args
        grad_input = ops._roi_unpool_backward(
            grad, rois, spatial_scale, pooled_height, pooled_width, aligned
        )
        return grad_input, None, None, None, None, None

    torch.library.register_autograd(
        "roi_ops::roi_align", _roi_align_backward, setup_context=_roi_align_setup
    )
    torch.library.register_autograd(
        "roi_ops::roi_unpool", _roi_unpool_backward, setup_context=_roi_unpool_setup
    )
    for _name in ("_roi_align_backward", "_roi_unpool_backward"):
        torch.library.register_autograd(
            f"roi_ops::{_name}",
            _double_backward_error(_name.strip("_").replace("_backward", "")),
            setup_context=lambda ctx, inputs, output: None,
        )
