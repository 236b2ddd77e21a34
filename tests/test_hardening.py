"""Hardening: every call ends, fast and within bounded memory, with a correct result or a clear error.

Each call runs in a worker subprocess (tests/hardening_worker.py) with one thread, at most 1 GiB of address
space beyond its start-up (under AddressSanitizer: allocations capped at 1 GiB) and a per-call watchdog: a call
that hangs or crashes kills the worker, is reported as such, and a fresh worker takes the next call. A call
that returns is compared with ``roi_ops.reference`` (output and gradient) inside the worker; one that raises
must raise ValueError, TypeError or RuntimeError whose message names the argument at fault.

The fixed reproducers are the cases of issue 9 and variations of them; the hypothesis test draws extreme
floats (+-3.4e38, denormals, values that overflow once scaled), zero and huge sizes and sampling ratios.
"""

from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import tempfile
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import roi_ops

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hardening_worker.py")
SANITIZED = "libasan" in os.environ.get("LD_PRELOAD", "")
# A correct call takes milliseconds; the limit only has to tell a hang from slow machines (and ASan's ~3x).
CALL_LIMIT_S = 30.0 if SANITIZED else 8.0
ARGUMENTS = ("rois", "boxes", "spatial_scale", "sampling_ratio", "output_size", "pooled_height",
             "pooled_width", "height", "width", "input", "aligned")
CLEAR_ERRORS = ("ValueError", "TypeError", "RuntimeError")


class Worker:
    """One worker subprocess; restarted after a hang or a crash."""

    def __init__(self):
        self.proc = None
        self.stderr = None

    def _start(self):
        env = dict(os.environ)
        # the roi_ops this test imported (the sanitized copy under `make sanitize`)
        root = os.path.dirname(os.path.dirname(os.path.abspath(roi_ops.__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env["OMP_NUM_THREADS"] = "1"
        if SANITIZED:
            extra = "allocator_may_return_null=1:max_allocation_size_mb=1024"
            env["ASAN_OPTIONS"] = ":".join(filter(None, [env.get("ASAN_OPTIONS", ""), extra]))
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, env=env, text=True, bufsize=1)
        ready = self._read(120.0)
        assert ready == {"status": "ready"}, f"worker did not start: {ready}"

    def _read(self, limit_s):
        deadline = time.monotonic() + limit_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return {"status": "timeout"}
            readable, _, _ = select.select([self.proc.stdout], [], [], left)
            if readable:
                line = self.proc.stdout.readline()
                if not line:
                    self.proc.wait()
                    self.stderr.seek(0)
                    tail = self.stderr.read()[-3000:].decode(errors="replace")
                    return {"status": "crash", "returncode": self.proc.returncode, "stderr": tail}
                return json.loads(line)

    def call(self, case: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        start = time.monotonic()
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        answer = self._read(CALL_LIMIT_S)
        answer["seconds"] = time.monotonic() - start
        if answer["status"] in ("timeout", "crash"):
            self.close()
        return answer

    def close(self):
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def judge(case: dict, answer: dict, expect=None) -> None:
    """``expect``: None (a correct result or a clear error), "ok", or (error type, substring of the message)."""
    status = answer["status"]
    assert status not in ("timeout", "crash"), f"{status} on {case}: {answer}"
    if status == "ok":
        assert not answer["mismatch"], f"wrong result on {case}: {answer['mismatch']}"
        assert expect is None or expect == "ok", f"expected {expect} on {case}, got a result"
        return
    assert expect != "ok", f"expected a result on {case}, got {answer['type']}: {answer['message']}\n{answer['where']}"
    assert any(b in CLEAR_ERRORS for b in answer["bases"]), f"unclear error on {case}: {answer}"
    message = answer["message"]
    assert any(arg in message for arg in ARGUMENTS), f"error names no argument on {case}: {message}"
    if expect is not None:
        kind, text = expect
        assert kind in answer["bases"] and text in message, f"expected {kind} naming {text!r} on {case}: {answer}"


def align(rois, output_size=2, spatial_scale=1.0, sampling_ratio=-1, aligned=False, shape=(1, 1, 8, 8),
          dtype="float32", box_dtype="float32"):
    return dict(op="roi_align", rois=rois, output_size=output_size, spatial_scale=spatial_scale,
                sampling_ratio=sampling_ratio, aligned=aligned, input_shape=list(shape), dtype=dtype,
                box_dtype=box_dtype)


def unpool(rois, output_size=8, spatial_scale=1.0, aligned=False, grid=(2, 2), channels=1, dtype="float32",
           box_dtype="float32"):
    return dict(op="roi_unpool", rois=rois, output_size=output_size, spatial_scale=spatial_scale,
                aligned=aligned, input_shape=[len(rois), channels, *grid], dtype=dtype, box_dtype=box_dtype)


OVERFLOW = [0.0, -3e38, 0.0, 3e38, 4.0]  # finite, but its width is inf in float32
SMALL = [0.0, 1.0, 1.5, 5.0, 6.0]

REPRODUCERS = [
    # 1. a width or height that overflows the coordinate dtype: an error naming the box, forward and in
    #    the reference alike (the reference used to raise an index error for roi_unpool)
    (align([OVERFLOW]), ("ValueError", "rois[0]")),
    (align([OVERFLOW], aligned=True), ("ValueError", "rois[0]")),
    (align([SMALL, [0.0, 2.0, -3.4e38, 3.0, 3.4e38]], sampling_ratio=2), ("ValueError", "rois[1]")),
    (align([[0.0, 1e38, 1.0, 3e38, 2.0]], spatial_scale=2.0), ("ValueError", "rois[0]")),
    (align([[0.0, -1.7e308, 0.0, 1.7e308, 4.0]], box_dtype="float64"), ("ValueError", "rois[0]")),
    (unpool([OVERFLOW]), ("ValueError", "rois[0]")),
    (unpool([OVERFLOW], aligned=True), ("ValueError", "rois[0]")),
    # ... while the largest finite boxes still compute (and match the reference)
    (align([[0.0, -1.7e38, 0.0, 1.7e38, 4.0]]), "ok"),
    (align([[0.0, -1.7e38, -1.7e38, 1.7e38, 1.7e38]], aligned=True, output_size=3), "ok"),
    (unpool([[0.0, -1.7e38, 0.0, 1.7e38, 4.0]]), "ok"),
    # 8. spatial_scale positive and finite in Python but 0 or inf in the coordinate dtype
    (align([SMALL], spatial_scale=1e39), ("ValueError", "spatial_scale")),
    (align([SMALL], spatial_scale=1e-50), ("ValueError", "spatial_scale")),
    (unpool([SMALL], spatial_scale=1e39), ("ValueError", "spatial_scale")),
    (unpool([SMALL], spatial_scale=1e-50), ("ValueError", "spatial_scale")),
    (align([SMALL], spatial_scale=1e39, box_dtype="float64"), "ok"),  # finite in float64
    (align([SMALL], spatial_scale=1e-50, dtype="float64"), "ok"),
    # 2. explicit sampling ratios are bounded up front; the adaptive rule on enormous boxes too
    (align([SMALL, SMALL], output_size=4, sampling_ratio=2**40), ("ValueError", "sampling_ratio")),
    (align([SMALL, SMALL], output_size=4, sampling_ratio=10**8), ("ValueError", "sampling_ratio")),
    (align([SMALL], sampling_ratio=1025), ("ValueError", "sampling_ratio")),
    (align([SMALL], sampling_ratio=1024), "ok"),
    (align([[0.0, -2.0**40, 0.0, 2.0**40, 4.0]], output_size=1), ("ValueError", "rois[0]")),
    (align([[0.0, -1e30, -1e30, 1e30, 1e30]], output_size=(7, 5)), None),
    (align([[0.0, -3e37, 0.0, 3e37, 4.0]], output_size=(1, 10000)), None),
    (align([[0.0, -1e12, 0.0, 1e12, 4.0]], output_size=(1, 1000)), None),
    # 3. huge output sizes fail fast, before allocating
    (align([SMALL], output_size=[1, 10**9]), ("ValueError", "output_size")),
    (align([SMALL], output_size=[10**9, 10**9]), ("ValueError", "output_size")),
    (align([SMALL], output_size=65536), ("RuntimeError", "output_size")),  # 16 GiB: refused by name
    (unpool([SMALL], output_size=[10**9, 1]), ("ValueError", "output_size")),
    (unpool([SMALL], output_size=65536), ("RuntimeError", "output_size")),
    (align([SMALL], output_size=[1, 65536]), "ok"),
    # 4. empty grids: zero output forward, zero (empty) gradient backward
    (unpool([SMALL], grid=(0, 3)), "ok"),
    (unpool([SMALL, SMALL], grid=(2, 0), channels=2), "ok"),
    (unpool([SMALL], grid=(0, 0), aligned=True), "ok"),
]


@pytest.mark.parametrize("case,expect", REPRODUCERS, ids=[f"{c['op']}-{i}" for i, (c, _) in enumerate(REPRODUCERS)])
def test_reproducers(worker, case, expect):
    judge(case, worker.call(case), expect)


REFERENCE_CALLS = [
    # the reference refuses the same boxes by name (it used to index out of range on roi_unpool)
    "from roi_ops import reference as r\nimport torch\n"
    "r.roi_unpool(torch.ones(1, 1, 2, 2), torch.tensor([[0., -3e38, 0., 3e38, 4.]]), (8, 8))",
    "from roi_ops import reference as r\nimport torch\n"
    "r.roi_align(torch.ones(1, 1, 8, 8), torch.tensor([[0., -3e38, 0., 3e38, 4.]]), (2, 2))",
    "from roi_ops import reference as r\nimport torch\n"
    "r.roi_align(torch.ones(1, 1, 8, 8), torch.tensor([[0., -2.**40, 0., 2.**40, 4.]]), (1, 1))",
    "from roi_ops import reference as r\nimport torch\n"
    "r.roi_unpool_blend(torch.ones(1, 1, 8, 8), torch.ones(1, 8, 8), torch.ones(1, 1, 2, 2), torch.ones(1, 2, 2),"
    " torch.tensor([[0., 0., -3.4e38, 4., 3.4e38]]))",
    "from roi_ops import reference as r\nimport torch\n"
    "r.roi_align(torch.ones(1, 1, 8, 8), torch.tensor([[0., 1., 1., 3., 3.]]), (2, 2), 1e39)",
]


@pytest.mark.parametrize("code", REFERENCE_CALLS, ids=["unpool", "align", "align-visits", "blend", "scale"])
def test_reference_refuses_the_same_boxes(worker, code):
    answer = worker.call({"code": code})
    judge({"code": code}, answer, ("ValueError", "spatial_scale" if "1e39" in code else "rois["))


def test_blend_refuses_overflowing_boxes_by_name(worker):
    code = ("import roi_ops, torch\n"
            "roi_ops.roi_unpool_blend(torch.ones(1, 1, 8, 8), torch.ones(1, 8, 8), torch.ones(1, 1, 2, 2),"
            " torch.ones(1, 2, 2), torch.tensor([[0., 0., -3.4e38, 4., 3.4e38]]))")
    judge({"code": code}, worker.call({"code": code}), ("ValueError", "rois[0]"))


def test_worker_limits_hold(worker):
    # the harness itself: an allocation beyond the worker's 1 GiB of headroom fails as an error
    answer = worker.call({"code": "import torch\nx = torch.ones(1 << 29, dtype=torch.float64)"})  # 4 GiB
    assert answer["status"] == "error", answer


# ---------------------------------------------------------------- fuzz

EXTREMES = [0.0, -0.0, 1e-45, -1e-45, 1.2e-38, 1e-30, 0.5, 1.0, 3.0, 7.5, 65504.0, 1e6, 2.0**24 + 1, 2.0**40,
            1e12, 1e30, 1.7e38, 3.4e38, 3.4028234e38]
COORD = st.one_of(
    st.floats(-12.0, 12.0, allow_nan=False),
    st.sampled_from(EXTREMES).flatmap(lambda v: st.sampled_from([v, -v])),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
)
SCALE = st.one_of(
    st.sampled_from([1.0, 0.5, 0.125, 2.0, 1e-50, 1e39, 1e-40, 1e-30, 3e38, 1e30]),
    st.floats(1e-46, 1e40, allow_nan=False, allow_infinity=False),
)
SIDE = st.one_of(st.integers(1, 6), st.sampled_from([0, 65536, 65537, 10**9, 2**40]))


@st.composite
def fuzz_case(draw):
    op = draw(st.sampled_from(["roi_align", "roi_unpool"]))
    k = draw(st.integers(1, 3))
    box_dtype = draw(st.sampled_from(["float32", "float32", "float64"]))
    rois = [[float(draw(st.integers(0, 1))), *(draw(COORD) for _ in range(4))] for _ in range(k)]
    size = draw(st.one_of(SIDE, st.tuples(SIDE, SIDE).map(list)))
    common = dict(rois=rois, output_size=size, spatial_scale=draw(SCALE), aligned=draw(st.booleans()),
                  dtype=draw(st.sampled_from(["float32", "float64", "bfloat16"])), box_dtype=box_dtype)
    if op == "roi_align":
        shape = [2, draw(st.integers(0, 2)), draw(st.integers(0, 9)), draw(st.integers(0, 9))]
        ratio = draw(st.one_of(st.integers(-2, 4), st.sampled_from([1024, 1025, 10**8, 2**40])))
        return dict(op=op, sampling_ratio=ratio, input_shape=shape, **common)
    grid = [k, draw(st.integers(0, 2)), draw(st.integers(0, 4)), draw(st.integers(0, 4))]
    sides = size if isinstance(size, list) else [size, size]
    if max(sides) <= 65536 and math.prod(sides) * k * max(grid[1], 1) > 1 << 20:
        # valid, but the float64 oracle of a giant map would not fit the worker's memory; when one side is
        # too large the op must refuse it before allocating (covered as it is)
        common["output_size"] = [min(s, 512) for s in sides]
    return dict(op=op, input_shape=grid, **common)


@settings(max_examples=100 if SANITIZED else 300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(case=fuzz_case())
def test_fuzz_extreme_arguments(worker, case):
    answer = worker.call(case)
    event(answer["status"] if answer["status"] != "error" else answer["message"].split(":")[1][:30])
    judge(case, answer)


# ---------------------------------------------------------------- meta tensors


@pytest.mark.skipif(not roi_ops.native_available("cpu"), reason="shape inference on meta needs the native extension")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_meta_tensors_infer_shapes(layout):
    import torch

    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.empty(2, 3, 16, 12, device="meta").contiguous(memory_format=fmt)
    boxes = torch.empty(5, 5, device="meta")
    out = roi_ops.roi_align(x, boxes, (4, 3), 0.25, 2, True)
    assert out.device.type == "meta" and tuple(out.shape) == (5, 3, 4, 3)
    assert out.is_contiguous(memory_format=fmt)
    listed = roi_ops.roi_align(x, [torch.empty(2, 4, device="meta"), torch.empty(1, 4, device="meta")], 7)
    assert tuple(listed.shape) == (3, 3, 7, 7)
    grids = torch.empty(5, 3, 4, 3, device="meta").contiguous(memory_format=fmt)
    pasted = roi_ops.roi_unpool(grids, boxes, (16, 12), 0.25, True)
    assert pasted.device.type == "meta" and tuple(pasted.shape) == (5, 3, 16, 12)
    blended, weight = roi_ops.roi_unpool_blend(x, torch.empty(2, 16, 12, device="meta"), grids,
                                               torch.empty(5, 4, 3, device="meta"), boxes)
    assert tuple(blended.shape) == (2, 3, 16, 12) and tuple(weight.shape) == (2, 16, 12)
    # argument checks that need no data still run
    with pytest.raises(ValueError, match="output_size"):
        roi_ops.roi_align(x, boxes, (0, 3))
    with pytest.raises(ValueError, match="spatial_scale"):
        roi_ops.roi_align(x, boxes, 2, 1e39)


def test_meta_tensors_without_the_extension_name_the_device(monkeypatch):
    import torch

    from roi_ops import _ops

    monkeypatch.setattr(_ops, "native_available", lambda device_type="cpu": False)
    monkeypatch.setattr(_ops, "native_import_error", lambda: ImportError("not built"))
    x = torch.empty(1, 1, 8, 8, device="meta")
    with pytest.raises(RuntimeError, match="'meta' device need the native extension"):
        roi_ops.roi_align(x, torch.empty(1, 5, device="meta"), 2)
