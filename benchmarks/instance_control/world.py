"""A synthetic multi-instance world: coloured shapes in boxes, deterministic by seed.

Every image holds 1-6 objects, each a (colour, shape) drawn inside its box on a dark, lightly textured
background. Captions: a global one naming every object ("a red circle and a blue square") and one per
instance ("a red circle"). Layouts are made to reveal attribute leakage: with probability ``leak_rate`` a
layout repeats one shape in different colours or one colour on different shapes. Boxes overlap at a
controlled rate (``overlap_rate``: the chance that a new box may overlap one earlier box, up to
``max_overlap_iou``); otherwise boxes keep at least one pixel apart. Later objects are drawn on top.

The held-out evaluation set (:func:`eval_layouts`) groups layouts by instance count into levels L2-L6, like
MIG-Bench, with fixed seeds disjoint from the training seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Well separated in RGB, so a nearest-palette segmentation recovers them from a decoded image.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.12),
    "green": (0.12, 0.82, 0.18),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.88, 0.12),
    "cyan": (0.1, 0.85, 0.9),
    "magenta": (0.9, 0.15, 0.85),
}
BACKGROUND = (0.12, 0.12, 0.14)
SHAPES = ("square", "circle", "triangle")
# Every word a caption can hold: the tokenizer is built from exactly this list.
VOCAB = ("a", "and", *COLORS, *SHAPES)
LEVELS = (2, 3, 4, 5, 6)
TRAIN_SEED_BASE = 0
EVAL_SEED_BASE = 10_000_000  # far from any training index
OVERLAP_SEED_BASE = 20_000_000  # the overlap track's layouts (disjoint from both)
OVERLAP_LEVELS = (2, 3, 4)
OVERLAP_IOU = (0.2, 0.5)  # box IoU of the overlapping pair of an overlap-track layout


# Drawn forms beyond the captioned shapes, only for instances given with a mask (mask training and the mask
# demo): an L (the box less one quadrant, in four orientations) and a ring. No caption word names them.
FREE_FORMS = ("L0", "L1", "L2", "L3", "ring")


@dataclass(frozen=True)
class Instance:
    box: tuple[float, float, float, float]  # (x1, y1, x2, y2) normalised to [0, 1]
    color: str
    shape: str
    form: str | None = None  # what is drawn when it is not ``shape`` (one of FREE_FORMS)

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape}"

    def mask(self, resolution: int) -> np.ndarray:
        """Bool [R, R]: the exact pixels of this object (its drawn form inscribed in its box)."""
        return shape_mask(self.form or self.shape, self.box, resolution)


@dataclass(frozen=True)
class Layout:
    instances: tuple[Instance, ...]
    seed: int

    @property
    def caption(self) -> str:
        """The global caption: every object, in drawing order."""
        return " and ".join(inst.caption for inst in self.instances)

    def as_pipeline_instances(self) -> list[dict]:
        """The ``instances=`` entry of ``ROICtrlPipeline`` for this layout (one prompt)."""
        return [{"box": list(inst.box), "caption": inst.caption} for inst in self.instances]


def box_iou(a, b) -> float:
    """IoU of two (x1, y1, x2, y2) boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _apart(a, b, gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def sample_layout(
    seed: int,
    n: int | None = None,
    *,
    resolution: int = 32,
    max_instances: int = 6,
    min_size: float = 0.24,
    max_size: float = 0.42,
    overlap_rate: float = 0.2,
    max_overlap_iou: float = 0.15,
    leak_rate: float = 0.5,
) -> Layout:
    """The layout of ``seed`` (a pure function of its arguments). ``n`` objects, or 1..max_instances at random.

    Box sides are ``min_size``..``max_size`` of the image, nearly square (aspect 0.8-1.25) so each shape stays
    recognisable. If the boxes cannot be placed after many tries the layout is redrawn from a derived seed.
    """
    rng = np.random.default_rng(seed)
    if n is None:
        n = int(rng.integers(1, max_instances + 1))
    if not 1 <= n <= 6:
        raise ValueError(f"n must be in 1..6, got {n}")
    gap = 1.0 / resolution
    colors, shapes = list(COLORS), list(SHAPES)
    # Attributes: by default all colours distinct; leakage layouts repeat a shape (distinct colours, the usual
    # case anyway with 3 shapes) or a colour on different shapes.
    picked_colors = list(rng.choice(colors, size=n, replace=False))
    picked_shapes = [shapes[int(rng.integers(len(shapes)))] for _ in range(n)]
    if n >= 2 and rng.random() < leak_rate:
        i, j = rng.choice(n, size=2, replace=False)
        if rng.random() < 0.5:  # same shape, different colours
            picked_shapes[j] = picked_shapes[i]
        else:  # same colour, different shapes
            picked_colors[j] = picked_colors[i]
            picked_shapes[j] = [s for s in shapes if s != picked_shapes[i]][int(rng.integers(len(shapes) - 1))]
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(n):
        for _attempt in range(200):
            w = float(rng.uniform(min_size, max_size))
            h = float(np.clip(w * rng.uniform(0.8, 1.25), min_size, max_size))
            x1 = float(rng.uniform(0, 1 - w))
            y1 = float(rng.uniform(0, 1 - h))
            box = (round(x1, 4), round(y1, 4), round(x1 + w, 4), round(y1 + h, 4))
            may_overlap = rng.random() < overlap_rate
            overlaps = [b for b in boxes if not _apart(box, b, gap)]
            if not overlaps:
                break
            if may_overlap and len(overlaps) == 1 and box_iou(box, overlaps[0]) <= max_overlap_iou:
                break
        else:
            return sample_layout(seed + 7_777_777, n, resolution=resolution, max_instances=max_instances,
                                 min_size=min_size, max_size=max_size, overlap_rate=overlap_rate,
                                 max_overlap_iou=max_overlap_iou, leak_rate=leak_rate)
        boxes.append(box)
    insts = tuple(Instance(b, str(c), s) for b, c, s in zip(boxes, picked_colors, picked_shapes))
    return Layout(insts, seed)


def shape_mask(shape: str, box, resolution: int) -> np.ndarray:
    """Bool [R, R]: the pixels (by their centres) of ``shape`` inscribed in the normalised ``box``."""
    R = resolution
    c = (np.arange(R) + 0.5) / R
    x1, y1, x2, y2 = box
    u = (c[None, :] - (x1 + x2) / 2) / ((x2 - x1) / 2)  # [-1, 1] across the box
    v = (c[:, None] - (y1 + y2) / 2) / ((y2 - y1) / 2)
    if shape == "square":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "circle":
        return u**2 + v**2 <= 1
    if shape == "triangle":  # apex at the top centre, base along the bottom edge
        return (v <= 1) & (v >= -1) & (np.abs(u) <= (v + 1) / 2)
    inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape in ("L0", "L1", "L2", "L3"):  # the box less the quadrant top-right, top-left, bottom-left, bottom-right
        su, sv = {"L0": (1, -1), "L1": (-1, -1), "L2": (-1, 1), "L3": (1, 1)}[shape]
        return inside & ~((u * su > 0) & (v * sv > 0))
    if shape == "ring":
        r2 = u**2 + v**2
        return (r2 <= 1) & (r2 >= 0.5**2)
    raise ValueError(f"shape must be one of {SHAPES + FREE_FORMS}, got {shape!r}")


def render(layout: Layout, resolution: int = 32, texture: float = 0.03) -> np.ndarray:
    """float32 [3, R, R] in [0, 1]: the background (lightly textured, from the layout's seed) and every object."""
    rng = np.random.default_rng(layout.seed + 1)
    img = np.empty((3, resolution, resolution), np.float32)
    img[:] = np.asarray(BACKGROUND, np.float32)[:, None, None]
    img += rng.uniform(-texture, texture, size=(1, resolution, resolution)).astype(np.float32)
    for inst in layout.instances:
        img[:, inst.mask(resolution)] = np.asarray(COLORS[inst.color], np.float32)[:, None]
    return np.clip(img, 0, 1)


def train_layout(index: int, seed: int = 0, **kwargs) -> Layout:
    """Training sample ``index`` of the dataset of ``seed``: 1-6 objects."""
    return sample_layout(TRAIN_SEED_BASE + seed * 1_000_003 + index, **kwargs)


def eval_layouts(per_level: int, levels=LEVELS, **kwargs) -> dict[int, list[Layout]]:
    """The held-out evaluation layouts: ``per_level`` layouts of exactly L objects per level L."""
    return {L: [sample_layout(EVAL_SEED_BASE + 1000 * L + i, L, **kwargs) for i in range(per_level)] for L in levels}


def sample_overlap_layout(seed: int, n: int, *, min_size: float = 0.24, max_size: float = 0.42,
                          iou_range=OVERLAP_IOU, similar_rate: float = 0.5, resolution: int = 32) -> Layout:
    """A layout of ``n`` objects whose first two boxes overlap heavily (box IoU in ``iou_range``), the failure
    case the ROICtrl paper names; with probability ``similar_rate`` the pair has similar captions (the same
    shape in two colours, or the same colour on two shapes). Other boxes keep a pixel apart from every box.
    The second object is drawn on top of the first."""
    if not 2 <= n <= 6:
        raise ValueError(f"n must be in 2..6 for an overlapping pair, got {n}")
    rng = np.random.default_rng(seed)
    colors, shapes = list(COLORS), list(SHAPES)
    picked_colors = list(rng.choice(colors, size=n, replace=False))
    picked_shapes = [shapes[int(rng.integers(len(shapes)))] for _ in range(n)]
    if rng.random() < similar_rate:
        if rng.random() < 0.5:
            picked_shapes[1] = picked_shapes[0]
        else:
            picked_colors[1] = picked_colors[0]
            picked_shapes[1] = [s for s in shapes if s != picked_shapes[0]][int(rng.integers(len(shapes) - 1))]
    elif picked_shapes[1] == picked_shapes[0]:  # "not similar": another shape as well as another colour
        picked_shapes[1] = [s for s in shapes if s != picked_shapes[0]][int(rng.integers(len(shapes) - 1))]

    def draw_box():
        w = float(rng.uniform(min_size, max_size))
        h = float(np.clip(w * rng.uniform(0.8, 1.25), min_size, max_size))
        x1, y1 = float(rng.uniform(0, 1 - w)), float(rng.uniform(0, 1 - h))
        return (round(x1, 4), round(y1, 4), round(x1 + w, 4), round(y1 + h, 4))

    gap = 1.0 / resolution
    for _attempt in range(2000):
        boxes = [draw_box()]
        for _ in range(500):
            b = draw_box()
            if iou_range[0] <= box_iou(boxes[0], b) <= iou_range[1]:
                boxes.append(b)
                break
        else:
            continue
        for _ in range(n - 2):
            for _ in range(200):
                b = draw_box()
                if all(_apart(b, o, gap) for o in boxes):
                    boxes.append(b)
                    break
            else:
                break
        if len(boxes) == n:
            insts = tuple(Instance(b, str(c), s) for b, c, s in zip(boxes, picked_colors, picked_shapes))
            return Layout(insts, seed)
    raise RuntimeError(f"could not place {n} boxes with an overlapping pair for seed {seed}")


def overlap_layouts(per_level: int, levels=OVERLAP_LEVELS) -> dict[int, list[Layout]]:
    """The held-out overlap track: ``per_level`` layouts of exactly L objects per level L, each with one pair of
    heavily overlapping boxes (:func:`sample_overlap_layout`); seeds disjoint from training and the main track."""
    return {L: [sample_overlap_layout(OVERLAP_SEED_BASE + 1000 * L + i, L) for i in range(per_level)] for L in levels}


def batch(layouts: list[Layout], resolution: int = 32, max_instances: int = 6):
    """(images [B, 3, R, R] in [-1, 1], boxes [B, N, 4], masks [B, N] bool, instance captions [B][N] ("" pads),
    global captions [B]) with ``N = max_instances``."""
    B = len(layouts)
    images = torch.from_numpy(np.stack([render(l, resolution) for l in layouts])) * 2 - 1
    boxes = torch.zeros(B, max_instances, 4)
    masks = torch.zeros(B, max_instances, dtype=torch.bool)
    captions = [[""] * max_instances for _ in range(B)]
    for b, layout in enumerate(layouts):
        for k, inst in enumerate(layout.instances):
            boxes[b, k] = torch.tensor(inst.box)
            masks[b, k] = True
            captions[b][k] = inst.caption
    return images, boxes, masks, captions, [l.caption for l in layouts]


def with_masks(layout: Layout, mask_rate: float, free_form_rate: float, forms: tuple[str, ...] = FREE_FORMS,
               word: str | None = None) -> tuple[Layout, tuple[bool, ...]]:
    """Mask training: ``(layout', given)`` where ``given[k]`` says instance k comes with its mask. With probability
    ``mask_rate`` a layout gives every instance's mask; each masked instance is then drawn as a free form (one of
    ``forms``, captioned with the shape word ``word``, or a random one when ``None``, so only the mask says its
    shape) with probability ``free_form_rate``. A pure function of the layout's seed that leaves
    :func:`sample_layout`'s stream alone."""
    rng = np.random.default_rng([layout.seed, 20])
    n = len(layout.instances)
    if rng.random() >= mask_rate:
        return layout, (False,) * n
    insts = []
    for inst in layout.instances:
        if rng.random() < free_form_rate:
            form = forms[int(rng.integers(len(forms)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            inst = Instance(inst.box, inst.color, word or shape, form)
        insts.append(inst)
    return Layout(tuple(insts), layout.seed), (True,) * n


def regions(layouts: list[Layout], given: list[tuple[bool, ...]], resolution: int = 32, max_instances: int = 6):
    """float32 ``Tensor[B, N, R, R]``: each instance's exact mask where ``given``, all ones (box only) elsewhere
    and in padded slots: the ``regions`` of ``ROICtrlInstances``."""
    out = torch.ones(len(layouts), max_instances, resolution, resolution)
    for b, (layout, g) in enumerate(zip(layouts, given)):
        for k, (inst, has) in enumerate(zip(layout.instances, g)):
            if has:
                out[b, k] = torch.from_numpy(inst.mask(resolution).astype(np.float32))
    return out
