"""Where the time goes: the native ops on the 512 px level-1 shape, split into parts.

    python benchmarks/breakdown.py                      # runs itself twice: THP_MEM_ALLOC_ENABLE unset and =1
    python benchmarks/breakdown.py --json out.json

Measures, with 2 threads, median of --repeats calls:
- each op's forward and its backward kernel alone (the private backward op);
- what writing a tensor of the output's size costs with no computation at all:
  into fresh memory (an allocation the kernel's first writes must fault in page
  by page) and into memory already touched (pure write bandwidth).
THP_MEM_ALLOC_ENABLE is read once by c10's CPU allocator, so the THP variant
runs in a child process. Numbers back docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_ops import CASES, case_data, environment_info  # noqa: E402

import roi_ops  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def measure(case_name: str, repeats: int) -> dict:
    case = CASES[case_name]
    features, rois, grids = case_data(case_name)
    B, C, H, W = case["input"]
    PH, PW = case["grid"]
    K = rois.shape[0]
    s, sr, al = case["spatial_scale"], case["sampling_ratio"], case["aligned"]
    ops = torch.ops.roi_ops
    gen = torch.Generator().manual_seed(3)
    g_align = torch.randn(K, C, PH, PW, generator=gen)
    g_unpool = torch.randn(K, C, H, W, generator=gen)
    out_bytes = K * C * H * W * 4

    touched = torch.empty(K, C, H, W)
    touched.zero_()
    r = {
        "roi_align forward": median_ms(lambda: roi_ops.roi_align(features, rois, (PH, PW), s, sr, al), repeats),
        "roi_align backward kernel": median_ms(
            lambda: ops._roi_align_backward(g_align, rois, s, PH, PW, B, C, H, W, sr, al), repeats),
        "roi_unpool forward": median_ms(lambda: roi_ops.roi_unpool(grids, rois, (H, W), s, al), repeats),
        "roi_unpool backward kernel": median_ms(
            lambda: ops._roi_unpool_backward(g_unpool, rois, s, PH, PW, al), repeats),
        "write output size, fresh memory (torch.empty + zero_)": median_ms(
            lambda: torch.empty(K, C, H, W).zero_(), repeats),
        "write output size, touched memory (zero_)": median_ms(lambda: touched.zero_(), repeats),
        "read output size (sum)": median_ms(lambda: g_unpool.sum(), repeats),
    }
    return {"case": case_name, "output_MB": out_bytes / 1e6, "median_ms": r,
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", default="sd15_512_l1", choices=[n for n, c in CASES.items()
                                                             if "roi_unpool" in c["ops"] and "roi_align" in c["ops"]])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not roi_ops.native_available("cpu"):
        sys.exit(f"the native CPU kernels are not loaded: {roi_ops.native_import_error()}")
    torch.set_num_threads(2)
    if args.child:
        print(json.dumps(measure(args.case, args.repeats)))
        return 0

    import resource

    def cpu_now():
        ticks = [int(f) for f in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), kids.ru_utime + kids.ru_stime

    runs = []
    c0, t0 = cpu_now(), time.perf_counter()
    for thp in (None, "1"):
        env = dict(os.environ)
        env.pop("THP_MEM_ALLOC_ENABLE", None)
        if thp is not None:
            env["THP_MEM_ALLOC_ENABLE"] = thp
        out = subprocess.run([sys.executable, __file__, "--child", "--case", args.case,
                              "--repeats", str(args.repeats)], env=env, capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    c1, wall = cpu_now(), time.perf_counter() - t0
    # CPU time other processes took meanwhile (all busy time less our children's): how clean the run was.
    share = max((c1[0] - c0[0]) - (c1[1] - c0[1]), 0.0) / (wall * (os.cpu_count() or 1))
    names = list(runs[0]["median_ms"])
    width = max(map(len, names))
    print(f"{args.case}: {CASES[args.case]['input']}, {CASES[args.case]['num_boxes']} boxes, grid "
          f"{CASES[args.case]['grid']}, unpool output {runs[0]['output_MB']:.0f} MB; 2 threads; median ms")
    print(f"{'':{width}s}  {'THP off':>9s}  {'THP=1':>9s}")
    for n in names:
        print(f"{n:{width}s}  {runs[0]['median_ms'][n]:9.2f}  {runs[1]['median_ms'][n]:9.2f}")
    print(f"other processes took {share:.0%} of the machine meanwhile"
          + ("; the timings are not clean" if share > 0.05 else ""))
    if args.json:
        info = environment_info()
        info["env"].pop("THP_MEM_ALLOC_ENABLE")
        info["env"].pop("loadavg_1_5_15min")
        info["env"]["other_processes_share_of_machine"] = round(share, 3)
        args.json.write_text(json.dumps({**info, "breakdown": runs}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
