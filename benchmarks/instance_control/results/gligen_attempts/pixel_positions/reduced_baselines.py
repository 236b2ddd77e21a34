"""reduced_baselines.json of this folder: no control and the committed plain GLIGEN on the reduced evaluation
of the curves (world.eval_layouts(2), seed 0, DDIM 20, guidance 3: what gligen_curve.py --per-level 2
--seeds 0 samples), in the same session as the runs.

    python benchmarks/instance_control/results/gligen_attempts/pixel_positions/reduced_baselines.py OUT.json"""
import json
import sys

import torch

from benchmarks.instance_control import evaluate, models, world

torch.set_num_threads(1)
C = "benchmarks/instance_control/checkpoints"
layouts = world.eval_layouts(2)
kw = dict(num_inference_steps=20, guidance_scale=3.0, height=models.RESOLUTION, width=models.RESOLUTION)
base = evaluate.base_pipeline(C)
out = {}
for name, sample in {"none": evaluate.load_pipelines(C, ("none",))["none"],
                     "gligen_committed_plain": evaluate.gligen_sampler(base, C, "gligen")}.items():
    res, _ = evaluate.score_method(sample, layouts, (0,), kw)
    out[name] = {m: round(v["mean"], 4) for m, v in res["average"].items()}
    print(name, out[name], flush=True)
with open(sys.argv[1], "w") as f:
    json.dump({"reduced_evaluation": "world.eval_layouts(2), seed 0, DDIM 20, guidance 3 (gligen_curve.py --per-level 2 "
               "--seeds 0)", "scores": out, "environment": evaluate.environment()}, f, indent=2)
