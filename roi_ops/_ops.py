"""Loads the C++ kernels and registers fake kernels and autograd for them.

The schemas live in ``csrc/ops.cpp``. Autograd is registered with
``torch.library.register_autograd``, which wraps each op in a
``torch.autograd.Function`` that ``torch.compile`` can trace; the backward
calls the private C++ backward ops, which themselves refuse double backward.

Before loading ``_C`` it checks that the torch running is the one ``_C`` was
compiled against (``_build_info.py``, written by setup.py at build time) and
raises one ImportError that says which torch is needed and how to rebuild,
instead of an undefined-symbol error. A ``_C`` that is missing or fails to
load otherwise leaves the pure-PyTorch fallback in charge, and
``native_import_error()`` says why.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch
from torch._prims_common import suggest_memory_format

from ._version import __version__

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _public_version(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0': the release a build is tied to."""
    return str(version).split("+", 1)[0]


def _torch_mismatch(built_torch: str, built_cuda: Optional[str], with_cuda: bool,
                    running_torch: str, running_cuda: Optional[str]) -> Optional[str]:
    """Why a roi_ops._C built against ``built_torch`` cannot load into the
    running torch, or None when it can.

    torch's C++ ABI is not stable across releases: an extension compiled
    against one torch release fails to load into another with an undefined
    symbol (or worse), so the release must match exactly. A build with CUDA
    kernels also needs a torch with the same CUDA major version (libcudart's
    soname changes with it); a CPU-only build loads into any variant.
    """
    if _public_version(built_torch) != _public_version(running_torch):
        return f"it was built against torch {built_torch}, but torch {running_torch} is installed"
    if with_cuda and running_cuda is None:
        return (f"it was built with CUDA kernels against torch {built_torch} (CUDA {built_cuda}), "
                f"but the installed torch {running_torch} has no CUDA")
    if with_cuda and built_cuda and str(running_cuda).split(".")[0] != str(built_cuda).split(".")[0]:
        return (f"it was built with CUDA kernels against torch {built_torch} (CUDA {built_cuda}), "
                f"but the installed torch {running_torch} uses CUDA {running_cuda}")
    return None


def _torch_mismatch_message(reason: str, built_torch: str) -> str:
    return (
        f"roi_ops {__version__} cannot load its compiled kernels (roi_ops._C in {_PACKAGE_DIR}): "
        f"{reason}, and a compiled PyTorch extension only loads into the torch release it was "
        "built against. Fix it one of two ways:\n"
        f"  - install the torch this build needs:  pip install torch=={_public_version(built_torch)}\n"
        "  - rebuild roi-ops against the installed torch (needs a C++ compiler and "
        "setuptools>=77; ninja speeds it up):\n"
        f"      pip install --no-build-isolation --no-deps --force-reinstall <roi_ops-{__version__}.tar.gz or a checkout>\n"
        f"    (from a package index: --no-binary roi-ops roi-ops=={__version__}; in a checkout: make build)"
    )


def _check_build_matches_torch() -> None:
    """Raises ImportError with one clear message when roi_ops._C was built
    against another torch than the one running (_build_info.py is written by
    setup.py's build_ext next to the compiled extension). Runs before _C is
    loaded, so a mismatch never surfaces as an undefined-symbol error."""
    try:
        from . import _build_info
    except ImportError:  # never built (a plain source tree): nothing to check
        return
    reason = _torch_mismatch(_build_info.TORCH_VERSION, _build_info.TORCH_CUDA_VERSION,
                             _build_info.WITH_CUDA, torch.__version__, torch.version.cuda)
    if reason is not None:
        raise ImportError(_torch_mismatch_message(reason, _build_info.TORCH_VERSION))


def _load_extension() -> Optional[ImportError]:
    """Imports roi_ops._C (registering torch.ops.roi_ops.*); returns why it
    failed, or None."""
    if importlib.util.find_spec(f"{__package__}._C") is None:
        # (`from . import _C` would blame "a circular import" here)
        return ModuleNotFoundError(
            f"roi_ops._C is not built: no compiled extension in {_PACKAGE_DIR}; "
            "build it with `pip install --no-build-isolation .` (or `make build`) in a checkout",
            name=f"{__package__}._C",
        )
    _check_build_matches_torch()  # raises: a mismatched _C is an install error, not a fallback
    try:
        importlib.import_module(f"{__package__}._C")
    except ImportError as exc:  # e.g. a missing shared library: the fallback takes over
        return exc
    return None


_IMPORT_ERROR = _load_extension()


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


def native_import_error() -> Optional[ImportError]:
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
