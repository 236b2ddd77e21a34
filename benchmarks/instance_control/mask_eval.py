"""Mask-shaped instances on the toy benchmark: the same held-out layouts with boxes only and with masks.

    python -m benchmarks.instance_control.mask_eval --ckpt benchmarks/instance_control/checkpoints \\
        --out /tmp/mask_eval.json [--figure docs/img/mask_instances.png]

Layouts: ``world.sample_layout`` at seeds no training run uses (``MASK_EVAL_SEED_BASE``), 2-4 objects; every
object is given a target form: a disc (caption word "circle"), a triangle ("triangle") or an L in one of four
orientations (``--l-word``, default "square", or ``any``: a random shape word per L; the vocabulary has no
word for it, so only the mask tells the shape). Each layout is generated twice through
``ROICtrlPipeline.from_pipe(base, adapter)`` with the same seeds: ``instances=[{"box", "caption"}]`` (boxes only)
and ``[{"box", "caption", "mask": HxW bool numpy array}]``.

Per instance, the asked colour's component is picked as ``scorer.score_instance`` picks it (largest box IoU,
else nearest centre); reported, boxes only vs masks:

- ``pixel_iou``: IoU between that component and the target mask (0 when the colour is missing);
- ``box_success``: colour-and-box instance success (the component's box IoU with the instance box >= 0.5);
- ``shape_acc``: for discs and triangles, the component read as the asked shape (``scorer.classify_shape``).

Writes JSON (settings, per-form and overall means, machine, versions, threads, load) and, with ``--figure``, a
demo figure: a few layouts, target masks, boxes only, masks.
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

from . import evaluate, models, scorer, world

MASK_EVAL_SEED_BASE = 30_000_000  # far from training (0..) and from evaluate.py's EVAL_SEED_BASE layouts
FORMS = ("circle", "triangle", "L")


def mask_layouts(n: int, seed_base: int = MASK_EVAL_SEED_BASE, l_word: str = "square"):
    """``n`` layouts of 2-4 objects, each with a target form (disc, triangle, L): a list of
    ``(layout, forms)`` where ``layout``'s instances carry the caption word and ``form`` the drawn form."""
    out = []
    for i in range(n):
        base = world.sample_layout(seed_base + i, 2 + i % 3)
        rng = np.random.default_rng([seed_base, i, 7])
        insts = []
        for inst in base.instances:
            form = FORMS[int(rng.integers(len(FORMS)))]
            if form == "L":
                orientation = int(rng.integers(4))
                word = world.SHAPES[int(rng.integers(len(world.SHAPES)))] if l_word == "any" else l_word
                insts.append(world.Instance(inst.box, inst.color, word, f"L{orientation}"))
            else:
                insts.append(world.Instance(inst.box, inst.color, form, None))
        out.append(world.Layout(tuple(insts), base.seed))
    return out


def load_pipeline(ckpt: str):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from roi_ops.roictrl_adapter import ROICtrlAdapter
    from roi_ops.roictrl_adapter.pipeline import ROICtrlPipeline

    base = StableDiffusionPipeline.from_pretrained(os.path.join(ckpt, "model"), safety_checker=None)
    base.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    base.set_progress_bar_config(disable=True)
    adapter = ROICtrlAdapter.from_pretrained(os.path.join(ckpt, "roictrl"), unet=base.unet)
    return ROICtrlPipeline.from_pipe(base, adapter)


def instances_of(layout: world.Layout, with_masks: bool, resolution: int = models.RESOLUTION) -> list[dict]:
    out = []
    for inst in layout.instances:
        item = {"box": list(inst.box), "caption": inst.caption}
        if with_masks:
            item["mask"] = inst.mask(resolution)  # HxW bool numpy array
        out.append(item)
    return out


def score(image: np.ndarray, layout: world.Layout, resolution: int = models.RESOLUTION) -> list[dict]:
    """Per instance: pixel IoU with its mask, colour-and-box success, shape read (discs and triangles)."""
    labels = scorer.segment(image)
    H, W = labels.shape
    min_px = max(1, int(round(scorer.MIN_PIXELS_FRACTION * H * W)))
    out = []
    for inst in layout.instances:
        target = inst.mask(resolution)
        comps = [m for m in scorer.components(labels == scorer._NAMES.index(inst.color)) if m.sum() >= min_px]
        row = {"form": "L" if (inst.form or "").startswith("L") else inst.shape, "pixel_iou": 0.0,
               "box_success": False, "shape_ok": None}
        if comps:
            ious = [world.box_iou(scorer._bbox(m), inst.box) for m in comps]
            if max(ious) > 0:
                best = int(np.argmax(ious))
            else:
                cx, cy = (inst.box[0] + inst.box[2]) / 2, (inst.box[1] + inst.box[3]) / 2
                d = [((b[0] + b[2]) / 2 - cx) ** 2 + ((b[1] + b[3]) / 2 - cy) ** 2 for b in map(scorer._bbox, comps)]
                best = int(np.argmin(d))
            comp = comps[best]
            row["pixel_iou"] = float((comp & target).sum() / (comp | target).sum())
            row["box_success"] = bool(ious[best] >= scorer.SUCCESS_IOU)
            if row["form"] in ("circle", "triangle"):
                row["shape_ok"] = scorer.classify_shape(comp) == inst.shape
        elif row["form"] in ("circle", "triangle"):
            row["shape_ok"] = False
        out.append(row)
    return out


def summarize(rows: list[dict]) -> dict:
    shape = [r["shape_ok"] for r in rows if r["shape_ok"] is not None]
    return {
        "pixel_iou": statistics.fmean(r["pixel_iou"] for r in rows),
        "box_success": statistics.fmean(r["box_success"] for r in rows),
        "shape_acc": statistics.fmean(shape) if shape else float("nan"),
        "n": len(rows),
    }


def run(ckpt: str, n_layouts: int = 40, seeds=(0,), steps: int = 20, guidance: float = 3.0,
        l_word: str = "square", seed_base: int = MASK_EVAL_SEED_BASE, keep: int = 0, log=print):
    pipe = load_pipeline(ckpt)
    layouts = mask_layouts(n_layouts, seed_base, l_word)
    R = models.RESOLUTION
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=R, width=R, output_type="np")
    rows = {"boxes": [], "masks": []}
    kept = []
    t0 = time.time()
    for i, layout in enumerate(layouts):
        pair = {}
        for mode in ("boxes", "masks"):
            gens = [torch.Generator().manual_seed(s * 1_000_003 + layout.seed) for s in seeds]
            images = pipe(layout.caption, instances=[instances_of(layout, mode == "masks")],
                          num_images_per_prompt=len(gens), generator=gens, **kw).images
            images = np.asarray(images, np.float32).transpose(0, 3, 1, 2)
            for img in images:
                rows[mode] += score(img, layout)
            pair[mode] = images[0]
        if i < keep:
            kept.append((layout, pair))
    result = {}
    for mode in rows:
        per_form = {f: summarize([r for r in rows[mode] if r["form"] == f]) for f in ("circle", "triangle", "L")}
        result[mode] = {"all": summarize(rows[mode]), "per_form": per_form}
        log(f"{mode}: " + ", ".join(f"{k} {v:.3f}" for k, v in result[mode]["all"].items() if k != "n")
            + f" (n={result[mode]['all']['n']}); pixel IoU per form "
            + ", ".join(f"{f} {per_form[f]['pixel_iou']:.3f}" for f in per_form))
    result["seconds"] = round(time.time() - t0, 1)
    return result, kept


def figure(kept, path: str, scale: int = 4) -> None:
    """Rows: target masks (each object's colour), boxes only, masks; one column block per layout, boxes drawn."""
    from PIL import Image, ImageDraw, ImageFont

    R = models.RESOLUTION
    tiles = []
    for layout, pair in kept:
        target = world.render(layout, R)  # the layout drawn with its target forms
        col = [target, pair["boxes"], pair["masks"]]
        ims = []
        for arr in col:
            im = Image.fromarray((np.clip(arr.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)).resize(
                (R * scale, R * scale), Image.NEAREST)
            d = ImageDraw.Draw(im)
            for inst in layout.instances:
                x1, y1, x2, y2 = (v * R * scale for v in inst.box)
                d.rectangle([x1, y1, x2 - 1, y2 - 1], outline=(255, 255, 255))
            ims.append(im)
        tiles.append(ims)
    pad, label_w = 4, 84
    font = ImageFont.load_default(size=14)  # the default size 10 runs "boxes only" together
    W = label_w + len(tiles) * (R * scale + pad)
    Hh = 3 * (R * scale + pad) + pad
    canvas = Image.new("RGB", (W, Hh), (255, 255, 255))
    d = ImageDraw.Draw(canvas)
    for r, name in enumerate(("target", "boxes only", "with masks")):
        d.text((4, pad + r * (R * scale + pad) + R * scale // 2 - 7), name, fill=(0, 0, 0), font=font)
    for c, ims in enumerate(tiles):
        for r, im in enumerate(ims):
            canvas.paste(im, (label_w + c * (R * scale + pad), pad + r * (R * scale + pad)))
    canvas.save(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=os.path.join(os.path.dirname(__file__), "checkpoints"))
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--layouts", type=int, default=40)
    p.add_argument("--seeds", default="0", help="comma-separated sampling seeds")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--l-word", default="square", choices=(*world.SHAPES, "any"),
                   help="caption word of the L-shaped objects (any: a random shape word per L)")
    p.add_argument("--seed-base", type=int, default=MASK_EVAL_SEED_BASE)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--figure", default=None, help="also write a demo figure (PNG) of the first --keep layouts")
    p.add_argument("--keep", type=int, default=6)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = tuple(int(s) for s in args.seeds.split(","))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    result, kept = run(args.ckpt, args.layouts, seeds, args.steps, args.guidance, args.l_word, args.seed_base,
                       args.keep if args.figure else 0)
    record = {
        "command": "python -m benchmarks.instance_control.mask_eval " + " ".join(argv if argv is not None else
                                                                                   os.sys.argv[1:]),
        "settings": {"layouts": args.layouts, "seeds": list(seeds), "steps": args.steps, "guidance": args.guidance,
                     "l_word": args.l_word, "seed_base": args.seed_base, "resolution": models.RESOLUTION},
        "results": result,
        "machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": args.threads, "load_avg_1min_at_start": load,
    }
    evaluate.write_json(args.out, record)
    if args.figure:
        figure(kept, args.figure)
        print(f"wrote {args.figure}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
