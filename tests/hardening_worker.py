"""Worker process of the hardening tests (tests/test_hardening.py): runs op calls described as JSON, one per
line on stdin, and answers one JSON line per call on stdout.

It runs under resource limits set by the parent (address space or, under AddressSanitizer, the sanitizer's
allocation cap) with one intra-op thread; the parent kills it when a call runs past its time limit, so a hang
or a crash is seen as exactly that and never stalls the suite.

A call either returns, and is then checked against ``roi_ops.reference`` (the oracle: exact to rounding,
gradients included), or raises; the parent judges the exception (type, and that its message names an argument).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback

import torch

import roi_ops
from roi_ops import reference

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _check_against_reference(op: str, case: dict, x: torch.Tensor, rois: torch.Tensor, out: torch.Tensor) -> str:
    """'' when the native result (and its gradient) match the oracle, else what differs.

    Both ops are linear with non-negative weights, so the oracle applied to |x| (and its adjoint to |g|) is
    the sum of the magnitudes of the terms each element adds up: the scale of its rounding error."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, x, g.to(out.dtype), allow_unused=True)
    coord = reference.coord_dtype_for(x, rois)

    def oracle(values):
        xr = values.detach().double().requires_grad_(True)
        if op == "roi_align":
            y = reference.roi_align(xr, rois, case["output_size"], case["spatial_scale"], case["sampling_ratio"],
                                    case["aligned"], coord_dtype=coord)
        else:
            y = reference.roi_unpool(xr, rois, case["output_size"], case["spatial_scale"], case["aligned"],
                                     coord_dtype=coord)
        return xr, y

    xr, ref = oracle(x)
    (ref_grad,) = torch.autograd.grad(ref, xr, g, allow_unused=True)
    xa, ref_abs = oracle(x.abs())
    (ref_abs_grad,) = torch.autograd.grad(ref_abs, xa, g.abs(), allow_unused=True)
    rel = 1e-2 if x.dtype in (torch.float16, torch.bfloat16) else 1e-4 if x.dtype == torch.float32 else 1e-10
    for name, a, b, scale in (("output", out, ref, ref_abs), ("gradient", grad, ref_grad, ref_abs_grad)):
        a = torch.zeros_like(xr) if a is None else a
        b = torch.zeros_like(xr) if b is None else b
        scale = torch.zeros_like(b) if scale is None else scale
        if tuple(a.shape) != tuple(b.shape):
            return f"{name} shape {tuple(a.shape)} vs reference {tuple(b.shape)}"
        diff = (a.double() - b.double()).abs()
        if diff.numel() and not bool((diff <= 1e-6 + rel * scale.double()).all()):
            return f"{name} differs from the reference by up to {float(diff.max())}"
    return ""


def run_op(case: dict) -> dict:
    op = case["op"]
    torch.manual_seed(0)
    x = torch.randn(case["input_shape"], dtype=DTYPES[case["dtype"]]).requires_grad_(True)
    rois = torch.tensor(case["rois"], dtype=DTYPES[case["box_dtype"]]).reshape(-1, 5)
    fn = getattr(roi_ops, op)
    if op == "roi_align":
        out = fn(x, rois, case["output_size"], case["spatial_scale"], case["sampling_ratio"], case["aligned"])
    else:
        out = fn(x, rois, case["output_size"], case["spatial_scale"], case["aligned"])
    size = case["output_size"]
    case = {**case, "output_size": (size, size) if isinstance(size, int) else tuple(size)}
    try:
        mismatch = _check_against_reference(op, case, x, rois, out)
    except Exception as exc:  # noqa: BLE001 - the op returned: whatever fails now is the check's finding
        mismatch = f"the call returned, its check raised {type(exc).__name__}: {exc}"
    return {"status": "ok", "mismatch": mismatch}


def run_code(case: dict) -> dict:
    scope: dict = {}
    exec(case["code"], scope)  # the test file's own snippets
    return {"status": "ok", "mismatch": scope.get("mismatch", "")}


def _limit_memory() -> None:
    """At most 1 GiB more address space than after start-up. Under AddressSanitizer (whose shadow memory needs
    terabytes of address space) the parent caps each allocation through ASAN_OPTIONS instead."""
    if "libasan" in os.environ.get("LD_PRELOAD", ""):
        return
    with open("/proc/self/status") as f:
        peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmPeak:"))
    limit = peak_kib * 1024 + (1 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main() -> None:
    torch.set_num_threads(1)
    _limit_memory()
    sys.stdout.write(json.dumps({"status": "ready"}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        case = json.loads(line)
        try:
            answer = run_code(case) if "code" in case else run_op(case)
        except Exception as exc:  # noqa: BLE001 - the parent judges every exception
            answer = {"status": "error", "type": type(exc).__name__,
                      "bases": [c.__name__ for c in type(exc).__mro__], "message": str(exc)[:2000],
                      "where": traceback.format_exc(limit=-3)[-1500:]}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
