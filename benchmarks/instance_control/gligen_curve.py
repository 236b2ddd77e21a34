"""GLIGEN's held-out scores against training steps, on a reduced evaluation: where its plateau is.

    python -m benchmarks.instance_control.gligen_curve --ckpt RUN --out RUN/gligen_curve.json

Scores every GLIGEN weights folder of ``RUN`` (``gligen_step<N>/`` snapshots that ``train.py
--gligen-snapshots`` saves, and the final ``gligen/``, whose step count is in its ``train_log.json``) with the
sampling of ``evaluate.py`` on fewer layouts and seeds (default: 3 main-track layouts per level, seeds 0 and
1), so that a curve costs minutes. The committed curve is in ``results/gligen_curve.json``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import time

import torch

from . import evaluate, models, world


def weights_folders(ckpt: str) -> list[tuple[int, str]]:
    """(steps, folder name) of every GLIGEN weights folder of ``ckpt``, by steps."""
    found = []
    for path in glob.glob(os.path.join(ckpt, "gligen_step*", "gligen.safetensors")):
        name = os.path.basename(os.path.dirname(path))
        found.append((int(re.fullmatch(r"gligen_step(\d+)", name).group(1)), name))
    log = os.path.join(ckpt, "gligen", "train_log.json")
    if os.path.isfile(log):
        with open(log) as f:
            found.append((json.load(f)["steps"], "gligen"))
    if not found:
        raise FileNotFoundError(f"no GLIGEN weights in {ckpt} (gligen/ with train_log.json, or gligen_step<N>/)")
    return sorted(found)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a train.py output folder with GLIGEN weights")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--per-level", type=int, default=3)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    layouts = world.eval_layouts(args.per_level)
    base = evaluate.base_pipeline(args.ckpt)
    kw = dict(num_inference_steps=20, guidance_scale=3.0, height=models.RESOLUTION, width=models.RESOLUTION)
    points = []
    for steps, folder in weights_folders(args.ckpt):
        t0 = time.time()
        res, _ = evaluate.score_method(evaluate.gligen_sampler(base, args.ckpt, folder), layouts, seeds, kw)
        avg = {m: round(v["mean"], 4) for m, v in res["average"].items()}
        points.append({"steps": steps, "folder": folder, **avg,
                       "spread": {m: round(v["std"], 4) for m, v in res["average"].items()}})
        print(f"{folder} ({steps} steps): " + ", ".join(f"{m} {v:.3f}" for m, v in avg.items())
              + f" ({time.time() - t0:.0f}s)", flush=True)
    record = {"per_level": args.per_level, "levels": list(world.LEVELS), "seeds": list(seeds), "points": points,
              "environment": evaluate.environment()}
    evaluate.write_json(args.out, record)
    return record


if __name__ == "__main__":
    main()
