"""Benchmarks: roi_ops' native kernels vs the pure-PyTorch oracle and grid_sample baselines.

Two ways to run it:

    python benchmarks/bench_ops.py            # what `make bench` runs: writes
                                              # benchmarks/results/cpu_<date>.json (+ .png)
    python -m pytest benchmarks/bench_ops.py --benchmark-json=raw.json   # plain pytest-benchmark

Every (case, op, mode, implementation) is one pytest-benchmark test; nothing is
asserted about speed. The script entry point runs the same tests in-process,
then writes one JSON with the machine, versions, threads, environment, every
timing, the skipped combinations with their reason, and the speed-ups of the
native kernels over each baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:  # `baselines` sits beside this file
    sys.path.insert(0, str(HERE))

import roi_ops  # noqa: E402
from machine_load import cpu_busy_s  # noqa: E402
from roi_ops import reference  # noqa: E402

THREADS = int(os.environ.get("ROI_OPS_BENCH_THREADS", "2"))
torch.set_num_threads(THREADS)

# The shapes that matter for ROICtrl, plus a detection head. Box sizes are in
# input-image pixels; spatial_scale maps them onto the feature map.
CASES = {
    # Stable Diffusion 1.5 at 512 px, UNet level 1 (64x64 latent tokens, 320 channels).
    "sd15_512_l1": dict(input=(2, 320, 64, 64), num_boxes=50, box_px=(8.0, 48.0), image_px=(64, 64),
                        spatial_scale=1.0, grid=(25, 25), sampling_ratio=2, aligned=True,
                        ops=("roi_align", "roi_unpool")),
    # The same level at 1024 px: 4x the pixels, half the boxes, box sizes scaled with the image.
    "sd15_1024_l1": dict(input=(1, 320, 128, 128), num_boxes=25, box_px=(16.0, 96.0), image_px=(128, 128),
                         spatial_scale=1.0, grid=(25, 25), sampling_ratio=2, aligned=True,
                         ops=("roi_align", "roi_unpool")),
    # Two-stage detector box head: 800x800 images, stride-4 features, 512 proposals per batch.
    # ROI-Unpool is not run here: its output, Tensor[512, 256, 200, 200] float32, is 21 GB.
    "detection": dict(input=(2, 256, 200, 200), num_boxes=512, box_px=(16.0, 400.0), image_px=(800, 800),
                      spatial_scale=0.25, grid=(7, 7), sampling_ratio=2, aligned=True,
                      ops=("roi_align",)),
    # Mask head paste-back: one 28x28 mask per proposal onto the 200x200 stride-4 map.
    "detection_masks": dict(input=(2, 1, 200, 200), num_boxes=512, box_px=(16.0, 400.0), image_px=(800, 800),
                            spatial_scale=0.25, grid=(28, 28), sampling_ratio=2, aligned=True,
                            ops=("roi_unpool",)),
}
OPS = ("roi_align", "roi_unpool")
MODES = ("fwd", "fwd+bwd")
IMPLS = ("native", "reference", "grid_sample")

# Combinations left out on purpose, with the reason recorded in the results.
SKIPS = {
    ("detection", "roi_unpool"): "output Tensor[512, 256, 200, 200] float32 is 21 GB; not a real workload",
}
# A single call slower than this is not repeated: the combination is skipped with its time as the reason.
MAX_CALL_S = float(os.environ.get("ROI_OPS_BENCH_MAX_CALL_S", "8"))
# Rounds are chosen so each benchmark takes about this long (at least MIN_ROUNDS).
TARGET_S = float(os.environ.get("ROI_OPS_BENCH_TARGET_S", "2.5"))
MIN_ROUNDS, MAX_ROUNDS = 3, 50


def _baselines():
    import baselines  # helper module beside this file, imported lazily so a missing one only skips

    return baselines


def make_rois(case: dict, seed: int = 0) -> torch.Tensor:
    """Tensor[K, 5] of (batch_index, x1, y1, x2, y2): sides uniform in box_px, boxes inside the image."""
    gen = torch.Generator().manual_seed(seed)
    B = case["input"][0]
    K = case["num_boxes"]
    lo, hi = case["box_px"]
    img_h, img_w = case["image_px"]
    wh = lo + (hi - lo) * torch.rand(K, 2, generator=gen, dtype=torch.float64)
    room = torch.tensor([img_w, img_h], dtype=torch.float64) - wh
    xy1 = room * torch.rand(K, 2, generator=gen, dtype=torch.float64)
    batch = (torch.arange(K) % B).to(torch.float64).unsqueeze(1)
    return torch.cat([batch, xy1, xy1 + wh], dim=1).to(torch.float32)


@functools.lru_cache(maxsize=1)
def case_data(name: str):
    """Inputs of one case, cached (one case at a time: the tests are ordered by case)."""
    case = CASES[name]
    gen = torch.Generator().manual_seed(1)
    rois = make_rois(case)
    B, C, H, W = case["input"]
    PH, PW = case["grid"]
    features = torch.randn(B, C, H, W, generator=gen)
    grids = torch.randn(rois.shape[0], C, PH, PW, generator=gen)
    return features, rois, grids


def op_fn(impl: str, op: str, case: dict):
    """The function (input, rois) -> output for one implementation of one op."""
    grid, scale, aligned = case["grid"], case["spatial_scale"], case["aligned"]
    sr = case["sampling_ratio"]
    out_hw = case["input"][2:]
    if impl == "native":
        if op == "roi_align":
            return lambda x, r: roi_ops.roi_align(x, r, grid, scale, sr, aligned)
        return lambda x, r: roi_ops.roi_unpool(x, r, out_hw, scale, aligned)
    if impl == "reference":
        if op == "roi_align":
            return lambda x, r: reference.roi_align(x, r, grid, scale, sr, aligned)
        return lambda x, r: reference.roi_unpool(x, r, out_hw, scale, aligned)
    if impl == "grid_sample":
        bl = _baselines()
        if op == "roi_align":
            return lambda x, r: bl.grid_sample_roi_align(x, r, grid, scale, sr, aligned)
        return lambda x, r: bl.grid_sample_roi_unpool(x, r, out_hw, scale, aligned)
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _params():
    for name, case in CASES.items():
        for op in OPS:
            if op not in case["ops"] and (name, op) not in SKIPS:
                continue  # not a combination anyone asked for
            for mode in MODES:
                for impl in IMPLS:
                    marks = [pytest.mark.skip(reason=SKIPS[name, op])] if (name, op) in SKIPS else []
                    yield pytest.param(name, op, mode, impl, marks=marks, id=f"{name}-{op}-{mode}-{impl}")


@functools.lru_cache(maxsize=4)
def _native_output(name: str, op: str) -> torch.Tensor:
    case = CASES[name]
    features, rois, grids = case_data(name)
    x = features if op == "roi_align" else grids
    return op_fn("native", op, case)(x, rois)


@pytest.mark.parametrize("name,op,mode,impl", list(_params()))
def test_bench(benchmark, name, op, mode, impl):
    if impl == "native" and not roi_ops.native_available("cpu"):
        pytest.skip("roi_ops native CPU kernels not loaded (roi_ops.native_available('cpu') is False): "
                    f"{roi_ops.native_import_error()}")
    if impl == "grid_sample":
        try:
            _baselines()
        except ImportError as e:
            pytest.skip(f"benchmarks/baselines.py cannot be imported: {e}")
    case = CASES[name]
    features, rois, grids = case_data(name)
    x = features if op == "roi_align" else grids
    fn = op_fn(impl, op, case)

    extra = dict(case=name, op=op, mode=mode, impl=impl, threads=torch.get_num_threads(),
                 input=list(x.shape), rois=list(rois.shape))
    if mode == "fwd":
        def run():
            return fn(x, rois)
    else:
        xg = x.detach().clone().requires_grad_(True)
        with torch.no_grad():
            out_shape = fn(x, rois).shape
        grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(2))

        def run():
            return torch.autograd.grad(fn(xg, rois), xg, grad_out)[0]

    # The first call doubles as warm-up and as the too-slow check.
    t0 = time.perf_counter()
    result = run()
    first = time.perf_counter() - t0
    if first > MAX_CALL_S:
        pytest.skip(f"one call took {first:.1f} s > {MAX_CALL_S:g} s limit (ROI_OPS_BENCH_MAX_CALL_S)")
    if mode == "fwd" and roi_ops.native_available("cpu"):
        # Record that every implementation computes the same thing (not asserted: this is a benchmark).
        extra["max_abs_diff_vs_native"] = (result.double() - _native_output(name, op).double()).abs().max().item()
    extra["output"] = list(result.shape)
    del result

    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_S / max(first, 1e-6))))
    benchmark.group = f"{name} {op} {mode}"
    benchmark.extra_info.update(extra)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=0)


# --------------------------------------------------------------------------------------------------
# Environment record and the script entry point


def _git(*args: str) -> str | None:
    try:
        # --no-optional-locks: read-only, never refreshes the index.
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=REPO, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _cpu_model() -> str:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _sources_digest() -> str | None:
    """sha256 over csrc/ (paths and contents): names the kernels measured even when uncommitted."""
    import hashlib

    files = sorted(p for p in (REPO / "csrc").rglob("*") if p.is_file() and p.suffix in (".cpp", ".h", ".cu", ".cuh"))
    if not files:
        return None
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def environment_info() -> dict:
    """Machine, versions, threads and environment, as recorded with every result."""
    import numpy
    import pytest_benchmark

    mem = None
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem = round(int(line.split()[1]) / 2**20, 1)
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "machine": {
            "cpu_model": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "mem_total_gib": mem,
            "platform": platform.platform(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": numpy.__version__,
            "pytest_benchmark": pytest_benchmark.__version__,
            "roi_ops": getattr(roi_ops, "__version__", None),
            "roi_ops_git_sha": _git("rev-parse", "HEAD"),
            "roi_ops_git_dirty": None if status is None else bool(status),
            "csrc_sha256_16": _sources_digest(),
            "extension": getattr(getattr(roi_ops, "_ops", None), "_C", None) and roi_ops._ops._C.__file__,
        },
        "threads": torch.get_num_threads(),
        "native_available_cpu": roi_ops.native_available("cpu"),
        "env": {
            # Read once by c10's CPU allocator: 1 makes large allocations use transparent huge pages.
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
            "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            # Other processes compete for the cores: a load well above 0 before the run taints it.
            "loadavg_1_5_15min": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "parallel_backend": next((ln.split(":", 1)[1].strip() for ln in torch.__config__.parallel_info()
                                      .splitlines() if ln.startswith("ATen parallel backend")), None),
        },
    }


class _Collector:
    """pytest plugin: remembers every skip and its reason."""

    def __init__(self):
        self.skipped = []
        self.failed = []

    def pytest_runtest_logreport(self, report):
        if report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.skipped.append({"test": report.nodeid.split("::")[-1], "reason": reason.removeprefix("Skipped: ")})
        elif report.failed:
            self.failed.append({"test": report.nodeid.split("::")[-1], "when": report.when,
                                "error": str(report.longrepr)[-2000:]})


def _split_id(test: str) -> dict:
    # test_bench[<case>-<op>-<mode>-<impl>]
    inner = test[test.index("[") + 1:-1]
    name, op, rest = inner.split("-", 2)
    mode, impl = rest.rsplit("-", 1)
    return dict(case=name, op=op, mode=mode, impl=impl)


def summarise(raw: dict, collector: _Collector, env: dict, args_used: dict) -> dict:
    results = []
    for b in raw.get("benchmarks", []):
        s, e = b["stats"], b["extra_info"]
        row = {k: e[k] for k in ("case", "op", "mode", "impl")}
        row.update(median_ms=s["median"] * 1e3, min_ms=s["min"] * 1e3, mean_ms=s["mean"] * 1e3,
                   stddev_ms=s["stddev"] * 1e3, rounds=s["rounds"], input=e["input"], output=e["output"])
        if "max_abs_diff_vs_native" in e:
            row["max_abs_diff_vs_native"] = e["max_abs_diff_vs_native"]
        results.append(row)

    by_key = {(r["case"], r["op"], r["mode"], r["impl"]): r for r in results}
    speedups = []
    for (name, op, mode, impl), r in by_key.items():
        if impl != "native":
            continue
        for base in ("grid_sample", "reference"):
            b = by_key.get((name, op, mode, base))
            if b is not None:
                speedups.append(dict(case=name, op=op, mode=mode, vs=base,
                                     speedup=b["median_ms"] / r["median_ms"],
                                     native_median_ms=r["median_ms"], baseline_median_ms=b["median_ms"]))

    # The "done when": 512 px level 1, forward+backward, against grid_sample.
    acceptance = []
    for op, need in (("roi_align", 6.0), ("roi_unpool", 3.0)):
        s = next((x for x in speedups if (x["case"], x["op"], x["mode"], x["vs"]) ==
                  ("sd15_512_l1", op, "fwd+bwd", "grid_sample")), None)
        acceptance.append(dict(criterion=f"{op} fwd+bwd on sd15_512_l1 at least {need:g}x faster than grid_sample",
                               required=need, measured=None if s is None else s["speedup"],
                               passed=None if s is None else s["speedup"] >= need))

    skipped = []
    for s in collector.skipped:
        d = _split_id(s["test"])
        d["reason"] = s["reason"]
        skipped.append(d)
    cases = {n: {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.items()} for n, c in CASES.items()}
    for n, c in cases.items():
        c["dtype"] = "float32"
        c["box_units"] = "input-image pixels, multiplied by spatial_scale onto the feature map"
    return {
        "schema": "roi_ops-bench/1",
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **env,
        "settings": args_used,
        "timer": "time.perf_counter via pytest-benchmark pedantic, 1 iteration per round, after one warm-up call",
        "cases": cases,
        "results": results,
        "speedups": speedups,
        "acceptance": acceptance,
        "skipped": skipped,
        "failed": collector.failed,
        "total_wall_s": raw.get("_wall_s"),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark roi_ops on CPU and write a results JSON.")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results",
                        help="where cpu_<date>.json (and .png) go (default: benchmarks/results)")
    parser.add_argument("--name", default=None, help="file stem (default: cpu_<YYYY-MM-DD>)")
    parser.add_argument("-k", dest="select", default=None, help="pytest -k expression to run a subset")
    parser.add_argument("--target-s", type=float, default=TARGET_S,
                        help=f"seconds per benchmark, which sets the rounds (default {TARGET_S:g})")
    parser.add_argument("--max-call-s", type=float, default=MAX_CALL_S,
                        help=f"skip a combination whose single call takes longer (default {MAX_CALL_S:g})")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    args = parser.parse_args(argv)
    if args.target_s <= 0 or args.max_call_s <= 0:
        parser.error(f"--target-s and --max-call-s must be positive, got {args.target_s} and {args.max_call_s}")

    # The test module reads these at import; pytest imports this file afresh as a test module.
    os.environ["ROI_OPS_BENCH_TARGET_S"] = str(args.target_s)
    os.environ["ROI_OPS_BENCH_MAX_CALL_S"] = str(args.max_call_s)
    os.environ["ROI_OPS_BENCH_THREADS"] = str(THREADS)

    stem = args.name or f"cpu_{_dt.date.today().isoformat()}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    raw_path = args.out_dir / f".{stem}.raw.json"
    collector = _Collector()
    pytest_args = [str(Path(__file__).resolve()), "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                   "--benchmark-json", str(raw_path), "--benchmark-sort=name", "--benchmark-columns=median,min,rounds"]
    if args.select:
        pytest_args += ["-k", args.select]
    load_before = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    cpu0 = cpu_busy_s()
    t0 = time.perf_counter()
    code = pytest.main(pytest_args, plugins=[collector])
    wall = time.perf_counter() - t0
    cpu1 = cpu_busy_s()
    if code not in (0, 5) or not raw_path.exists():
        print(f"pytest exited with code {code}; no results written", file=sys.stderr)
        return int(code) or 1
    raw = json.loads(raw_path.read_text())
    raw_path.unlink()
    raw["_wall_s"] = round(wall, 1)
    settings = dict(target_s=args.target_s, max_call_s=args.max_call_s, select=args.select)
    env = environment_info()
    env["env"]["loadavg_before_run"] = load_before
    env["env"]["loadavg_after_run"] = env["env"].pop("loadavg_1_5_15min")
    if cpu0 is not None and cpu1 is not None:
        # CPU time other processes took while we ran: the honest measure of how clean the run was.
        others = max((cpu1[0] - cpu0[0]) - (cpu1[1] - cpu0[1]), 0.0)
        env["env"]["other_processes_cpu_s"] = round(others, 1)
        env["env"]["other_processes_share_of_machine"] = round(others / (wall * (os.cpu_count() or 1)), 3)
    summary = summarise(raw, collector, env, settings)
    out = args.out_dir / f"{stem}.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"\nwrote {out}")
    share = summary["env"].get("other_processes_share_of_machine")
    if share is not None and share > 0.05:
        print(f"  warning: other processes used {share:.0%} of the machine during the run; "
              "the timings are not clean")
    for s in summary["speedups"]:
        print(f"  {s['case']:16s} {s['op']:10s} {s['mode']:8s} native {s['native_median_ms']:9.2f} ms  "
              f"{s['speedup']:7.1f}x vs {s['vs']}")
    for a in summary["acceptance"]:
        m = "n/a" if a["measured"] is None else f"{a['measured']:.1f}x"
        print(f"  [{'PASS' if a['passed'] else 'FAIL' if a['passed'] is False else '----'}] {a['criterion']}: {m}")
    if not args.no_plot:
        try:
            from plot_results import plot
        except ImportError as e:  # matplotlib missing: the JSON is the result, the plot is a convenience
            print(f"no plot: {e}", file=sys.stderr)
        else:
            print(f"wrote {plot(out)}")
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
