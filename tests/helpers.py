"""Shared pieces of the core op tests: devices, dtypes, the tolerance table,
layout makers, hypothesis strategies for boxes, and the oracle comparison.

The oracle is ``roi_ops.reference`` run in float64 on the very same input
values, with the kernel's coordinate dtype, so every floor, ceil and border
test falls where the kernel puts it and only accumulation rounding differs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from hypothesis import strategies as st

import roi_ops
from roi_ops import reference

# ---------------------------------------------------------------- parameters


def available_devices() -> List[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


DEVICES = available_devices()
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# token_major: [B, H*W, C] hidden states viewed as a channels_last [B, C, H, W]
LAYOUTS = ("contiguous", "channels_last", "strided", "transposed", "token_major")

# Per-element tolerance: |kernel - oracle| <= rtol * bound + atol, where bound
# is the oracle applied to |x| (or, for gradients, to |g|): the sum of the
# magnitudes of the terms that make up that element. Both ops have
# non-negative weights, so the bound is exact and cheap, and an element with
# bound 0 must be exactly 0 in the kernel too.
TOLERANCES = {
    # Same coordinates as the oracle, float64 accumulation: only summation
    # order differs, at most ~n * 2**-53 ~ 1e-13 for the n <~ 1e3 terms of
    # these tiny shapes.
    torch.float64: (1e-12, 0.0),
    # float32 accumulation and float32 tap weights: ~sqrt(n) * 2**-24 for a
    # sum of n terms (~2e-6 at n = 1e3), so 1e-5 leaves a 5x margin while
    # still catching any wrong weight or tap (errors of order 1e-1).
    torch.float32: (1e-5, 1e-30),
    # float32 accumulation, then one rounding to float16: 2**-11 ~ 4.9e-4 of
    # |out| <= bound. atol covers float16 subnormals (spacing 6e-8).
    torch.float16: (2e-3, 1e-7),
    # float32 accumulation, then one rounding to bfloat16: 2**-8 ~ 3.9e-3.
    torch.bfloat16: (1e-2, 1e-30),
}


def coord_dtype_for(input_dtype: torch.dtype, boxes_dtype: torch.dtype) -> torch.dtype:
    """The kernels' coordinate dtype (spec): float64 if either is float64, else float32."""
    return torch.float64 if torch.float64 in (input_dtype, boxes_dtype) else torch.float32


def assert_native(device: str) -> None:
    """Fails (never skips) when the C++/CUDA kernels are not what runs."""
    assert roi_ops.native_available(device), (
        f"roi_ops native kernels are not loaded for '{device}' "
        f"(import error: {roi_ops.native_import_error()}); these tests must not run on the fallback"
    )


# ---------------------------------------------------------------- tensors


def make_generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(shape, gen: torch.Generator) -> torch.Tensor:
    """float64 values on the CPU (drawn there so every device sees the same numbers)."""
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64)


@dataclass
class LaidOut:
    """A tensor in some memory layout that autograd can differentiate.

    x is what the op receives; leaf is what requires grad (x itself, or the
    token-major tensor x is a view of); grad_to_x maps leaf.grad onto x's shape.
    """

    leaf: torch.Tensor
    x: torch.Tensor
    grad_to_x: Callable[[torch.Tensor], torch.Tensor]


def lay_out(values: torch.Tensor, dtype: torch.dtype, device: str, layout: str) -> LaidOut:
    """values (float64 [N, C, H, W], CPU) cast to dtype, moved to device, in layout."""
    n, c, h, w = values.shape
    v = values.to(device=device, dtype=dtype)
    if layout == "token_major":
        hs = v.permute(0, 2, 3, 1).reshape(n, h * w, c).clone().requires_grad_()
        x = hs.view(n, h, w, c).permute(0, 3, 1, 2)
        return LaidOut(hs, x, lambda g: g.view(n, h, w, c).permute(0, 3, 1, 2))
    if layout == "contiguous":
        x = v.contiguous()
    elif layout == "channels_last":
        x = v.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        # a slice of a bigger tensor: strides match neither standard format
        big = torch.full((n, c + 1, 2 * h, 2 * w + 1), float("nan"), dtype=dtype, device=device)
        big[:, 1:, ::2, 1::2] = v
        x = big[:, 1:, ::2, 1::2]
    elif layout == "transposed":
        x = v.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        raise AssertionError(f"unknown layout {layout}")
    x = x.detach().requires_grad_()
    return LaidOut(x, x, lambda g: g)


# ---------------------------------------------------------------- boxes


Row = Tuple[float, float, float, float, float]  # (batch_index, x1, y1, x2, y2)


def make_boxes(rows: Sequence[Row], batch: int, form: str, dtype: torch.dtype, device: str):
    """rows as Tensor[K, 5] ("tensor") or a list of `batch` Tensor[K_b, 4] ("list").

    The list form groups rows by batch index (stable), which is the order of
    the op's output; rois_of() gives the matching Tensor[K, 5].
    """
    if form == "tensor":
        return torch.tensor([list(r) for r in rows], dtype=dtype, device=device).reshape(-1, 5)
    if form == "list":
        out = []
        for b in range(batch):
            sel = [list(r[1:]) for r in rows if int(r[0]) == b]
            out.append(torch.tensor(sel, dtype=dtype, device=device).reshape(-1, 4))
        return out
    raise AssertionError(f"unknown boxes form {form}")


def rois_of(boxes) -> torch.Tensor:
    """Tensor[K, 5] float64 with exactly the values the op receives."""
    if isinstance(boxes, torch.Tensor):
        return boxes.detach().to(torch.float64)
    pieces = []
    for b, t in enumerate(boxes):
        t = t.detach().to(torch.float64)
        pieces.append(torch.cat([torch.full((t.shape[0], 1), float(b), dtype=torch.float64, device=t.device), t], 1))
    if not pieces:
        return torch.zeros((0, 5), dtype=torch.float64)
    return torch.cat(pieces)


def boxes_dtype_of(boxes) -> torch.dtype:
    if isinstance(boxes, torch.Tensor):
        return boxes.dtype
    return boxes[0].dtype if boxes else torch.float32


def huge_for(dtype: torch.dtype) -> float:
    # float16 boxes cannot hold 1e6 (max 65504); inf would be a bad input
    return 6.0e4 if dtype == torch.float16 else 1.0e6


AXIS_MODES_RANDOM = ("inside", "random")
AXIS_MODES_ADVERSARIAL = (
    "inside", "random", "edge", "degenerate", "inverted", "outside", "huge", "tiny",
)


@st.composite
def axis_interval(draw, size: int, scale: float, modes: Sequence[str], huge: float):
    """(a, b): one axis of a box in image units for a feature axis of `size` pixels."""
    extent = size / scale
    unit = 1.0 / scale  # one feature pixel in image units

    def f(lo, hi):
        return draw(st.floats(lo, hi, allow_nan=False, allow_infinity=False))

    mode = draw(st.sampled_from(modes))
    if mode == "inside":
        a = f(0.0, extent)
        b = f(a, extent)
    elif mode == "random":
        a = f(-0.5 * extent - 2 * unit, 1.5 * extent + 2 * unit)
        b = f(-0.5 * extent - 2 * unit, 1.5 * extent + 2 * unit)
    elif mode == "edge":
        # edges on whole or half feature pixels: aligned or not, some sample
        # positions and coverage ends land exactly on pixel centres, -1 or H
        n = draw(st.integers(-2, size + 1))
        m = draw(st.integers(0, size + 2))
        half = draw(st.sampled_from([0.0, 0.5]))
        a = (n + half) * unit
        b = (n + m + half) * unit
    elif mode == "degenerate":
        a = f(-unit, extent + unit)
        b = a
    elif mode == "inverted":
        a = f(0.0, extent + unit)
        b = a - f(1e-3, extent + unit)
    elif mode == "outside":
        if draw(st.booleans()):
            b = -f(0.0, 3.0) * unit
            a = b - f(0.0, 3.0) * unit
        else:
            a = extent + f(0.0, 3.0) * unit
            b = a + f(0.0, 3.0) * unit
    elif mode == "huge":
        kind = draw(st.sampled_from(["both", "low", "high", "far"]))
        mid = f(0.0, extent)
        a, b = {"both": (-huge, huge), "low": (-huge, mid), "high": (mid, huge),
                "far": (huge / 2, huge)}[kind]
    elif mode == "tiny":
        a = f(-unit, extent + unit)
        b = a + draw(st.sampled_from([1e-3, 1e-6]))
    else:
        raise AssertionError(mode)
    return a, b


@st.composite
def box_rows(draw, counts: Sequence[int], height: int, width: int, scale: float,
             modes: Sequence[str], huge: float, shuffle: bool = True) -> List[Row]:
    rows = []
    for b, n in enumerate(counts):
        for _ in range(n):
            x1, x2 = draw(axis_interval(width, scale, modes, huge))
            y1, y2 = draw(axis_interval(height, scale, modes, huge))
            rows.append((float(b), x1, y1, x2, y2))
    if shuffle and rows:
        # the Tensor[K, 5] form need not be sorted by image
        rows = draw(st.permutations(rows))
    return list(rows)


@dataclass
class Case:
    """One randomly drawn op call (shapes, boxes, flags) plus a data seed."""

    batch: int
    channels: int
    height: int
    width: int
    pooled: Tuple[int, int]
    output_size: Union[int, Tuple[int, int]]
    spatial_scale: float
    sampling_ratio: int
    rows: List[Row]
    boxes_form: str
    boxes_dtype: Optional[torch.dtype]  # None: same as the input
    seed: int
    extra: dict = field(default_factory=dict)


@st.composite
def cases(draw, adversarial: bool = False, max_batch: int = 2, max_per_image: int = 3,
          min_size: int = 1, max_size: int = 7, max_pooled: int = 4):
    batch = draw(st.integers(1, max_batch))
    channels = draw(st.integers(1, 3))
    height = draw(st.integers(min_size, max_size))
    width = draw(st.integers(min_size, max_size))
    ph = draw(st.integers(1, max_pooled))
    pw = draw(st.integers(1, max_pooled))
    output_size = draw(st.sampled_from([(ph, pw), ph])) if ph == pw else (ph, pw)
    scales = [1.0, 0.5, 0.125] if adversarial else [1.0, 0.5]
    scale = draw(st.sampled_from(scales))
    sampling_ratio = draw(st.sampled_from([-1, 0, 1, 2, 3]))
    counts = draw(st.lists(st.integers(0, max_per_image), min_size=batch, max_size=batch))
    boxes_dtype = draw(st.sampled_from([None, torch.float32, torch.float64, torch.float16]))
    huge = huge_for(boxes_dtype) if boxes_dtype is not None else 6.0e4
    modes = AXIS_MODES_ADVERSARIAL if adversarial else AXIS_MODES_RANDOM
    rows = draw(box_rows(counts, height, width, scale, modes, huge))
    form = draw(st.sampled_from(["tensor", "list"]))
    seed = draw(st.integers(0, 2**31 - 1))
    return Case(batch, channels, height, width, (ph, pw), output_size, scale,
                sampling_ratio, rows, form, boxes_dtype, seed)


# ---------------------------------------------------------------- comparison


def vjp(out: torch.Tensor, inp: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Aᵀ grad through autograd, for the oracle (zeros when out does not depend on inp)."""
    if not out.requires_grad:
        return torch.zeros_like(inp)
    (g,) = torch.autograd.grad(out, inp, grad, retain_graph=True, allow_unused=True)
    return torch.zeros_like(inp) if g is None else g


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor,
                  dtype: torch.dtype, what: str) -> None:
    """Elementwise |actual - expected| <= rtol * bound + atol (TOLERANCES[dtype])."""
    rtol, atol = TOLERANCES[dtype]
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)}, oracle {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    b = bound.detach().to("cpu", torch.float64)
    finite = torch.isfinite(a)
    assert bool(finite.all()), (
        f"{what}: {int((~finite).sum())} non-finite values, e.g. at {tuple(torch.nonzero(~finite)[0].tolist())}")
    err = (a - e).abs()
    allowed = rtol * b + atol
    bad = err > allowed
    if bool(bad.any()):
        excess = torch.where(bad, err / allowed.clamp_min(1e-300), torch.zeros_like(err))
        flat = int(excess.reshape(-1).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off the float64 oracle "
            f"(rtol={rtol}, atol={atol} of the per-element bound); worst at {idx}: "
            f"got {a[idx].item()!r}, oracle {e[idx].item()!r}, bound {b[idx].item()!r}")


def _check_against_oracle(lo: LaidOut, boxes, run, oracle, out_shape, gen: torch.Generator,
                          what: str) -> torch.Tensor:
    """Forward and backward of ``run(x)`` (a roi_ops op on lo.x) against ``oracle(x64, rois, coord_dtype)``,
    the float64 reference, each within the per-element bound the reference gives for |x| and |g|."""
    x = lo.x
    dtype, device = x.dtype, x.device
    rois = rois_of(boxes).to(device)
    out = run(x)
    assert out.dtype == dtype and out.device == x.device
    assert tuple(out.shape) == tuple(out_shape), f"{what}: output shape {tuple(out.shape)}"
    g = randn(out.shape, gen).to(device=device, dtype=dtype)
    gx = lo.grad_to_x(torch.autograd.grad(out, lo.leaf, g)[0])
    assert gx.dtype == dtype

    cd = coord_dtype_for(dtype, boxes_dtype_of(boxes))
    x64 = x.detach().to(torch.float64).requires_grad_()
    g64 = g.to(torch.float64)
    ref = oracle(x64, rois, cd)
    ref_gx = vjp(ref, x64, g64)
    gx_bound = vjp(ref, x64, g64.abs())
    with torch.no_grad():
        bound = oracle(x64.abs(), rois, cd)
    assert_within(out, ref, bound, dtype, f"{what} forward")
    assert_within(gx, ref_gx, gx_bound, dtype, f"{what} backward (grad input)")
    return out


def check_roi_align(lo: LaidOut, boxes, output_size, spatial_scale: float,
                    sampling_ratio: int, aligned: bool, gen: torch.Generator,
                    what: str = "roi_align") -> torch.Tensor:
    """Forward and backward of roi_ops.roi_align on lo.x against the float64 oracle."""
    B, C, H, W = lo.x.shape
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    return _check_against_oracle(
        lo, boxes,
        lambda x: roi_ops.roi_align(x, boxes, output_size, spatial_scale, sampling_ratio, aligned),
        lambda x64, rois, cd: reference.roi_align(x64, rois, output_size=(ph, pw), spatial_scale=spatial_scale,
                                                  sampling_ratio=sampling_ratio, aligned=aligned, coord_dtype=cd),
        (rois_of(boxes).shape[0], C, ph, pw), gen, what)


def check_roi_unpool(lo: LaidOut, boxes, output_size, spatial_scale: float,
                     aligned: bool, gen: torch.Generator, what: str = "roi_unpool") -> torch.Tensor:
    """Forward and backward of roi_ops.roi_unpool on lo.x against the float64 oracle."""
    K, C, PH, PW = lo.x.shape
    h, w = (output_size, output_size) if isinstance(output_size, int) else output_size
    return _check_against_oracle(
        lo, boxes,
        lambda x: roi_ops.roi_unpool(x, boxes, output_size, spatial_scale, aligned),
        lambda x64, rois, cd: reference.roi_unpool(x64, rois, output_size=(h, w), spatial_scale=spatial_scale,
                                                   aligned=aligned, coord_dtype=cd),
        (K, C, h, w), gen, what)


def assert_layouts_bitwise_equal(op, values: torch.Tensor, dtype: torch.dtype, device, grad_out: torch.Tensor):
    """``op(x)`` forward and backward give the same bits for every layout of LAYOUTS as for contiguous."""
    results = {}
    for layout in LAYOUTS:
        lo = lay_out(values, dtype, device, layout)
        out = op(lo.x)
        (gleaf,) = torch.autograd.grad(out, lo.leaf, grad_out)
        results[layout] = (out, lo.grad_to_x(gleaf))
    ref_out, ref_grad = results["contiguous"]
    for layout, (out, grad) in results.items():
        for what, a, b in (("forward", out, ref_out), ("backward", grad, ref_grad)):
            assert torch.equal(a, b), (
                f"{what} for {layout} differs from contiguous in {int((a != b).sum())} of {a.numel()} "
                f"elements, by up to {float((a.double() - b.double()).abs().max()):.3g}")


def dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
