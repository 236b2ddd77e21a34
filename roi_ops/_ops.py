"""Loads the C++ kernels and registers fake kernels and autograd for every op.

The one module that registers roi_ops' ops with ``torch.library``: the
schemas live in ``csrc/ops.cpp`` and the kernels per backend in
``csrc/cpu`` and ``csrc/cuda``; here, for ``roi_align``, ``roi_unpool`` and
the fused ``roi_unpool_blend``, the fake (meta) kernels that infer output
shapes and the autograd formulas. Autograd is registered with
``torch.library.register_autograd``, which wraps each op in a
``torch.autograd.Function`` that ``torch.compile`` can trace; the backward
calls the private C++ backward op, whose own registration refuses double
backward. The public functions that call these ops are in ``functional.py``.

Before loading ``_C`` it checks that the torch running is the one ``_C`` was
compiled against (``_build_info.py``, written by setup.py at build time) and
raises one ImportError that says which torch is needed and how to rebuild,
instead of an undefined-symbol error. A ``_C`` that is missing or fails to
load otherwise leaves the pure-PyTorch fallback in charge, and
``native_import_error()`` says why.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from typing import Iterator, Optional

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


def kernel_device_types(op: str) -> frozenset:
    """The device types ("cpu", "cuda") for which the loaded build has a
    kernel of ``roi_ops::<op>`` (empty when ``_C`` did not load). A build can
    lack one op's kernel for a device and have the others' (e.g. a CUDA build
    older than the fused blend)."""
    if _IMPORT_ERROR is not None:
        return frozenset()
    return frozenset(
        key.lower()
        for key in ("CPU", "CUDA")
        if torch._C._dispatch_has_kernel_for_dispatch_key(f"roi_ops::{op}", key)
    )


NATIVE_DEVICE_TYPES = kernel_device_types("roi_align")


def op_has_argument(op: str, name: str) -> bool:
    """Whether the loaded build's schema of ``roi_ops::<op>`` has an argument ``name`` (False without ``_C``)."""
    if _IMPORT_ERROR is not None:
        return False
    schema = getattr(torch.ops.roi_ops, op).default._schema
    return any(a.name == name for a in schema.arguments)


def native_available(device_type: str = "cpu") -> bool:
    """True when the C++/CUDA kernels are loaded for ``device_type``."""
    return device_type in NATIVE_DEVICE_TYPES


def native_import_error() -> Optional[ImportError]:
    """Why the extension failed to load (None when it loaded)."""
    return _IMPORT_ERROR


@contextlib.contextmanager
def trusted_boxes(trusted: bool = True) -> Iterator[None]:
    """Internal: run the ops of the ``with`` block, in this thread, without reading their boxes on the host.

    Every op checks its box *values* (finite, batch indices in range, mapped extents bounded) on a host copy of
    ``rois``: on CUDA, one device synchronisation per op call. Code that built its boxes from values it validated
    once (the ROICtrl adapter: from a validated ``ROICtrlInstances``, once per UNet call) runs the ops in this
    scope, where that copy and those checks are skipped; everything else (shapes, dtypes, devices, sizes) is
    still checked. The autograd backward of an op called in the scope runs in it too (its boxes are the ones
    the forward was given). Boxes that break the contract of docs/spec.md inside the scope are undefined
    behaviour: this is not an API for unchecked user input. ``trusted=False`` restores the checks inside an
    outer scope. A no-op while ``torch.compile`` traces (the compiled graph keeps the checks) and without the
    compiled extension.
    """
    if _IMPORT_ERROR is not None or torch.compiler.is_compiling():
        yield
        return
    previous = torch.ops.roi_ops._set_trusted_boxes(trusted)
    try:
        yield
    finally:
        torch.ops.roi_ops._set_trusted_boxes(previous)


def host_box_reads() -> int:
    """How many times an op read its box table on the host in this process (each one a device sync on CUDA);
    for tests of :func:`trusted_boxes`."""
    return 0 if _IMPORT_ERROR is not None else int(torch.ops.roi_ops._host_box_reads())


def _trusted_now() -> bool:
    """Whether this thread is inside :func:`trusted_boxes` now (for code that reruns ops later, as a backward)."""
    return _IMPORT_ERROR is None and not torch.compiler.is_compiling() and bool(torch.ops.roi_ops._trusted_boxes())


def _double_backward_error(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"roi_ops: double backward of {name} is not supported "
            "(its backward is not differentiable)"
        )

    return backward


if _IMPORT_ERROR is None:
    ops = torch.ops.roi_ops

    # ------------------------------------------------ fake kernels

    def _empty_like_format(like, shape):
        # outputs are contiguous in the memory format of the op's input
        return torch.empty(shape, dtype=like.dtype, device=like.device,
                           memory_format=suggest_memory_format(like))

    def _check_rois(rois):
        torch._check(
            rois.dim() == 2 and rois.shape[1] == 5,
            lambda: f"rois must be Tensor[K, 5], got Tensor{list(rois.shape)}",
        )

    def _check_blend_operands(base, base_logit, input, input_logit, rois):
        torch._check(base.dim() == 4, lambda: f"base must be 4-D, got {base.dim()}-D")
        _check_rois(rois)
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

    def _check_coverage(base, coverage, rois):
        if coverage is None:
            return
        torch._check(
            coverage.dim() == 3 and coverage.shape[0] == rois.shape[0],
            lambda: f"coverage must be Tensor[{rois.shape[0]}, FH, FW], got Tensor{list(coverage.shape)}",
        )

    @torch.library.register_fake("roi_ops::roi_unpool_blend")
    def _roi_unpool_blend_fake(base, base_logit, input, input_logit, rois, spatial_scale, aligned,
                               coverage=None):
        _check_blend_operands(base, base_logit, input, input_logit, rois)
        _check_coverage(base, coverage, rois)
        B, C, H, W = base.shape
        return _empty_like_format(base, (B, C, H, W)), base_logit.new_empty((B, H, W))

    @torch.library.register_fake("roi_ops::_roi_unpool_blend_backward")
    def _roi_unpool_blend_backward_fake(grad_out, grad_base_weight, base, base_logit, input,
                                        input_logit, rois, spatial_scale, aligned, coverage=None):
        _check_blend_operands(base, base_logit, input, input_logit, rois)
        _check_coverage(base, coverage, rois)
        return (
            _empty_like_format(base, base.shape),
            base_logit.new_empty(base_logit.shape),
            _empty_like_format(input, input.shape),
            input_logit.new_empty(input_logit.shape),
            base.new_empty((0,)) if coverage is None else coverage.new_empty(coverage.shape),
        )

    # ------------------------------------------------ autograd

    def _roi_align_setup(ctx, inputs, output):
        input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = inputs
        ctx.save_for_backward(rois)
        ctx.input_shape = input.shape
        ctx.args = (spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
        ctx.trusted = _trusted_now()

    def _roi_align_backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned = ctx.args
        batch, channels, height, width = ctx.input_shape
        with trusted_boxes(ctx.trusted):
            grad_input = ops._roi_align_backward(
                grad, rois, spatial_scale, pooled_height, pooled_width,
                batch, channels, height, width, sampling_ratio, aligned,
            )
        return grad_input, None, None, None, None, None, None

    def _roi_unpool_setup(ctx, inputs, output):
        input, rois, spatial_scale, height, width, aligned = inputs
        ctx.save_for_backward(rois)
        ctx.args = (spatial_scale, input.shape[2], input.shape[3], aligned)
        ctx.trusted = _trusted_now()

    def _roi_unpool_backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        spatial_scale, pooled_height, pooled_width, aligned = ctx.args
        with trusted_boxes(ctx.trusted):
            grad_input = ops._roi_unpool_backward(
                grad, rois, spatial_scale, pooled_height, pooled_width, aligned
            )
        return grad_input, None, None, None, None, None

    def _roi_unpool_blend_setup(ctx, inputs, output):
        base, base_logit, input, input_logit, rois, spatial_scale, aligned = inputs[:7]
        coverage = inputs[7] if len(inputs) > 7 else None
        # only the inputs: the backward recomputes the softmax and the pasted
        # values per pixel instead of keeping anything at full resolution per ROI
        ctx.save_for_backward(base, base_logit, input, input_logit, rois, coverage)
        ctx.args = (spatial_scale, aligned)
        ctx.num_inputs = len(inputs)
        ctx.trusted = _trusted_now()

    def _roi_unpool_blend_backward(ctx, grad_out, grad_base_weight):
        base, base_logit, input, input_logit, rois, coverage = ctx.saved_tensors
        spatial_scale, aligned = ctx.args
        if grad_out is None:  # only base_weight was used
            grad_out = torch.zeros_like(base)
        with trusted_boxes(ctx.trusted):
            if coverage is None:  # the op's call before coverage existed
                grads = ops._roi_unpool_blend_backward(
                    grad_out, grad_base_weight, base, base_logit, input, input_logit, rois,
                    spatial_scale, aligned,
                )
            else:
                grads = ops._roi_unpool_blend_backward(
                    grad_out, grad_base_weight, base, base_logit, input, input_logit, rois,
                    spatial_scale, aligned, coverage,
                )
        grad_coverage = grads[4] if coverage is not None else None
        return (*grads[:4], None, None, None, grad_coverage)[: ctx.num_inputs]

    torch.library.register_autograd(
        "roi_ops::roi_align", _roi_align_backward, setup_context=_roi_align_setup
    )
    torch.library.register_autograd(
        "roi_ops::roi_unpool", _roi_unpool_backward, setup_context=_roi_unpool_setup
    )
    torch.library.register_autograd(
        "roi_ops::roi_unpool_blend", _roi_unpool_blend_backward,
        setup_context=_roi_unpool_blend_setup,
    )
    for _op in ("roi_align", "roi_unpool", "roi_unpool_blend"):
        torch.library.register_autograd(
            f"roi_ops::_{_op}_backward",
            _double_backward_error(_op),
            setup_context=lambda ctx, inputs, output: None,
        )
