"""ROI-Unpool forward + ``.sum().backward()`` against the ``grid_sample`` baseline (issue 19, item 4).

    python benchmarks/bench_unpool_sum.py            # sd15_512_l1, 7 interleaved rounds:
                                                     #   benchmarks/results/unpool_sum_cpu.json

``out.sum().backward()`` hands the backward an *expanded* gradient (one scalar, stride 0 in every dimension).
ROI-Unpool's backward reads any gradient through its strides, so this one is read in place instead of being
materialised as a dense ``[K, C, H, W]`` tensor (262 MB on this case) first. Timed per round, interleaved: roi_ops
with ``.sum().backward()``, roi_ops with a dense random gradient (``out.backward(g)``), and ``baselines.py``'s
``grid_sample`` ROI-Unpool with ``.sum().backward()``. Medians, every call, the per-round speed-ups and the load of
other processes go to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from baselines import grid_sample_roi_unpool  # noqa: E402
from bench_ops import CASES, case_data  # noqa: E402
from bench_step import LoadMeter, environment  # noqa: E402

import roi_ops  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", default="sd15_512_l1")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("ROI_OPS_BENCH_THREADS", "1")))
    ap.add_argument("--json", default=str(HERE / "results" / "unpool_sum_cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = CASES[args.case]
    _, rois, grids = case_data(args.case)
    out_hw, scale, aligned = case["input"][2:], case["spatial_scale"], case["aligned"]
    dense = torch.randn(rois.shape[0], grids.shape[1], *out_hw, generator=torch.Generator().manual_seed(4))

    def native_sum():
        x = grids.clone().requires_grad_()
        roi_ops.roi_unpool(x, rois, out_hw, scale, aligned).sum().backward()

    def native_dense():
        x = grids.clone().requires_grad_()
        roi_ops.roi_unpool(x, rois, out_hw, scale, aligned).backward(dense)

    def grid_sample_sum():
        x = grids.clone().requires_grad_()
        grid_sample_roi_unpool(x, rois, out_hw, scale, aligned).sum().backward()

    fns = {"roi_ops_sum": native_sum, "roi_ops_dense_grad": native_dense, "grid_sample_sum": grid_sample_sum}
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    doc = {"benchmark": "roi_unpool forward + .sum().backward() vs grid_sample (issue 19)", **environment(),
           "case": args.case, "shape": {k: case[k] for k in ("input", "num_boxes", "grid")}}
    meter = LoadMeter()
    for r in range(args.rounds):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for name in order:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{k} {1e3 * v[-1]:.0f} ms" for k, v in times.items()), flush=True)
    doc["other_processes_share_of_machine"] = meter.share()
    doc["ms"] = {k: {"median": round(1e3 * statistics.median(v), 2), "all": [round(1e3 * x, 2) for x in v]}
                 for k, v in times.items()}
    per_round = [g / n for g, n in zip(times["grid_sample_sum"], times["roi_ops_sum"])]
    doc["speedup_vs_grid_sample"] = {"median_of_rounds": round(statistics.median(per_round), 3),
                                     "min": round(min(per_round), 3), "max": round(max(per_round), 3),
                                     "every_round_at_least_3x": min(per_round) >= 3.0}
    doc["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["speedup_vs_grid_sample"]), f"wrote {args.json}")


if __name__ == "__main__":
    main()
