"""Sample the held-out layouts with every method and score them: the toy instance-control comparison.

    python -m benchmarks.instance_control.evaluate --ckpt benchmarks/instance_control/checkpoints \\
        --out benchmarks/instance_control/results

Every method uses the same DDIM sampler, steps, guidance scale, image size and initial noise (one generator per
(seed, layout)). Methods (:data:`METHODS`; each reads its checkpoint from ``--ckpt``):

``none``           ``StableDiffusionPipeline`` of the base model, global caption only;
``regional``       the same pipeline with regional cross-attention (``regional.py``; training-free);
``gligen_plain``   GLIGEN as the paper trains it (base UNet frozen), at ROICtrl's budget (``gligen_plain/``), through
                   diffusers' ``StableDiffusionGLIGENPipeline`` with the instance captions as ``gligen_phrases`` and
                   the boxes as ``gligen_boxes`` (grounding on every step: beta = 1);
``gligen``         the GLIGEN that works on this toy (``gligen/``): GLIGEN + pixel positions, trained with a box-mask
                   curriculum then without it (toy deviations, docs/gligen_toy.md), sampled the same way;
``roictrl``        ``ROICtrlPipeline.from_pipe(base pipeline, adapter)`` with ``instances=`` (the product's path);
``roictrl_<name>`` the ROICtrl ablation ``name`` of ``ablations.py`` (``ablations/<name>/``), the same way.

Tracks: ``main`` (``world.eval_layouts``, L2-L6) and ``overlap`` (``world.overlap_layouts``: one pair of boxes
with IoU 0.2-0.5, half of them with similar captions; L2-L4), every method on both, reported separately.

Writes ``results.json`` (per track, level and averaged over levels: mean, std and each seed's value of ISR,
colour-and-box success, mIoU, colour accuracy and leakage; settings, machine and versions), ``table.md`` and
``grid.png`` (layout and every method for a few main-track layouts per level, boxes drawn).
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

from . import ablations, models, scorer, world

# method -> weights folder under --ckpt
GLIGEN_METHODS = {"gligen": "gligen", "gligen_plain": "gligen_plain", "gligen_4k": "gligen_4k"}
ABLATION_METHODS = {f"roictrl_{name}": name for name in ablations.ABLATIONS}
#: Methods left out of the default list when their folder is missing (make quality-train does not make them).
OPTIONAL_FOLDERS = {"gligen_4k": "gligen_4k", **{m: os.path.join("ablations", a) for m, a in ABLATION_METHODS.items()}}
METHODS = ("none", "regional", *GLIGEN_METHODS, "roictrl", *ABLATION_METHODS)
METRICS = ("isr", "color_box", "miou", "color_acc", "leakage")
TRACKS = ("main", "overlap")
NAMES = {
    "none": "no control", "regional": "regional cross-attention (training-free)",
    "gligen_plain": "GLIGEN (diffusers; frozen base; paper's recipe), 1.2k steps",
    "gligen": "GLIGEN + pixel positions, box-mask curriculum (toy deviations; frozen base), 2.2k steps",
    "gligen_4k": "the same GLIGEN trained on to 4.2k steps (not at a plateau yet)",
    "roictrl": "ROICtrl (roi_ops adapter), 1.2k steps",
    **{m: f"ROICtrl {ablations.ABLATIONS[a]}" for m, a in ABLATION_METHODS.items()},
}


def _to_chw(images):
    return np.asarray(images, np.float32).transpose(0, 3, 1, 2)


def base_pipeline(ckpt: str):
    """The toy model's ``StableDiffusionPipeline`` with the DDIM sampler every method uses."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(os.path.join(ckpt, "model"), safety_checker=None)
    base.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    base.set_progress_bar_config(disable=True)
    return base


def gligen_sampler(base, ckpt: str, folder: str = "gligen"):
    """diffusers' ``StableDiffusionGLIGENPipeline`` on ``base``'s parts with the GLIGEN UNet of ``ckpt/folder``."""
    from diffusers import StableDiffusionGLIGENPipeline

    from .train import load_gligen_unet

    gligen = StableDiffusionGLIGENPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
        unet=load_gligen_unet(ckpt, base.unet, folder), scheduler=base.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    gligen.set_progress_bar_config(disable=True)
    return lambda layout, gens, **kw: _to_chw(gligen(
        layout.caption, gligen_phrases=[i.caption for i in layout.instances],
        gligen_boxes=[list(i.box) for i in layout.instances], gligen_scheduled_sampling_beta=1.0,
        num_images_per_prompt=len(gens), generator=gens, output_type="np", **kw).images)


def load_pipelines(ckpt: str, methods=METHODS):
    """{method: callable(layout, generators, **sampling) -> float [n, 3, R, R] in [0, 1]}."""
    from roi_ops.roictrl_adapter import ROICtrlAdapter
    from roi_ops.roictrl_adapter.pipeline import ROICtrlPipeline

    from .regional import regional_sampler

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods must be some of {METHODS}, got {unknown}")
    base = base_pipeline(ckpt)
    out = {}

    def roictrl_sampler(adapter):
        pipe = ROICtrlPipeline.from_pipe(base, adapter)
        return lambda layout, gens, **kw: _to_chw(pipe(
            layout.caption, instances=[layout.as_pipeline_instances()], num_images_per_prompt=len(gens),
            generator=gens, output_type="np", **kw).images)

    for method in methods:
        if method == "none":
            out[method] = lambda layout, gens, **kw: _to_chw(
                base(layout.caption, num_images_per_prompt=len(gens), generator=gens, output_type="np", **kw).images)
        elif method == "regional":
            out[method] = regional_sampler(base)
        elif method == "roictrl":
            out[method] = roictrl_sampler(ROICtrlAdapter.from_pretrained(os.path.join(ckpt, "roictrl"), unet=base.unet))
        elif method in ABLATION_METHODS:
            out[method] = roictrl_sampler(ablations.load(os.path.join(ckpt, "ablations", ABLATION_METHODS[method]),
                                                         base.unet))
        else:
            out[method] = gligen_sampler(base, ckpt, GLIGEN_METHODS[method])
    return out


def track_layouts(track: str, per_level: int, levels=None) -> dict[int, list]:
    """The held-out layouts of ``track`` (``main`` or ``overlap``), by level."""
    if track == "main":
        return world.eval_layouts(per_level, levels or world.LEVELS)
    if track == "overlap":
        return world.overlap_layouts(per_level, levels or world.OVERLAP_LEVELS)
    raise ValueError(f"track must be one of {TRACKS}, got {track!r}")


def generators(seeds, layout):
    return [torch.Generator().manual_seed(s * 1_000_003 + layout.seed) for s in seeds]


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def score_method(sample, layouts: dict, seeds, kw: dict, keep_images: int = 0):
    """One method on one track's ``layouts``: per level and averaged over levels (each level weighs the same,
    as MIG-Bench), mean, std and per-seed values of every metric; plus the first ``keep_images`` seed-0 images
    of each level."""
    per = {L: {s: [] for s in seeds} for L in layouts}  # instance scores per level and seed
    kept = {L: [] for L in layouts}
    for L, level_layouts in layouts.items():
        for i, layout in enumerate(level_layouts):
            images = sample(layout, generators(seeds, layout), **kw)
            for s, img in zip(seeds, images):
                per[L][s] += scorer.score_image(img, layout)
            if i < keep_images:
                kept[L].append(images[0])
    by_level = {}
    for L in layouts:
        summ = {s: scorer.summarize(per[L][s]) for s in seeds}
        by_level[f"L{L}"] = {m: _stats([summ[s][m] for s in seeds]) for m in METRICS}
    avg = {m: _stats([statistics.fmean(by_level[f"L{L}"][m]["per_seed"][j] for L in layouts)
                      for j in range(len(seeds))]) for m in METRICS}
    return {"levels": by_level, "average": avg}, kept


def evaluate(ckpt: str, settings: dict, methods=METHODS, log=print):
    """Scores of every method on every track of ``settings`` (per_level, overlap_per_level, levels, seeds, steps,
    guidance, tracks, keep_images). Returns (results {track: {method: ...}}, seed-0 images of the main track
    {method: {level: [...]}}, layouts {track: {level: [...]}})."""
    layouts = {t: track_layouts(t, settings["overlap_per_level" if t == "overlap" else "per_level"],
                                settings["overlap_levels" if t == "overlap" else "levels"]) for t in settings["tracks"]}
    pipes = load_pipelines(ckpt, methods)
    kw = dict(num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
              height=models.RESOLUTION, width=models.RESOLUTION)
    results, kept = {t: {} for t in settings["tracks"]}, {}
    for method in methods:
        for track in settings["tracks"]:
            t0 = time.time()
            res, images = score_method(pipes[method], layouts[track], settings["seeds"], kw,
                                       settings["keep_images"] if track == "main" else 0)
            res["seconds"] = round(time.time() - t0, 1)
            results[track][method] = res
            if track == "main":
                kept[method] = images
            avg = res["average"]
            log(f"{track} {method}: " + ", ".join(f"{m} {avg[m]['mean']:.3f}+-{avg[m]['std']:.3f}" for m in METRICS)
                + f" ({res['seconds']:.0f}s)")
    return results, kept, layouts


def _evaluate_method(job):
    """One method in a worker process (``--jobs``): the same call as in-process, one thread."""
    threads, args = job
    torch.set_num_threads(threads)
    return evaluate(*args)


def evaluate_parallel(ckpt, settings, methods, jobs):
    """:func:`evaluate` with one worker process per method (at most ``jobs`` at a time); same results."""
    if jobs <= 1:
        return evaluate(ckpt, settings, methods)
    import multiprocessing

    work = [(1, (ckpt, settings, (m,))) for m in methods]
    with multiprocessing.get_context("spawn").Pool(min(jobs, len(methods))) as pool:
        parts = pool.map(_evaluate_method, work)
    results, kept = {t: {} for t in settings["tracks"]}, {}
    for r, k, layouts in parts:
        for t in r:
            results[t].update(r[t])
        kept.update(k)
    return results, kept, layouts


def ground_truth_scores(layouts: dict) -> dict:
    """The scorer on the generator's own images of ``layouts`` ({level: [...]}): its ceiling on them."""
    out = {}
    for L, level_layouts in layouts.items():
        scores = [r for l in level_layouts for r in scorer.score_image(world.render(l, models.RESOLUTION), l)]
        out[f"L{L}"] = scorer.summarize(scores)
    out["average"] = {m: statistics.fmean(out[f"L{L}"][m] for L in layouts) for m in METRICS}
    return out


def save_grid(path: str, layouts, kept, methods, per_level_shown: int) -> None:
    """Rows: layouts (per_level_shown per level); columns: ground-truth layout, then each method (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patches

    short = {"none": "no control", "regional": "regional", "gligen": "GLIGEN\n(toy)", "gligen_plain": "GLIGEN\nplain",
             "gligen_4k": "GLIGEN\n4.2k",
             "roictrl": "ROICtrl",
             **{m: "ROICtrl\n" + m[len("roictrl_"):].replace("_", " ") for m in ABLATION_METHODS}}
    rows = [(L, i) for L in layouts for i in range(min(per_level_shown, len(layouts[L])))]
    cols = ["layout"] + list(methods)
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.3 * len(cols) + 1.0, 1.3 * len(rows) + 0.6), dpi=100,
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
                ax.set_title(short.get(col, col), fontsize=8)
            if c == 0:
                ax.set_ylabel(f"L{L} #{i}", fontsize=8)
    fig.suptitle("held-out layouts (dashed boxes, coloured as asked); seed 0", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


TITLES = (("isr", "ISR"), ("color_box", "colour-and-box"), ("miou", "mIoU"), ("color_acc", "colour acc."),
          ("leakage", "leakage"))


def summary_table(record: dict, track: str) -> str:
    """One row per method: every metric averaged over levels, mean +- std over seeds (docs/quality.md's table)."""
    part = record["tracks"][track]
    lines = ["| method | " + " | ".join(t for _, t in TITLES) + " |", "| --- |" + " ---: |" * len(TITLES)]
    gt = part["ground_truth"]["average"]
    lines.append("| ground-truth images (scorer ceiling) | " + " | ".join(f"{gt[m]:.3f}" for m, _ in TITLES) + " |")
    for method, res in part["methods"].items():
        avg = res["average"]
        lines.append(f"| {NAMES.get(method, method)} | "
                     + " | ".join(f"{avg[m]['mean']:.3f} +- {avg[m]['std']:.3f}" for m, _ in TITLES) + " |")
    return "\n".join(lines) + "\n"


def markdown_table(record: dict) -> str:
    """The results as Markdown: per track, a summary, then per metric and level, mean +- std over seeds."""
    lines = []
    n_seeds = len(record["settings"]["seeds"])
    for track in record["settings"]["tracks"]:
        part = record["tracks"][track]
        levels = [k for k in part["ground_truth"] if k != "average"]
        lines.append(f"### Track: {track} ({record['settings']['track_layouts'][track]})\n")
        lines.append(f"Averaged over levels (mean +- std over {n_seeds} seeds):\n")
        lines.append(summary_table(record, track))
        for metric, title in TITLES:
            lines.append(f"**{title}** ({track} track; mean +- std over {n_seeds} seeds)\n")
            lines.append("| method | " + " | ".join(levels) + " | average |")
            lines.append("| --- |" + " ---: |" * (len(levels) + 1))
            gt = part["ground_truth"]
            lines.append("| ground-truth images (scorer ceiling) | " + " | ".join(f"{gt[L][metric]:.3f}" for L in levels)
                         + f" | {gt['average'][metric]:.3f} |")
            for method, res in part["methods"].items():
                cells = [f"{res['levels'][L][metric]['mean']:.3f} +- {res['levels'][L][metric]['std']:.3f}"
                         for L in levels]
                avg = res["average"][metric]
                lines.append(f"| {NAMES.get(method, method)} | " + " | ".join(cells)
                             + f" | **{avg['mean']:.3f} +- {avg['std']:.3f}** |")
            lines.append("")
    return "\n".join(lines)


def merge_into(path: str, record: dict) -> dict:
    """``record``'s methods added to (or replacing those of) the results at ``path``, made with the same settings
    and tracks; each method keeps its own ``seconds`` and the merged record lists every run's environment."""
    with open(path) as f:
        old = json.load(f)
    same = ("per_level", "overlap_per_level", "levels", "overlap_levels", "seeds", "steps", "guidance", "tracks")
    diff = [k for k in same if json.loads(json.dumps(record["settings"][k])) != old["settings"][k]]
    if diff:
        raise ValueError(f"--merge needs the settings of {path}; these differ: {diff}")
    for track, part in record["tracks"].items():
        old["tracks"][track]["methods"].update(part["methods"])
    if "runs" not in old:  # the first merge: the original run becomes runs[0]
        old["runs"] = [{"environment": old.pop("environment"), "seconds": old.pop("seconds")}]
    runs = old.pop("runs")
    old["runs"] = runs + [{"environment": record["environment"], "seconds": record["seconds"],
                           "methods": list(next(iter(record["tracks"].values()))["methods"])}]
    return old


def write_json(path: str, record: dict) -> None:
    """Write a results record as indented JSON, creating its folder (the toy benchmark's scripts share this)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def environment() -> dict:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "load_average_1_5_15min": list(os.getloadavg())}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=os.path.join(os.path.dirname(__file__), "checkpoints"),
                   help="folder with model/, roictrl/, gligen*/, ablations/ (what train.py writes)")
    p.add_argument("--out", required=True, help="folder for results.json, table.md and grid.png")
    p.add_argument("--per-level", type=int, default=6, help="held-out layouts per level (main track)")
    p.add_argument("--overlap-per-level", type=int, default=4, help="layouts per level of the overlap track")
    p.add_argument("--levels", default=",".join(str(L) for L in world.LEVELS), help="main-track levels, e.g. 2,3")
    p.add_argument("--overlap-levels", default=",".join(str(L) for L in world.OVERLAP_LEVELS),
                   help="overlap-track levels")
    p.add_argument("--tracks", default=",".join(TRACKS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale")
    p.add_argument("--methods", default="", help="comma-separated (default: every method, leaving out the "
                   "ablations whose checkpoint folder is missing, as results.json's 'skipped' records)")
    p.add_argument("--grid-per-level", type=int, default=2, help="layouts per level in grid.png")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--jobs", type=int, default=1, help="worker processes, one method each (one thread each)")
    p.add_argument("--merge", action="store_true",
                   help="add these methods to the results.json already in --out (same settings; grid.png kept)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = tuple(m for m in args.methods.split(",") if m)
    skipped = []
    if not methods:  # the default: every method whose checkpoints exist (an ablation may not be trained yet)
        skipped = [m for m, f in OPTIONAL_FOLDERS.items() if not os.path.isdir(os.path.join(args.ckpt, f))]
        methods = tuple(m for m in METHODS if m not in skipped)
        for m in skipped:
            how = (f"train.py --stages roictrl --ablation {ABLATION_METHODS[m]}" if m in ABLATION_METHODS
                   else "make quality-gligen-4k")
            print(f"skipping {m}: no {os.path.join(args.ckpt, OPTIONAL_FOLDERS[m])} (train it with {how})")
    tracks = tuple(t for t in args.tracks.split(",") if t)
    bad = [m for m in methods if m not in METHODS] + [t for t in tracks if t not in TRACKS]
    if bad or not methods or not tracks:
        p.error(f"--methods takes some of {METHODS} and --tracks some of {TRACKS}, got {bad or 'none'}")
    settings = {"per_level": args.per_level, "overlap_per_level": args.overlap_per_level,
                "levels": tuple(int(L) for L in args.levels.split(",")),
                "overlap_levels": tuple(int(L) for L in args.overlap_levels.split(",")), "tracks": tracks,
                "seeds": tuple(int(s) for s in args.seeds.split(",")), "steps": args.steps,
                "guidance": args.guidance, "keep_images": args.grid_per_level}
    t0 = time.time()
    results, kept, layouts = evaluate_parallel(args.ckpt, settings, methods, args.jobs)
    lo, hi = world.OVERLAP_IOU
    record = {
        "settings": {**{k: v for k, v in settings.items() if k != "keep_images"}, "sampler": "DDIM",
                     "resolution": models.RESOLUTION, "checkpoints": os.path.relpath(args.ckpt),
                     "track_layouts": {
                         "main": f"world.eval_layouts: {args.per_level} per level, levels L2-L6 as asked",
                         "overlap": f"world.overlap_layouts: {args.overlap_per_level} per level, levels "
                                    f"L{args.overlap_levels.replace(',', ', L')}, one pair of boxes with IoU "
                                    f"{lo}-{hi}, half with similar captions"},
                     "spread": "std over seeds (population) of the level-averaged metric; per_seed lists each",
                     "success": f"right colour, right shape and box IoU >= {scorer.SUCCESS_IOU}",
                     "color_box": f"an object of the asked colour with box IoU >= {scorer.SUCCESS_IOU}"},
        "tracks": {t: {"ground_truth": ground_truth_scores(layouts[t]), "methods": results[t]} for t in tracks},
        "skipped": skipped,
        "environment": environment(),
        "seconds": round(time.time() - t0, 1),
    }
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        record = merge_into(os.path.join(args.out, "results.json"), record)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(markdown_table(record))
    if args.grid_per_level and "main" in tracks and not args.merge:
        save_grid(os.path.join(args.out, "grid.png"), layouts["main"], kept, methods, args.grid_per_level)
    print(f"wrote {args.out}/results.json ({time.time() - t0:.0f}s)")
    return record


if __name__ == "__main__":
    main()
