"""Sample the held-out layouts with every method and score them: ROICtrl vs GLIGEN vs no control.

    python -m benchmarks.instance_control.evaluate --ckpt benchmarks/instance_control/checkpoints \\
        --out benchmarks/instance_control/results

Every method uses the same DDIM sampler, steps, guidance scale, image size and initial noise (one generator per
(seed, layout)). Methods:

``none``     ``StableDiffusionPipeline`` of the base model, global caption only;
``gligen``   ``StableDiffusionGLIGENPipeline`` (diffusers) with the GLIGEN UNet, the instance captions as
             ``gligen_phrases`` and the boxes as ``gligen_boxes`` (grounding on every step: beta = 1);
``roictrl``  ``ROICtrlPipeline.from_pipe(base pipeline, adapter)`` with ``instances=`` (the product's path).

Writes ``results.json`` (per level L2-L6 and averaged over levels: mean, std and each seed's value of ISR,
mIoU, colour accuracy and leakage; settings, machine and versions) and ``grid.png`` (layout, no control,
GLIGEN, ROICtrl for a few layouts per level, boxes drawn).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch

from . import models, scorer, world

METHODS = ("none", "gligen", "roictrl")
METRICS = ("isr", "miou", "color_acc", "leakage")


def load_pipelines(ckpt: str, methods=METHODS):
    """{method: callable(layout, generators, **sampling) -> float [n, 3, R, R] in [0, 1]}."""
    from diffusers import DDIMScheduler, StableDiffusionGLIGENPipeline, StableDiffusionPipeline

    from roi_ops.roictrl_adapter import ROICtrlAdapter
    from roi_ops.roictrl_adapter.pipeline import ROICtrlPipeline

    from .train import load_gligen_unet

    base = StableDiffusionPipeline.from_pretrained(os.path.join(ckpt, "model"), safety_checker=None)
    base.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    base.set_progress_bar_config(disable=True)
    out = {}

    def to_chw(images):
        return np.asarray(images, np.float32).transpose(0, 3, 1, 2)

    if "none" in methods:
        out["none"] = lambda layout, gens, **kw: to_chw(
            base(layout.caption, num_images_per_prompt=len(gens), generator=gens, output_type="np", **kw).images)
    if "roictrl" in methods:
        adapter = ROICtrlAdapter.from_pretrained(os.path.join(ckpt, "roictrl"), unet=base.unet)
        pipe = ROICtrlPipeline.from_pipe(base, adapter)
        out["roictrl"] = lambda layout, gens, **kw: to_chw(pipe(
            layout.caption, instances=[layout.as_pipeline_instances()], num_images_per_prompt=len(gens),
            generator=gens, output_type="np", **kw).images)
    if "gligen" in methods:
        gligen = StableDiffusionGLIGENPipeline(
            vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
            unet=load_gligen_unet(ckpt, base.unet), scheduler=base.scheduler, safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )
        gligen.set_progress_bar_config(disable=True)
        out["gligen"] = lambda layout, gens, **kw: to_chw(gligen(
            layout.caption, gligen_phrases=[i.caption for i in layout.instances],
            gligen_boxes=[list(i.box) for i in layout.instances], gligen_scheduled_sampling_beta=1.0,
            num_images_per_prompt=len(gens), generator=gens, output_type="np", **kw).images)
    return out


def generators(seeds, layout):
    return [torch.Generator().manual_seed(s * 1_000_003 + layout.seed) for s in seeds]


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def evaluate(ckpt: str, per_level: int = 6, seeds=(0, 1, 2), steps: int = 20, guidance: float = 3.0,
             methods=METHODS, levels=world.LEVELS, keep_images: int = 0, log=print):
    """Scores of every method. Returns (results dict, images {method: {level: [n_keep][seed0 image]}})."""
    layouts = world.eval_layouts(per_level, levels)
    pipes = load_pipelines(ckpt, methods)
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=models.RESOLUTION, width=models.RESOLUTION)
    results, kept = {}, {}
    for method in methods:
        t0 = time.time()
        per = {L: {s: [] for s in seeds} for L in levels}  # instance scores per level and seed
        kept[method] = {}
        for L in levels:
            kept[method][L] = []
            for i, layout in enumerate(layouts[L]):
                images = pipes[method](layout, generators(seeds, layout), **kw)
                for s, img in zip(seeds, images):
                    per[L][s] += scorer.score_image(img, layout)
                if i < keep_images:
                    kept[method][L].append(images[0])
        by_level = {}
        for L in levels:
            summ = {s: scorer.summarize(per[L][s]) for s in seeds}
            by_level[f"L{L}"] = {m: _stats([summ[s][m] for s in seeds]) for m in METRICS}
        # Averaged over levels (each level weighs the same, as MIG-Bench), per seed; spread across seeds.
        avg = {m: _stats([statistics.fmean(by_level[f"L{L}"][m]["per_seed"][j] for L in levels)
                          for j in range(len(seeds))]) for m in METRICS}
        results[method] = {"levels": by_level, "average": avg, "seconds": round(time.time() - t0, 1)}
        log(f"{method}: " + ", ".join(f"{m} {avg[m]['mean']:.3f}+-{avg[m]['std']:.3f}" for m in METRICS)
            + f" ({time.time() - t0:.0f}s)")
    return results, kept, layouts


def _evaluate_method(job):
    """One method in a worker process (``--jobs``): the same call as in-process, one thread."""
    threads, args = job
    torch.set_num_threads(threads)
    return evaluate(*args)


def evaluate_parallel(ckpt, per_level, seeds, steps, guidance, methods, levels, keep_images, jobs):
    """:func:`evaluate` with one worker process per method (at most ``jobs`` at a time); same results."""
    if jobs <= 1:
        return evaluate(ckpt, per_level, seeds, steps, guidance, methods, levels, keep_images)
    import multiprocessing

    work = [(1, (ckpt, per_level, seeds, steps, guidance, (m,), levels, keep_images)) for m in methods]
    with multiprocessing.get_context("spawn").Pool(min(jobs, len(methods))) as pool:
        parts = pool.map(_evaluate_method, work)
    results, kept = {}, {}
    for r, k, layouts in parts:
        results.update(r)
        kept.update(k)
    return results, kept, layouts


def ground_truth_scores(per_level: int, levels=world.LEVELS) -> dict:
    """The scorer on the generator's own images of the held-out layouts (its ceiling)."""
    layouts = world.eval_layouts(per_level, levels)
    out = {}
    for L in levels:
        scores = [r for l in layouts[L] for r in scorer.score_image(world.render(l, models.RESOLUTION), l)]
        out[f"L{L}"] = scorer.summarize(scores)
    out["average"] = {m: statistics.fmean(out[f"L{L}"][m] for L in levels) for m in METRICS}
    return out


def save_grid(path: str, layouts, kept, methods, levels, per_level_shown: int, scale: int = 4) -> None:
    """Rows: layouts (per_level_shown per level); columns: ground-truth layout, then each method (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patches

    names = {"none": "no control", "gligen": "GLIGEN", "roictrl": "ROICtrl"}
    rows = [(L, i) for L in levels for i in range(per_level_shown)]
    cols = ["layout"] + list(methods)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.6 * len(cols) + 1.2, 1.6 * len(rows)), dpi=100,
                             squeeze=False)
    R = models.RESOLUTION
    for r, (L, i) in enumerate(rows):
        layout = layouts[L][i]
        for c, col in enumerate(cols):
            ax = axes[r][c]
            img = world.render(layout, R) if col == "layout" else kept[col][L][i]
            ax.imshow(np.clip(img.transpose(1, 2, 0), 0, 1), interpolation="nearest", extent=(0, R, R, 0))
            for inst in layout.instances:
                x1, y1, x2, y2 = (v * R for v in inst.box)
                ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=0.8,
                                               edgecolor=world.COLORS[inst.color], linestyle="--"))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(names.get(col, col), fontsize=9)
            if c == 0:
                ax.set_ylabel(f"L{L} #{i}", fontsize=8)
    fig.suptitle("held-out layouts (dashed boxes, coloured as asked); seed 0", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def markdown_table(record: dict) -> str:
    """The results as Markdown: per level and averaged, mean +- std over seeds (what docs/quality.md shows)."""
    names = {"none": "no control", "gligen": "GLIGEN (diffusers)", "roictrl": "ROICtrl (roi_ops adapter)"}
    levels = record["settings"]["levels"]
    lines = []
    for metric, title in (("isr", "ISR"), ("miou", "mIoU"), ("color_acc", "colour accuracy"), ("leakage", "leakage")):
        lines.append(f"**{title}** (mean +- std over {len(record['settings']['seeds'])} seeds)\n")
        lines.append("| method | " + " | ".join(levels) + " | average |")
        lines.append("| --- |" + " ---: |" * (len(levels) + 1))
        gt = record["ground_truth"]
        lines.append("| ground-truth images (scorer ceiling) | " + " | ".join(f"{gt[L][metric]:.3f}" for L in levels)
                     + f" | {gt['average'][metric]:.3f} |")
        for method, res in record["methods"].items():
            cells = [f"{res['levels'][L][metric]['mean']:.3f} +- {res['levels'][L][metric]['std']:.3f}" for L in levels]
            avg = res["average"][metric]
            lines.append(f"| {names.get(method, method)} | " + " | ".join(cells)
                         + f" | **{avg['mean']:.3f} +- {avg['std']:.3f}** |")
        lines.append("")
    return "\n".join(lines)


def environment() -> dict:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=os.path.join(os.path.dirname(__file__), "checkpoints"),
                   help="folder with model/, roictrl/, gligen/ (what train.py writes)")
    p.add_argument("--out", required=True, help="folder for results.json and grid.png")
    p.add_argument("--per-level", type=int, default=6, help="held-out layouts per level")
    p.add_argument("--levels", default=",".join(str(L) for L in world.LEVELS), help="instance counts, e.g. 2,3")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--grid-per-level", type=int, default=2, help="layouts per level in grid.png")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1, help="worker processes, one method each (one thread each)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    levels = tuple(int(L) for L in args.levels.split(","))
    methods = tuple(m for m in args.methods.split(",") if m)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"--methods takes some of {METHODS}, got {bad}")
    t0 = time.time()
    results, kept, layouts = evaluate_parallel(args.ckpt, args.per_level, seeds, args.steps, args.guidance, methods,
                                               levels, args.grid_per_level, args.jobs)
    record = {
        "settings": {"per_level": args.per_level, "levels": [f"L{L}" for L in levels], "seeds": list(seeds),
                     "sampler": "DDIM", "steps": args.steps, "guidance_scale": args.guidance,
                     "resolution": models.RESOLUTION, "checkpoints": os.path.relpath(args.ckpt),
                     "spread": "std over seeds (population) of the level-averaged metric; per_seed lists each",
                     "success": f"right colour, right shape and box IoU >= {scorer.SUCCESS_IOU}"},
        "ground_truth": ground_truth_scores(args.per_level, levels),
        "methods": results,
        "environment": environment(),
        "seconds": round(time.time() - t0, 1),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(markdown_table(record))
    if args.grid_per_level:
        save_grid(os.path.join(args.out, "grid.png"), layouts, kept, methods, levels, args.grid_per_level)
    print(f"wrote {args.out}/results.json ({time.time() - t0:.0f}s)")
    return record


if __name__ == "__main__":
    main()
