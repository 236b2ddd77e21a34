"""grid.png of this folder: one main-track layout per level, seed 0, the evaluation's sampling (DDIM 20,
guidance 3). Columns: the layout, no control, the committed plain GLIGEN, GLIGEN + pixel positions (paper
recipe, 400 steps), GLIGEN + pixel positions with the gates opened at init (1200 steps).

    python benchmarks/instance_control/results/gligen_attempts/pixel_positions/make_grid.py PAPER_RUN OPEN_RUN OUT.png

PAPER_RUN / OPEN_RUN: the train.py output folders of the two runs (attempts.json has their commands)."""
import sys

import torch

from benchmarks.instance_control import evaluate, models, world

torch.set_num_threads(1)
paper_run, open_run, out = sys.argv[1:4]
C = "benchmarks/instance_control/checkpoints"
layouts = world.eval_layouts(1)
kw = dict(num_inference_steps=20, guidance_scale=3.0, height=models.RESOLUTION, width=models.RESOLUTION)
base = evaluate.base_pipeline(C)
samplers = {"no control": evaluate.load_pipelines(C, ("none",))["none"],
            "GLIGEN\n(committed)": evaluate.gligen_sampler(base, C, "gligen"),
            "+ pixel pos.\n400 steps": evaluate.gligen_sampler(base, paper_run, "gligen"),
            "+ pixel pos.,\ngates open, 1200": evaluate.gligen_sampler(base, open_run, "gligen")}
kept = {}
for name, sample in samplers.items():
    _, kept[name] = evaluate.score_method(sample, layouts, (0,), kw, keep_images=1)
evaluate.save_grid(out, layouts, kept, list(samplers), 1)
