"""Score a generated image against its layout, with no learned model: colour segmentation + connected components.

Per asked instance (colour c, shape s, box b):

1. every pixel gets the nearest palette colour (or the background, or "none" when it is far from all of them);
2. the connected components (8-neighbourhood) of the pixels labelled c, tiny specks dropped, are candidates;
   the object is the candidate whose bounding box overlaps b most (IoU), or, when none overlaps, the one whose
   centre is nearest b's centre;
3. its shape is read from its mask: a triangle has most of its mass in the lower half; otherwise a square fills
   its bounding box, a circle ~pi/4 of it;
4. instance success = an object of colour c was found, its shape is s and its box IoU with b is >= 0.5.

Also reported: mIoU (mean box IoU, 0 when no object of the colour is found), colour accuracy (the dominant
palette colour among the coloured pixels inside b is c) and leakage (the dominant colour inside b is the colour
of another instance of the layout, not c).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from .world import BACKGROUND, COLORS, SHAPES, Layout, box_iou

_PALETTE = np.asarray([BACKGROUND, *COLORS.values()], np.float32)  # index 0 = background
_NAMES = ["background", *COLORS]
MAX_COLOR_DISTANCE = 0.35  # RGB distance beyond which a pixel is "none" (half-way colours, blur)
MIN_PIXELS_FRACTION = 0.004  # components under this fraction of the image are specks (4 px at 32x32)
SUCCESS_IOU = 0.5


def segment(image: np.ndarray) -> np.ndarray:
    """int [H, W] labels: 0 background, 1..6 the palette colours in COLORS order, -1 none. ``image`` [3, H, W]
    in [0, 1]."""
    pix = np.asarray(image, np.float32).transpose(1, 2, 0)[..., None, :]  # [H, W, 1, 3]
    dist = np.linalg.norm(pix - _PALETTE, axis=-1)  # [H, W, P]
    label = dist.argmin(-1)
    label[dist.min(-1) > MAX_COLOR_DISTANCE] = -1
    return label


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of a bool [H, W] mask, each a bool [H, W] mask."""
    H, W = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            comp[y, x] = True
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < H and 0 <= xx < W and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        queue.append((yy, xx))
        out.append(comp)
    return out


def _bbox(comp: np.ndarray) -> tuple[float, float, float, float]:
    """Normalised (x1, y1, x2, y2) of a component, pixel edges included."""
    H, W = comp.shape
    ys, xs = np.nonzero(comp)
    return xs.min() / W, ys.min() / H, (xs.max() + 1) / W, (ys.max() + 1) / H


def classify_shape(comp: np.ndarray) -> str:
    """'triangle', 'square' or 'circle' from a component mask."""
    ys, xs = np.nonzero(comp)
    crop = comp[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h = crop.shape[0]
    top, bottom = crop[: h // 2].sum(), crop[h - h // 2:].sum()
    if top < 0.65 * bottom:  # a triangle (apex up) has ~1/3 of its mass in the top half
        return "triangle"
    fill = crop.mean()  # square ~1, circle ~pi/4
    return "square" if fill >= 0.88 else "circle"


def score_instance(labels: np.ndarray, color: str, shape: str, box, others: list[str]) -> dict:
    H, W = labels.shape
    c = _NAMES.index(color)
    min_px = max(1, int(round(MIN_PIXELS_FRACTION * H * W)))
    comps = [m for m in components(labels == c) if m.sum() >= min_px]
    found, iou, got_shape = False, 0.0, None
    if comps:
        ious = [box_iou(_bbox(m), box) for m in comps]
        if max(ious) > 0:
            best = int(np.argmax(ious))
        else:
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            d = [((b[0] + b[2]) / 2 - cx) ** 2 + ((b[1] + b[3]) / 2 - cy) ** 2 for b in map(_bbox, comps)]
            best = int(np.argmin(d))
        found, iou, got_shape = True, ious[best], classify_shape(comps[best])
    # Dominant colour among the coloured pixels inside the box.
    x1, y1 = int(np.floor(box[0] * W)), int(np.floor(box[1] * H))
    x2, y2 = int(np.ceil(box[2] * W)), int(np.ceil(box[3] * H))
    inside = labels[y1:y2, x1:x2]
    coloured = inside[inside > 0]
    dominant = _NAMES[int(np.bincount(coloured, minlength=len(_NAMES)).argmax())] if coloured.size else None
    return {
        "found": found,
        "iou": float(iou),
        "shape": got_shape,
        "success": bool(found and got_shape == shape and iou >= SUCCESS_IOU),
        "color_ok": dominant == color,
        "leak": dominant is not None and dominant != color and dominant in others,
    }


def score_image(image: np.ndarray, layout: Layout) -> list[dict]:
    """One dict per instance of ``layout`` (see :func:`score_instance`); ``image`` [3, H, W] in [0, 1]."""
    labels = segment(image)
    out = []
    for k, inst in enumerate(layout.instances):
        others = [o.color for j, o in enumerate(layout.instances) if j != k and o.color != inst.color]
        out.append(score_instance(labels, inst.color, inst.shape, inst.box, others))
    return out


def summarize(per_instance: list[dict]) -> dict:
    """ISR, colour-and-box success (an object of the asked colour with box IoU >= 0.5, shape not asked), mIoU,
    colour accuracy and leakage rate over a list of :func:`score_instance` results."""
    n = len(per_instance)
    if n == 0:
        return {"isr": float("nan"), "color_box": float("nan"), "miou": float("nan"), "color_acc": float("nan"),
                "leakage": float("nan"), "n": 0}
    return {
        "isr": sum(r["success"] for r in per_instance) / n,
        "color_box": sum(r["found"] and r["iou"] >= SUCCESS_IOU for r in per_instance) / n,
        "miou": sum(r["iou"] for r in per_instance) / n,
        "color_acc": sum(r["color_ok"] for r in per_instance) / n,
        "leakage": sum(r["leak"] for r in per_instance) / n,
        "n": n,
    }


assert set(SHAPES) == {"triangle", "square", "circle"}  # classify_shape knows exactly these
