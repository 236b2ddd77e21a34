"""GPU benchmarks of roi_ops' CUDA kernels, for a session that has a GPU.

    python benchmarks/bench_cuda.py                 # writes benchmarks/results/cuda_<gpu>_<date>.json
    python benchmarks/bench_cuda.py --quick         # a fast smoke run (fewer reps, float32 only)
    python benchmarks/bench_cuda.py --device cpu --quick --out /tmp/x.json   # checks the script itself

Measures, on the shapes of benchmarks/bench_ops.py (SD1.5 512 px and 1024 px
UNet level 1, a detection box head, a mask paste-back), forward and
forward+backward of:

  roi_align:  roi_ops (deterministic gather backward), torchvision.ops.roi_align
              with its atomic CUDA backward, torchvision under
              torch.use_deterministic_algorithms(True) (which makes it fall back
              to its pure-PyTorch implementation), and the grid_sample baseline;
  roi_unpool: roi_ops and the grid_sample baseline;

plus ROI-Unpool's forward bandwidth (bytes written and read / time) as a
fraction of the device's measured copy and fill bandwidth. Every measured
implementation is also run twice to record whether its gradients are
bitwise reproducible. Times are medians over CUDA-event-timed repetitions
after warm-up. The JSON holds the GPU, driver, CUDA, torch, torchvision and
roi_ops versions, every timing, the speed-ups against each baseline measured
in the same run, and the issue's acceptance check (roi_ops ROI-Align
forward+backward at least as fast as torchvision's on sd15_512_l1, float32).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import roi_ops  # noqa: E402

# The shapes and the box generator are bench_ops.py's, so CPU and GPU
# results describe the same workloads.
from bench_ops import CASES, make_rois  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYOUTS = ("contiguous", "channels_last")
MODES = ("fwd", "fwd+bwd")


def _torchvision_roi_align():
    try:
        from torchvision.ops import roi_align  # noqa: F401

        return roi_align
    except Exception:  # not installed, or built for another torch
        return None


def _grid_sample_baselines():
    try:
        import baselines

        return baselines
    except Exception:
        return None


@contextmanager
def deterministic(enabled: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


# ---------------------------------------------------------------- timing


class Timer:
    """Median milliseconds of fn() over reps, CUDA events on a GPU."""

    def __init__(self, device: str, target_s: float, min_reps: int, max_reps: int):
        self.device, self.target_s = device, target_s
        self.min_reps, self.max_reps = min_reps, max_reps

    def _sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _once(self, fn) -> float:
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def __call__(self, fn: Callable[[], None]) -> Dict[str, float]:
        for _ in range(3):  # warm-up: caching allocator, lazy module loading, autotuning
            fn()
        self._sync()
        first = self._once(fn)
        reps = int(min(self.max_reps, max(self.min_reps, self.target_s * 1e3 / max(first, 1e-3))))
        times = sorted(self._once(fn) for _ in range(reps))
        return {"median_ms": statistics.median(times), "min_ms": times[0],
                "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))], "reps": reps}


# ---------------------------------------------------------------- implementations


def implementations(op: str, case: dict) -> Dict[str, Callable]:
    """name -> fn(x, rois) for one op; each returns the op's output."""
    grid, scale, sr, aligned = case["grid"], case["spatial_scale"], case["sampling_ratio"], case["aligned"]
    out_hw = tuple(case["input"][2:])
    impls: Dict[str, Callable] = {}
    if op == "roi_align":
        impls["roi_ops"] = lambda x, r: roi_ops.roi_align(x, r, grid, scale, sr, aligned)
        tv = _torchvision_roi_align()
        if tv is not None:
            impls["torchvision"] = lambda x, r: tv(x, r, grid, scale, sr, aligned)
            impls["torchvision_deterministic"] = lambda x, r: tv(x, r, grid, scale, sr, aligned)
    else:
        impls["roi_ops"] = lambda x, r: roi_ops.roi_unpool(x, r, out_hw, scale, aligned)
    bl = _grid_sample_baselines()
    if bl is not None:
        if op == "roi_align":
            impls["grid_sample"] = lambda x, r: bl.grid_sample_roi_align(x, r, grid, scale, sr, aligned)
        else:
            impls["grid_sample"] = lambda x, r: bl.grid_sample_roi_unpool(x, r, out_hw, scale, aligned)
    return impls


def make_inputs(case: dict, op: str, dtype: torch.dtype, layout: str, device: str):
    gen = torch.Generator().manual_seed(1)
    rois = make_rois(case).to(device)
    B, C, H, W = case["input"]
    PH, PW = case["grid"]
    shape = (B, C, H, W) if op == "roi_align" else (rois.shape[0], C, PH, PW)
    x = torch.randn(shape, generator=gen).to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, rois


def output_bytes(case: dict, op: str, dtype: torch.dtype) -> int:
    B, C, H, W = case["input"]
    PH, PW = case["grid"]
    K = case["num_boxes"]
    elem = torch.empty((), dtype=dtype).element_size()
    return (K * C * H * W if op == "roi_unpool" else K * C * PH * PW) * elem


def measure(case_name: str, op: str, dtype_name: str, layout: str, device: str, timer: Timer,
            max_bytes: int) -> List[dict]:
    case = CASES[case_name]
    dtype = DTYPES[dtype_name]
    rows = []
    need = 3 * output_bytes(case, op, dtype)  # output, its gradient, the input gradient (or reads)
    if need > max_bytes:
        return [{"case": case_name, "op": op, "dtype": dtype_name, "layout": layout,
                 "skipped": f"needs ~{need / 2**30:.1f} GiB, limit {max_bytes / 2**30:.1f} GiB"}]
    x0, rois = make_inputs(case, op, dtype, layout, device)
    for impl, fn in implementations(op, case).items():
        det = impl == "torchvision_deterministic"
        row = {"case": case_name, "op": op, "dtype": dtype_name, "layout": layout, "impl": impl,
               "input": list(x0.shape), "num_rois": int(rois.shape[0])}
        try:
            with deterministic(det):
                x = x0.detach().requires_grad_()
                out = fn(x, rois)
                g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device, dtype)
                del out

                def fwd():
                    with torch.no_grad():
                        fn(x0, rois)

                def fwd_bwd():
                    x.grad = None
                    fn(x, rois).backward(g)

                grads = []
                for _ in range(2):
                    fwd_bwd()
                    grads.append(x.grad.clone())
                row["bitwise_reproducible_grad"] = bool(torch.equal(grads[0], grads[1]))
                del grads
                row["fwd"] = timer(fwd)
                row["fwd+bwd"] = timer(fwd_bwd)
                x.grad = None
        except Exception as exc:  # record and go on: one failing baseline must not lose the rest
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        if device == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
    return rows


# ---------------------------------------------------------------- bandwidth


def device_bandwidth(device: str, timer: Timer, nbytes: int = 2**30) -> dict:
    """Copy (read + write) and fill (write) bandwidth in GB/s (1e9 bytes/s)."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    copy = timer(lambda: dst.copy_(src))
    fill = timer(lambda: dst.fill_(1.0))
    del src, dst
    return {"bytes": nbytes,
            "copy_GBps": 2 * nbytes / copy["median_ms"] / 1e6,
            "fill_GBps": nbytes / fill["median_ms"] / 1e6}


def unpool_bandwidth(rows: List[dict], bw: dict) -> List[dict]:
    out = []
    for r in rows:
        if r.get("op") != "roi_unpool" or r.get("impl") != "roi_ops" or "fwd" not in r:
            continue
        case = CASES[r["case"]]
        dtype = DTYPES[r["dtype"]]
        written = output_bytes(case, "roi_unpool", dtype)
        K, C = r["input"][0], r["input"][1]
        read = K * C * case["grid"][0] * case["grid"][1] * torch.empty((), dtype=dtype).element_size()
        gbps = (written + read) / r["fwd"]["median_ms"] / 1e6
        out.append({"case": r["case"], "dtype": r["dtype"], "layout": r["layout"],
                    "bytes_written": written, "bytes_read": read, "GBps": gbps,
                    "fraction_of_fill": gbps / bw["fill_GBps"],
                    "fraction_of_copy": gbps / bw["copy_GBps"]})
    return out


# ---------------------------------------------------------------- report


def speedups(rows: List[dict]) -> List[dict]:
    by = {(r["case"], r["op"], r["dtype"], r["layout"], r.get("impl")): r for r in rows}
    out = []
    for (case, op, dtype, layout, impl), r in by.items():
        if impl != "roi_ops":
            continue
        for base in ("torchvision", "torchvision_deterministic", "grid_sample"):
            b = by.get((case, op, dtype, layout, base))
            if not b:
                continue
            for mode in MODES:
                if mode in r and mode in b:
                    out.append({"case": case, "op": op, "dtype": dtype, "layout": layout, "mode": mode,
                                "baseline": base,
                                "speedup": b[mode]["median_ms"] / r[mode]["median_ms"]})
    return out


def acceptance(rows: List[dict]) -> dict:
    """Issue 3: ROI-Align fwd+bwd on CUDA at least as fast as torchvision on
    sd15_512_l1 (float32, contiguous), while deterministic."""
    key = {(r["case"], r["op"], r["dtype"], r["layout"], r.get("impl")): r for r in rows}
    ours = key.get(("sd15_512_l1", "roi_align", "float32", "contiguous", "roi_ops"))
    tv = key.get(("sd15_512_l1", "roi_align", "float32", "contiguous", "torchvision"))
    if not ours or not tv or "fwd+bwd" not in ours or "fwd+bwd" not in tv:
        return {"checked": False, "reason": "roi_ops or torchvision not measured on sd15_512_l1 float32"}
    ratio = tv["fwd+bwd"]["median_ms"] / ours["fwd+bwd"]["median_ms"]
    return {"checked": True, "speedup_vs_torchvision_fwd_bwd": ratio,
            "roi_ops_bitwise_reproducible": ours.get("bitwise_reproducible_grad"),
            "torchvision_bitwise_reproducible": tv.get("bitwise_reproducible_grad"),
            "passed": bool(ratio >= 1.0 and ours.get("bitwise_reproducible_grad"))}


def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return None


def environment(device: str) -> dict:
    env = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "platform": platform.platform(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "roi_ops": getattr(roi_ops, "__version__", None),
           "roi_ops_native": {d: roi_ops.native_available(d) for d in ("cpu", "cuda")},
           "git_commit": _git("rev-parse", "HEAD"), "git_dirty": bool(_git("status", "--porcelain")),
           "device": device}
    try:
        import torchvision

        env["torchvision"] = torchvision.__version__
    except Exception:
        env["torchvision"] = None
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update({"gpu": p.name, "gpu_capability": f"{p.major}.{p.minor}",
                    "gpu_multiprocessors": p.multi_processor_count,
                    "gpu_memory_GiB": round(p.total_memory / 2**30, 1),
                    "cudnn": torch.backends.cudnn.version()})
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True)
        env["nvidia_smi"] = smi.stdout.strip() if smi.returncode == 0 else None
    return env


def _fmt(r: dict, mode: str) -> str:
    return f"{r[mode]['median_ms']:9.3f}" if mode in r else f"{'-':>9}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Benchmark roi_ops' CUDA kernels; write a results JSON.")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="cpu only checks this script (tiny, meaningless timings)")
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated bench_ops case names")
    p.add_argument("--dtypes", default="float32,float16,bfloat16")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--quick", action="store_true", help="float32 only, short timings")
    p.add_argument("--max-gib", type=float, default=None,
                   help="skip combinations needing more memory (default: 60%% of the GPU)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default: benchmarks/results/cuda_<gpu>_<date>.json)")
    args = p.parse_args(argv)

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_cuda: CUDA is not available (use --device cpu to check the script)", file=sys.stderr)
        return 2
    if not roi_ops.native_available(device):
        print(f"bench_cuda: roi_ops native kernels are not loaded for {device} "
              f"({roi_ops.native_import_error()}); build with ROI_OPS_WITH_CUDA=1", file=sys.stderr)
        return 2
    dtypes = ["float32"] if args.quick else [d for d in args.dtypes.split(",") if d]
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; known: {list(CASES)}")
    if device == "cpu":
        timer = Timer(device, target_s=0.05, min_reps=1, max_reps=2)
        cases = cases[:1]
    elif args.quick:
        timer = Timer(device, target_s=0.2, min_reps=5, max_reps=50)
    else:
        timer = Timer(device, target_s=1.0, min_reps=10, max_reps=500)
    if args.max_gib is not None:
        max_bytes = int(args.max_gib * 2**30)
    elif device == "cuda":
        max_bytes = int(0.6 * torch.cuda.get_device_properties(0).total_memory)
    else:
        max_bytes = 2**30

    env = environment(device)
    print(f"bench_cuda: {env.get('gpu', platform.processor() or 'cpu')}, torch {env['torch']}, "
          f"torchvision {env['torchvision']}")
    bw = device_bandwidth(device, timer, 2**30 if device == "cuda" else 2**24)
    print(f"  device bandwidth: copy {bw['copy_GBps']:.0f} GB/s, fill {bw['fill_GBps']:.0f} GB/s")

    rows: List[dict] = []
    print(f"  {'case':16} {'op':10} {'dtype':8} {'layout':13} {'impl':26} {'fwd ms':>9} "
          f"{'fwd+bwd ms':>10}  reproducible")
    for case in cases:
        for op in ("roi_align", "roi_unpool"):
            if op not in CASES[case]["ops"]:
                continue
            for dtype in dtypes:
                for layout in [layout for layout in args.layouts.split(",") if layout]:
                    for r in measure(case, op, dtype, layout, device, timer, max_bytes):
                        rows.append(r)
                        what = r.get("error") or r.get("skipped")
                        print(f"  {case:16} {op:10} {dtype:8} {layout:13} {r.get('impl', '-'):26} "
                              f"{_fmt(r, 'fwd')} {_fmt(r, 'fwd+bwd'):>10}  "
                              f"{r.get('bitwise_reproducible_grad', '-')}" + (f"  [{what}]" if what else ""))

    result = {"environment": env, "device_bandwidth": bw, "results": rows,
              "unpool_bandwidth": unpool_bandwidth(rows, bw), "speedups": speedups(rows),
              "acceptance": acceptance(rows),
              "settings": {"cases": cases, "dtypes": dtypes, "layouts": args.layouts,
                           "quick": args.quick, "timer": vars(timer)}}
    for u in result["unpool_bandwidth"]:
        print(f"  unpool fwd {u['case']} {u['dtype']} {u['layout']}: {u['GBps']:.0f} GB/s = "
              f"{100 * u['fraction_of_fill']:.0f}% of fill, {100 * u['fraction_of_copy']:.0f}% of copy")
    print(f"  acceptance: {result['acceptance']}")
    out = args.out
    if out is None:
        slug = "".join(ch if ch.isalnum() else "-" for ch in env.get("gpu", device)).strip("-").lower()
        out = HERE / "results" / f"cuda_{slug}_{_dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
