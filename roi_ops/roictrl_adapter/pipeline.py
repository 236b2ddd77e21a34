"""ROICtrlPipeline: prompt + instances (box + caption) -> image, around an existing diffusers pipeline.

Composition, not a copy: the wrapped pipeline runs its own ``__call__`` unchanged. For the duration of one call
this module installs the adapter (unless it already is) and one forward pre-hook on the UNet which, at every
UNet call, hands the adapter the instances of the conditional half of the batch only (diffusers' classifier-free
guidance batch is ``[unconditional; conditional]``), and nothing once scheduled sampling has switched the adapter
off. Everything is removed afterwards, on errors too. See docs/pipeline.md.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import threading
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

import roi_ops

from . import regions
from .adapter import ROICtrlAdapter
from .hooks import KWARG, BlendMapRecorder, get_call_arg, installed_adapter, set_call_arg, unwrap_unet
from .instances import ROICtrlInstances
from .paste import PasteRule

__all__ = [
    "BOX_FORMATS",
    "BOX_UNITS",
    "LAYOUT_KEYS",
    "MAX_GUIDANCE_SCALE",
    "MAX_IMAGE_SIDE",
    "MAX_INSTANCES",
    "MAX_ROICTRL_SCALE",
    "MAX_TEXT_CHARS",
    "Instance",
    "ROICtrlPipeline",
    "check_image_size",
    "check_scales",
    "normalize_instances",
    "validate_layout",
]

BOX_FORMATS = ("xyxy", "xywh")
BOX_UNITS = ("normalized", "pixels")
_UNIT_ALIASES = {"normalized": "normalized", "normalised": "normalized", "pixels": "pixels", "pixel": "pixels"}

# Limits on what one call (or one layout) may ask for, checked before anything is tokenised or loaded. They are
# module constants: a caller who needs more sets them (``pipeline.MAX_INSTANCES = 1024``) or, for the instance
# count, passes ``max_instances=`` to a call.
#: Characters in one prompt, negative prompt or caption. The text encoders read 77 tokens (diffusers truncates the
#: rest, with its warning); 4096 characters is far beyond that and keeps the tokenizer's time and memory small.
MAX_TEXT_CHARS = 4096
#: Instances per prompt. Each costs one caption embedding (77 x D) per generated image and one ROI pass per layer.
MAX_INSTANCES = 256
#: Largest ``height`` / ``width`` in pixels (sizes must also be multiples of the pipeline's VAE factor).
MAX_IMAGE_SIDE = 8192
#: ``guidance_scale`` must be finite and in ``[0, MAX_GUIDANCE_SCALE]`` (diffusers: ``<= 1`` turns guidance off).
MAX_GUIDANCE_SCALE = 100.0
#: ``roictrl_scale`` must be finite and in ``[0, MAX_ROICTRL_SCALE]`` (0 = off, 1 = as trained).
MAX_ROICTRL_SCALE = 10.0
#: The keys of a layout (``roi-ops generate --layout``); :func:`validate_layout` takes others through ``keys``.
LAYOUT_KEYS = ("prompt", "negative_prompt", "width", "height", "box_format", "box_units", "instances")


@dataclass(frozen=True)
class Instance:
    """One instance: a box, the caption of what goes in it and optionally its mask.

    ``box`` is 4 numbers, read according to the call's ``box_format`` (``"xyxy"``: ``(x1, y1, x2, y2)``,
    ``"xywh"``: ``(x, y, width, height)``) and ``box_units`` (``"normalized"`` to ``[0, 1]`` or ``"pixels"``); x
    runs along the image width, y along its height, from the top-left corner. ``mask`` (optional) says which
    pixels of the box are the instance (``regions.read_mask`` lists its forms); without a box, the mask's
    bounding box is the box (``box`` is then ``None`` until :func:`normalize_instances`).
    """

    box: tuple[float, float, float, float] | None
    caption: str
    mask: Any = field(default=None, compare=False, repr=False)


def _is_instance_like(x: object) -> bool:
    return isinstance(x, (Instance, Mapping))


def _as_instance(item: object, where: str, sep: str = " ", base_dir: Any = None, units: str = "normalized"
                 ) -> Instance:
    if isinstance(item, Instance):
        box, caption, mask = item.box, item.caption, item.mask
    elif isinstance(item, Mapping):
        unknown = sorted(set(item) - {"box", "caption", "mask"})
        has_mask = item.get("mask") is not None
        missing = [k for k in ("box", "caption") if k not in item and not (k == "box" and has_mask)]
        if unknown or missing:
            raise ValueError(
                f"{where} must have the keys 'box' and 'caption'; missing {missing}, unknown {unknown} (and "
                "optionally 'mask'; 'box' may be left out when a mask is given)"
            )
        box, caption, mask = item.get("box"), item["caption"], item.get("mask")
    else:
        raise TypeError(
            f"{where} must be an Instance or a dict with 'box', 'caption' and optionally 'mask', got "
            f"{type(item).__name__}"
        )
    if mask is not None:
        mask = regions.read_mask(mask, f"{where}{sep}mask", base_dir=base_dir, units=units)
    if box is None and mask is not None:
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{where}{sep}caption must be a non-empty string, got {_short(caption)}")
        _check_text_length(f"{where}{sep}caption", caption)
        return Instance(None, caption, mask)
    if isinstance(box, torch.Tensor):
        box = box.tolist()
    if (
        not isinstance(box, Sequence)
        or isinstance(box, str)
        or len(box) != 4
        or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in box)
    ):
        raise ValueError(f"{where}{sep}box must be 4 numbers, got {_short(box)}")
    box = tuple(float(v) for v in box)
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"{where}{sep}box must be finite, got {box!r}")
    if not isinstance(caption, str) or not caption.strip():
        raise ValueError(f"{where}{sep}caption must be a non-empty string, got {_short(caption)}")
    _check_text_length(f"{where}{sep}caption", caption)
    return Instance(box, caption, mask)


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({type(value).__name__})"


def _check_text_length(where: str, text: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(
            f"{where} has {len(text)} characters; at most {MAX_TEXT_CHARS} (roi_ops.roictrl_adapter.pipeline."
            "MAX_TEXT_CHARS) are accepted, and the text encoder reads only its first 77 tokens"
        )


def _check_texts(name: str, value: Any) -> None:
    """A prompt argument: ``None``, a string or a list of strings, each of at most :data:`MAX_TEXT_CHARS`."""
    if value is None:
        return
    if isinstance(value, str):
        _check_text_length(name, value)
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{name} must be a string or a list of strings, got {_short(value)}")
    for i, v in enumerate(value):
        _check_text_length(f"{name}[{i}]", v)


def _check_box_options(box_format: Any, box_units: Any, where: str = "") -> None:
    if not isinstance(box_format, str) or box_format not in BOX_FORMATS:
        raise ValueError(f"{where}box_format must be one of {BOX_FORMATS}, got {_short(box_format)}")
    if not isinstance(box_units, str) or box_units not in _UNIT_ALIASES:
        raise ValueError(f"{where}box_units must be one of {BOX_UNITS}, got {_short(box_units)}")


def _check_count(where: str, n: int, max_instances: int | None) -> None:
    limit = MAX_INSTANCES if max_instances is None else max_instances
    if n > limit:
        raise ValueError(
            f"{where} has {n} instances; at most {limit} are accepted (max_instances=, default "
            "roi_ops.roictrl_adapter.pipeline.MAX_INSTANCES)"
        )


def check_image_size(height: Any, width: Any, multiple: int = 1, where: str = "") -> None:
    """Raise ``ValueError`` unless ``height`` and ``width`` are ints in ``[1, MAX_IMAGE_SIDE]`` and multiples of
    ``multiple`` (the pipeline's VAE factor). ``None`` (the model's default size) passes."""
    for key, v in (("height", height), ("width", width)):
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise ValueError(f"{where}{key} must be a positive integer (pixels), got {_short(v)}")
        if not 1 <= v <= MAX_IMAGE_SIDE:
            raise ValueError(
                f"{where}{key} must be in [1, {MAX_IMAGE_SIDE}] pixels (roi_ops.roictrl_adapter.pipeline."
                f"MAX_IMAGE_SIDE), got {v}"
            )
        if v % multiple:
            raise ValueError(f"{where}{key} must be a multiple of {multiple} (the model's VAE factor), got {v}")


def _check_number(name: str, value: Any, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {_short(value)}")
    if not math.isfinite(value) or not 0.0 <= value <= high:
        raise ValueError(f"{name} must be a finite number in [0, {high:g}], got {value!r}")


def check_scales(guidance_scale: Any = None, roictrl_scale: Any = None, beta: Any = None,
                 names: tuple[str, str, str] = ("guidance_scale", "roictrl_scale",
                                                "roictrl_scheduled_sampling_beta")) -> None:
    """Raise ``ValueError`` naming the argument unless each given value is finite and in its range:
    ``guidance_scale`` in ``[0, MAX_GUIDANCE_SCALE]``, ``roictrl_scale`` in ``[0, MAX_ROICTRL_SCALE]``, ``beta`` in
    ``[0, 1]`` (``None`` is not checked). ``inf`` guidance gives a black image, ``nan`` silently turns it off."""
    for name, value, high in zip(names, (guidance_scale, roictrl_scale, beta),
                                 (MAX_GUIDANCE_SCALE, MAX_ROICTRL_SCALE, 1.0)):
        if value is not None:
            _check_number(name, value, high)


def validate_layout(
    layout: Any,
    *,
    keys: Sequence[str] = LAYOUT_KEYS,
    require_prompt: bool = True,
    max_instances: int | None = None,
    where: str = "",
    base_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Check one layout-like JSON object and return a copy with its defaults filled in.

    The one validator of a layout: ``roi-ops generate --layout`` uses it, and so can anything that reads layouts
    (e.g. a dataset line ``{"file_name", "prompt", "instances", "box_format", "box_units"}``: pass
    ``keys=("file_name", "prompt", "instances", "box_format", "box_units")`` and check ``file_name`` yourself).
    ``keys`` are the keys allowed; the ones this function knows (:data:`LAYOUT_KEYS`) are checked when present:

    - ``prompt`` / ``negative_prompt``: a string of at most :data:`MAX_TEXT_CHARS` characters (``prompt``
      non-empty, and required when ``require_prompt``);
    - ``width`` / ``height``: an int in ``[1, MAX_IMAGE_SIDE]``;
    - ``box_format``: one of :data:`BOX_FORMATS` (default ``"xyxy"``); ``box_units``: one of :data:`BOX_UNITS`
      (default ``"normalized"``; returned in its canonical spelling);
    - ``instances``: a list of at most ``max_instances`` (default :data:`MAX_INSTANCES`) objects
      ``{"box": [4 finite numbers], "caption": non-empty string, "mask": optional}``; returned as
      :class:`Instance` objects (the box as given: whether it fits the image is :func:`normalize_instances`'
      check, which needs the size). A ``mask`` is a PNG path relative to ``base_dir`` (the layout file's
      folder), a COCO RLE ``{"size": [h, w], "counts": ...}`` or a COCO polygon list (in ``box_units``); with a
      mask the box may be left out (the mask's bounding box).

    Raises ``ValueError`` whose message starts with ``where`` and names the key by its path
    (``instances[0].box must be 4 numbers, got [1, 2]``) and what was expected.
    """
    if not isinstance(layout, Mapping):
        raise ValueError(f"{where or 'a layout '}must hold a JSON object, got {type(layout).__name__}")
    unknown = sorted(str(k) for k in set(layout) - set(keys))
    if unknown:
        raise ValueError(f"{where}unknown keys {unknown[:10]}; expected some of {sorted(keys)}")
    out = dict(layout)
    for key in ("prompt", "negative_prompt"):
        if key in keys and layout.get(key) is not None:
            value = layout[key]
            if not isinstance(value, str):
                raise ValueError(f"{where}{key} must be a string, got {type(value).__name__} {_short(value)}")
            _check_text_length(f"{where}{key}", value)
    if require_prompt and (not isinstance(layout.get("prompt"), str) or not layout["prompt"].strip()):
        raise ValueError(f"{where}prompt must be a non-empty string, got {_short(layout.get('prompt'))}")
    check_image_size(layout.get("height"), layout.get("width"), where=where)
    out["box_format"] = layout.get("box_format", "xyxy")
    units = layout.get("box_units", "normalized")
    _check_box_options(out["box_format"], units, where)
    out["box_units"] = _UNIT_ALIASES[units]
    instances = layout.get("instances", [])
    if instances is None:
        instances = []
    if not isinstance(instances, list):
        raise ValueError(
            f"{where}instances must be a list of {{\"box\": [4 numbers], \"caption\": text}}, got "
            f"{type(instances).__name__}"
        )
    _check_count(f"{where}instances", len(instances), max_instances)
    checked = []
    for i, item in enumerate(instances):
        if not isinstance(item, Mapping):
            raise ValueError(
                f"{where}instances[{i}] must be an object {{\"box\": [4 numbers], \"caption\": text}}, got "
                f"{type(item).__name__} {_short(item)}"
            )
        checked.append(_as_instance(item, f"{where}instances[{i}]", sep=".", base_dir=base_dir,
                                    units=out["box_units"]))
    out["instances"] = checked
    return out


def normalize_instances(
    instances: Any,
    num_prompts: int,
    *,
    width: int,
    height: int,
    box_format: str = "xyxy",
    box_units: str = "normalized",
    clip_boxes: bool = False,
    max_instances: int | None = None,
) -> list[list[Instance]]:
    """Validate ``instances`` and return, per prompt, a list of :class:`Instance` with normalised xyxy boxes.

    ``instances`` is ``None`` or ``[]`` (no instance anywhere), one prompt's list of instances (only when
    ``num_prompts == 1``), or a list with one list per prompt. Each instance is an :class:`Instance` or a dict
    ``{"box": [4 numbers], "caption": str}``. ``width`` and ``height`` are the image's, in pixels: they convert
    ``box_units="pixels"`` and let a normalised box that looks like pixels say so.

    Raises ``ValueError``/``TypeError`` naming the instance (``instances[p][i]``) and what is wrong; with
    ``clip_boxes=True``, boxes that overshoot the image are clamped to it with a warning instead. A prompt with
    more than ``max_instances`` instances (default :data:`MAX_INSTANCES`), or a caption longer than
    :data:`MAX_TEXT_CHARS` characters, is refused.
    """
    _check_box_options(box_format, box_units)
    units = _UNIT_ALIASES[box_units]
    if instances is None:
        return [[] for _ in range(num_prompts)]
    if isinstance(instances, (str, bytes, Mapping, Instance)) or not isinstance(instances, Sequence):
        raise TypeError(
            "instances must be a list of instances (one prompt) or a list with one list per prompt, "
            f"got {type(instances).__name__}"
        )
    if len(instances) == 0:
        return [[] for _ in range(num_prompts)]
    if all(_is_instance_like(x) for x in instances):
        if num_prompts != 1:
            raise ValueError(
                f"instances is a flat list but there are {num_prompts} prompts: give one list of instances per "
                "prompt (an empty list for a prompt without instances)"
            )
        per_prompt = [list(instances)]
    else:
        bad = [i for i, x in enumerate(instances) if isinstance(x, (str, bytes)) or not isinstance(x, Sequence)]
        if bad:
            raise TypeError(
                f"instances[{bad[0]}] must be a list of instances (one list per prompt), got "
                f"{type(instances[bad[0]]).__name__}; do not mix instances and lists"
            )
        if len(instances) != num_prompts:
            raise ValueError(f"instances has {len(instances)} lists but there are {num_prompts} prompts")
        per_prompt = [list(x) for x in instances]

    for p, items in enumerate(per_prompt):
        _check_count(f"instances[{p}]", len(items), max_instances)
    out, clipped = [], []
    outside = []
    for p, items in enumerate(per_prompt):
        row = []
        for i, item in enumerate(items):
            where = f"instances[{p}][{i}]"
            inst = _as_instance(item, where, units=units)
            mask = None if inst.mask is None else regions.to_image(inst.mask, height, width)
            if inst.box is None:  # a mask without a box: the mask's bounding box
                row.append(Instance(regions.mask_box(mask, f"{where} mask"), inst.caption, mask))
                continue
            a, b, c, d = inst.box
            if box_format == "xywh":
                if c < 0 or d < 0:
                    raise ValueError(f"{where} box (x, y, w, h) = {inst.box} has a negative width or height")
                c, d = a + c, b + d
            if c < a or d < b:
                raise ValueError(f"{where} box (x1, y1, x2, y2) = {(a, b, c, d)} must have x1 <= x2 and y1 <= y2")
            if units == "pixels":
                a, c, b, d = a / width, c / width, b / height, d / height
            box = (a, b, c, d)
            if min(box) < 0 or max(box) > 1:
                if not clip_boxes:
                    if units == "normalized" and max(box) > 1.5:
                        hint = (
                            f"it looks like pixel coordinates: pass box_units='pixels' (the image is "
                            f"{width}x{height})"
                        )
                    else:
                        hint = "pass clip_boxes=True to clamp it to the image (e.g. a detector's overshoot)"
                    raise ValueError(f"{where} box {inst.box} ({box_units}) goes outside the image; {hint}")
                box = tuple(min(max(v, 0.0), 1.0) for v in box)
                clipped.append(where)
            if mask is not None:
                mask, cut = _clip_mask(mask, box)
                if cut:
                    outside.append(f"{where} ({cut} px)")
            row.append(Instance(box, inst.caption, mask))
        out.append(row)
    if clipped:
        message = f"clip_boxes=True clamped {len(clipped)} box(es) to the image: {', '.join(clipped)}"
        warnings.warn(message, stacklevel=3)
    if outside:
        warnings.warn(
            f"{len(outside)} mask(s) have pixels outside their box, clipped to the box: {', '.join(outside)}",
            stacklevel=3,
        )
    return out


def _clip_mask(mask: np.ndarray, box: tuple[float, float, float, float]) -> tuple[np.ndarray, int]:
    """``mask`` (image size) with the pixels whose centre lies outside the normalised ``box`` set to 0, and how
    many nonzero pixels that removed."""
    h, w = mask.shape
    x1, y1, x2, y2 = box
    cx = (np.arange(w) + 0.5) / w
    cy = (np.arange(h) + 0.5) / h
    inside = ((cy >= y1) & (cy <= y2))[:, None] & ((cx >= x1) & (cx <= x2))[None, :]
    cut = int(((mask > 0) & ~inside).sum())
    return (np.where(inside, mask, 0).astype(np.float32) if cut else mask), cut


def instance_regions(rows: list[list[Instance]], n_max: int, size: tuple[int, int]) -> torch.Tensor | None:
    """``Tensor[S, n_max, h, w]``: the masks of ``rows`` (at the image size) area-averaged to ``size`` (the
    latents: the image is a multiple of it, so each latent pixel gets the exact mean over its footprint), all
    ones for instances without a mask and for padding; ``None`` when no instance has a mask (boxes only)."""
    if not any(inst.mask is not None for row in rows for inst in row):
        return None
    out = torch.ones(len(rows), n_max, *size)
    for s, row in enumerate(rows):
        for i, inst in enumerate(row):
            if inst.mask is not None:
                m = torch.from_numpy(np.ascontiguousarray(inst.mask, dtype=np.float32))[None, None]
                out[s, i] = torch.nn.functional.adaptive_avg_pool2d(m, size)[0, 0]
    return out


def _map_sizes(
    adapter: ROICtrlAdapter, latent_hw: tuple[int, int], vae_scale_factor: int
) -> set[tuple[int, int, int]]:
    """``(H, W, grid)`` of every adapter layer: its feature map for latents of ``latent_hw`` (stride-2 convs: ceil)
    and its ROI grid side."""
    sizes = set()
    for spec in adapter.specs:
        h, w = latent_hw
        for _ in range(int(round(math.log2(spec.downsample // vae_scale_factor)))):
            h, w = -(-h // 2), -(-w // 2)
        sizes.add((h, w, spec.grid))
    return sizes


def _warn_tiny(instances: list[list[Instance]], sizes: set[tuple[int, int, int]], rule: PasteRule) -> None:
    """Warn for every box that covers no pixel of any layer under the adapter's paste ``rule``."""
    boxes = [(p, i, inst.box) for p, row in enumerate(instances) for i, inst in enumerate(row)]
    if not boxes:
        return
    b = torch.tensor([box for _, _, box in boxes], dtype=torch.float64)
    seen = torch.zeros(len(boxes), dtype=torch.bool)
    for h, w, grid in sizes:
        rois = torch.cat([torch.arange(len(boxes), dtype=torch.float64)[:, None], b * torch.tensor([w, h, w, h])], 1)
        seen |= rule.coverage(rois, len(boxes), (h, w), grid).flatten(1).any(1)
    sizes = {(h, w) for h, w, _ in sizes}
    for k in (~seen).nonzero().flatten().tolist():
        p, i, box = boxes[k]
        warnings.warn(
            f"instances[{p}][{i}] box {tuple(round(v, 4) for v in box)} covers no pixel of any adapter layer's "
            f"feature map (sizes {sorted(sizes)}), so its caption is never blended in; make it larger",
            stacklevel=3,
        )


def _image_size(pipe: Any, kwargs: Mapping[str, Any]) -> tuple[int, int]:
    """The ``(height, width)`` the wrapped pipeline will generate, before it runs (checked at the first step)."""
    height, width = kwargs.get("height"), kwargs.get("width")
    if height is None or width is None:
        image = kwargs.get("image")  # ControlNet / T2I-Adapter condition: it sets the size when none is given
        if isinstance(image, (list, tuple)) and image:
            image = image[0]
        if image is not None and hasattr(image, "size") and not isinstance(image, torch.Tensor):
            w, h = image.size  # PIL
        elif isinstance(image, torch.Tensor):
            h, w = image.shape[-2:]
        else:
            h = w = pipe.unet.config.sample_size * pipe.vae_scale_factor
        height, width = height or int(h), width or int(w)
    return int(height), int(width)


def _schedule_length(timesteps: torch.Tensor) -> int:
    """Number of denoising steps: runs of equal timesteps (second-order schedulers repeat each one)."""
    t = timesteps.flatten()
    return int((t[1:] != t[:-1]).sum()) + 1 if t.numel() else 0


class _CallState:
    """What the UNet hook needs during one pipeline call."""

    def __init__(self, pipe, adapter, cond: ROICtrlInstances | None, num_cond: int, cutoff_beta: float,
                 image_hw: tuple[int, int], pixel_boxes: bool, maps: bool):
        self.pipe, self.adapter, self.cond, self.num_cond = pipe, adapter, cond, num_cond
        self.beta, self.image_hw, self.pixel_boxes = cutoff_beta, image_hw, pixel_boxes
        self.by_batch: dict[int, ROICtrlInstances] = {}
        self.step, self.last_t, self.cutoff = -1, None, None
        self.maps = maps  # per UNet call the adapter ran on: the sum of the instance weight maps, and the count
        self.recorder: BlendMapRecorder | None = None  # the adapter's, while the call records the blend maps
        self.map_sum: torch.Tensor | None = None
        self.map_count = 0
        self.active_steps: list[int] = []
        self.current: ROICtrlInstances | None = None
        self.thread = threading.get_ident()

    def batch_instances(self, batch: int) -> ROICtrlInstances:
        if batch not in self.by_batch:
            cond, n = self.cond, self.num_cond
            if batch == n:  # no classifier-free guidance: every sample is conditional
                self.by_batch[batch] = cond
            elif batch == 2 * n and getattr(self.pipe, "do_classifier_free_guidance", False):
                # diffusers' CFG batch is [unconditional; conditional]: the first half gets no instance
                # (all-zero masks), so it is the base model bitwise.
                pad = lambda t: torch.cat([torch.zeros_like(t), t])  # noqa: E731
                self.by_batch[batch] = ROICtrlInstances(
                    pad(cond.boxes), pad(cond.embeddings), pad(cond.masks), scale=cond.scale,
                    regions=None if cond.regions is None else pad(cond.regions),
                )
            else:
                raise RuntimeError(
                    f"ROICtrlPipeline: the UNet got a batch of {batch} but the call has {n} conditional samples "
                    f"(prompts x num_images_per_prompt); expected {n}, or {2 * n} under classifier-free guidance. "
                    f"{type(self.pipe).__name__} batches its UNet calls in a way this wrapper does not know"
                )
        return self.by_batch[batch]

    def unet_pre_hook(self, module, args, kwargs):
        if threading.get_ident() != self.thread:  # e.g. the plain pipeline called from another thread meanwhile
            raise RuntimeError(_NOT_REENTRANT.format(what="UNet"))
        module = unwrap_unet(module)  # the arguments are read by the name of the UNet's own forward
        sample = get_call_arg(module, args, kwargs, "sample")
        t = get_call_arg(module, args, kwargs, "timestep")
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        if self.cutoff is None:
            lat_h, lat_w = sample.shape[-2:]
            f = self.pipe.vae_scale_factor
            if self.pixel_boxes and (lat_h * f, lat_w * f) != self.image_hw:
                raise RuntimeError(
                    f"ROICtrlPipeline converted pixel boxes for a {self.image_hw[1]}x{self.image_hw[0]} image but "
                    f"the pipeline generates {lat_w * f}x{lat_h * f}; pass height= and width= explicitly"
                )
            self.image_hw = (lat_h * f, lat_w * f)  # what is generated; the blend maps take this size
            steps = _schedule_length(self.pipe.scheduler.timesteps)
            self.cutoff = int(self.beta * steps)
        if t != self.last_t:  # a new denoising step (second-order schedulers call twice with one timestep)
            self.step, self.last_t = self.step + 1, t
        self.current = None
        if self.cond is None or self.step >= self.cutoff:
            return None
        instances = self.batch_instances(sample.shape[0])
        if not self.active_steps or self.active_steps[-1] != self.step:
            self.active_steps.append(self.step)
        self.current = instances
        cak = get_call_arg(module, args, kwargs, "cross_attention_kwargs")
        cak = {**(cak or {}), KWARG: instances}
        return set_call_arg(module, args, kwargs, "cross_attention_kwargs", cak)

    def unet_post_hook(self, module, args, kwargs, output):
        if self.recorder is None:
            return None
        records = self.recorder.take()  # this UNet call's layers, in block order
        if self.current is None:
            return None
        per_layer = []
        for record in records:
            w = record.instance_weights
            per_layer.append(torch.nn.functional.interpolate(w[None].float(), size=self.image_hw, mode="bilinear")[0])
        if per_layer:
            m = torch.stack(per_layer).mean(0).cpu()
            self.map_sum = m if self.map_sum is None else self.map_sum + m
            self.map_count += 1
        return None

    def blend_maps(self, instances: list[list[Instance]], num_images_per_prompt: int) -> list[torch.Tensor]:
        H, W = self.image_hw
        counts = [len(row) for row in instances for _ in range(num_images_per_prompt)]
        if self.map_sum is None:
            return [torch.zeros(n, H, W) for n in counts]
        return list((self.map_sum / self.map_count).split(counts))


# The UNets and adapters a ROICtrlPipeline call is running on, whichever wrapper runs it: one call at a time each.
_BUSY: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_BUSY_LOCK = threading.Lock()
_NOT_REENTRANT = (
    "ROICtrlPipeline is not re-entrant: another call is running on this pipeline's {what} (from another thread, "
    "or from inside a callback of that call). A call installs hooks and per-call state on the UNet and the adapter, "
    "so concurrent calls would mix their instances. For parallel generation use one ROICtrlPipeline per pipeline "
    "copy, each with its own adapter (e.g. ROICtrlPipeline.from_pipe(copy_of_pipe, copy.deepcopy(adapter))), or "
    "serialise the calls (a queue, or a threading.Lock around the call)"
)


def _reserve(modules: dict[str, nn.Module]) -> None:
    with _BUSY_LOCK:
        for what, module in modules.items():
            if module in _BUSY:
                raise RuntimeError(_NOT_REENTRANT.format(what=what))
        for module in modules.values():
            _BUSY.add(module)


def _release(modules: dict[str, nn.Module]) -> None:
    with _BUSY_LOCK:
        for module in modules.values():
            _BUSY.discard(module)


#: The adapter's folder inside a folder written by :meth:`ROICtrlPipeline.save_pretrained`.
ADAPTER_SUBFOLDER = "roictrl"


class ROICtrlPipeline:
    """A diffusers Stable Diffusion / SDXL pipeline (ControlNet, T2I-Adapter and IP-Adapter included) with ROICtrl
    instances: ``ROICtrlPipeline.from_pipe(pipe, adapter)(prompt, instances=[{"box": ..., "caption": ...}])``.

    Attributes other than the ones below are the wrapped pipeline's (``roictrl.scheduler`` is
    ``roictrl.pipe.scheduler``). The adapter is installed on ``pipe.unet`` only during a call.

    Not re-entrant: one call at a time per pipeline (UNet) and per adapter. A second call while one runs (another
    thread, or a callback of the running call) raises ``RuntimeError`` at once; for parallel generation use one
    wrapper per pipeline copy, each with its own adapter, or a queue.
    """

    def __init__(self, pipe: Any, adapter: ROICtrlAdapter):
        for name in ("unet", "encode_prompt", "vae_scale_factor"):
            if not hasattr(pipe, name):
                raise TypeError(
                    f"ROICtrlPipeline wraps a diffusers Stable Diffusion / SDXL pipeline; {type(pipe).__name__} "
                    f"has no {name!r}"
                )
        if not isinstance(adapter, ROICtrlAdapter):
            raise TypeError(f"adapter must be a ROICtrlAdapter, got {type(adapter).__name__}")
        adapter.check_compatible(pipe.unet)
        self.pipe, self.adapter = pipe, adapter

    @classmethod
    def from_pipe(cls, pipe: Any, adapter: ROICtrlAdapter) -> "ROICtrlPipeline":
        """Wrap ``pipe`` (not copied: it keeps working on its own) and move ``adapter`` to its UNet's device and
        dtype. Raises ``ValueError`` if the adapter was built for another UNet."""
        self = cls(pipe, adapter)
        self._match_unet()
        return self

    def __getattr__(self, name: str) -> Any:
        if name in ("pipe", "adapter"):  # not set yet: no recursion through __getattr__
            raise AttributeError(name)
        if name == "push_to_hub":  # the wrapped pipeline's would upload it without the adapter
            raise AttributeError(
                "ROICtrlPipeline has no push_to_hub: save with roictrl.save_pretrained(folder) (the pipeline plus "
                f"its adapter in {ADAPTER_SUBFOLDER}/) and upload that folder"
            )
        return getattr(self.pipe, name)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the wrapped pipeline (``pipe.save_pretrained(save_directory, **kwargs)``) and the adapter beside it,
        in ``save_directory/roictrl/`` (``ROICtrlAdapter.save_pretrained``). :meth:`from_pretrained` reads both."""
        self.pipe.save_pretrained(save_directory, **kwargs)
        self.adapter.save_pretrained(os.path.join(save_directory, ADAPTER_SUBFOLDER))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs: Any) -> "ROICtrlPipeline":
        """Load a folder written by :meth:`save_pretrained`: the pipeline with diffusers'
        ``DiffusionPipeline.from_pretrained(directory, **kwargs)`` (e.g. ``torch_dtype=``, ``local_files_only=``),
        the adapter from ``directory/roictrl/`` (checked against the pipeline's UNet, on its device and dtype)."""
        from diffusers import DiffusionPipeline

        from .adapter import CONFIG_NAME

        folder = os.fspath(directory)
        adapter_dir = os.path.join(folder, ADAPTER_SUBFOLDER)
        if not os.path.isfile(os.path.join(adapter_dir, CONFIG_NAME)):
            raise FileNotFoundError(
                f"{folder!r} has no {ADAPTER_SUBFOLDER}/{CONFIG_NAME}: not a folder written by "
                "ROICtrlPipeline.save_pretrained (a plain diffusers folder loads with DiffusionPipeline."
                "from_pretrained, its adapter with load_adapter; wrap them with ROICtrlPipeline.from_pipe)"
            )
        pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
        return cls.from_pipe(pipe, ROICtrlAdapter.from_pretrained(adapter_dir, unet=pipe.unet))

    def to(self, *args: Any, **kwargs: Any) -> "ROICtrlPipeline":
        """``pipe.to(...)``, then the adapter follows the UNet's device and dtype."""
        self.pipe.to(*args, **kwargs)
        self._match_unet()
        return self

    def _match_unet(self) -> None:
        p = next((p for p in unwrap_unet(self.pipe.unet).parameters() if p.is_floating_point()), None)
        if p is not None:
            self.adapter.to(device=p.device, dtype=p.dtype)

    def encode_captions(
        self, captions: list[str], clip_skip: int | None = None, lora_scale: float | None = None
    ) -> torch.Tensor:
        """``Tensor[n, L, D]``: the captions through the pipeline's own text encoder(s), as its prompts are
        encoded (SDXL: both encoders' penultimate states, concatenated, as the UNet takes them)."""
        kwargs = {}
        if clip_skip is not None:
            kwargs["clip_skip"] = clip_skip
        if lora_scale is not None:
            kwargs["lora_scale"] = lora_scale
        out = self.pipe.encode_prompt(
            prompt=captions,
            device=self.pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            **kwargs,
        )
        return out[0]

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        instances: Any = None,
        *,
        box_format: str = "xyxy",
        box_units: str = "normalized",
        clip_boxes: bool = False,
        roictrl_scheduled_sampling_beta: float = 1.0,
        roictrl_scale: float = 1.0,
        return_blend_maps: bool = False,
        max_instances: int | None = None,
        **kwargs: Any,
    ):
        """Run the wrapped pipeline with instances.

        Args:
            prompt, **kwargs: the wrapped pipeline's own arguments (``negative_prompt``, ``num_inference_steps``,
                ``guidance_scale``, ``num_images_per_prompt``, ``generator``, ``height``/``width``, ``image`` for
                ControlNet / T2I-Adapter, ``ip_adapter_image``, ``prompt_embeds``, ...), passed through unchanged.
            instances: per prompt, a list of :class:`Instance` or ``{"box": [4 numbers], "caption": str}``; for a
                single prompt the flat list is accepted. ``None``/``[]``: exactly the wrapped pipeline's image.
            box_format: ``"xyxy"`` (x1, y1, x2, y2) or ``"xywh"`` (x, y, width, height).
            box_units: ``"normalized"`` (``[0, 1]`` of the image's width/height) or ``"pixels"``.
            clip_boxes: clamp boxes that overshoot the image (with a warning) instead of raising.
            roictrl_scheduled_sampling_beta: the adapter acts on the first ``int(beta * steps)`` denoising steps
                only (the official knob; 1.0 = all steps, 0 = none).
            roictrl_scale: strength of the adapter (0 = off, 1 = as trained).
            return_blend_maps: also return each instance's blending weight, averaged over layers and the UNet
                calls the adapter ran on: ``output.blend_maps``, a list with one
                ``Tensor[n_instances, height, width]`` per
                generated image (in the order of ``output.images``); with ``return_dict=False`` it is appended
                to the returned tuple.
            max_instances: the most instances a prompt may have (default :data:`MAX_INSTANCES`, 256).

        Before anything is tokenised: prompts and captions of at most :data:`MAX_TEXT_CHARS` characters,
        ``height``/``width`` in ``[1, MAX_IMAGE_SIDE]`` and multiples of the VAE factor, finite
        ``guidance_scale`` in ``[0, MAX_GUIDANCE_SCALE]``, ``roictrl_scale`` in ``[0, MAX_ROICTRL_SCALE]``,
        ``beta`` in ``[0, 1]``; and no component on the meta device. Not re-entrant (see the class).

        Returns:
            The wrapped pipeline's output (plus the blend maps when asked).
        """
        unet = unwrap_unet(self.pipe.unet)
        busy = {"UNet": unet, "ROICtrlAdapter": self.adapter}
        _reserve(busy)  # before anything else: a concurrent call must not even read the shared state
        try:
            return self._call(prompt, instances, box_format, box_units, clip_boxes, roictrl_scheduled_sampling_beta,
                              roictrl_scale, return_blend_maps, max_instances, kwargs)
        finally:
            _release(busy)

    def _check_devices(self) -> None:
        on_meta = [
            name for name, component in getattr(self.pipe, "components", {}).items()
            if isinstance(component, nn.Module) and any(p.is_meta for p in component.parameters())
        ]
        if any(p.is_meta for p in self.adapter.parameters()):
            on_meta.append("adapter")
        if on_meta:
            raise RuntimeError(
                f"ROICtrlPipeline: {', '.join(on_meta)} on the meta device (parameters without data, e.g. after "
                ".to('meta')): nothing can run there. Load the weights again (from_pretrained) on a real device"
            )

    def _call(self, prompt, instances, box_format, box_units, clip_boxes, beta, roictrl_scale, return_blend_maps,
              max_instances, kwargs):
        check_scales(kwargs.get("guidance_scale"), roictrl_scale, beta)
        for name in ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2"):
            _check_texts(name, prompt if name == "prompt" else kwargs.get(name))
        check_image_size(kwargs.get("height"), kwargs.get("width"), self.pipe.vae_scale_factor)
        n_images = kwargs.get("num_images_per_prompt")
        n_images = 1 if n_images is None else n_images
        if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {n_images!r}")
        if prompt is not None:
            num_prompts = 1 if isinstance(prompt, str) else len(prompt)
        elif kwargs.get("prompt_embeds") is not None:
            num_prompts = kwargs["prompt_embeds"].shape[0]
        else:
            raise ValueError("ROICtrlPipeline needs prompt (or prompt_embeds)")
        image_hw = _image_size(self.pipe, kwargs)
        check_image_size(*image_hw, self.pipe.vae_scale_factor)
        per_prompt = normalize_instances(
            instances, num_prompts, width=image_hw[1], height=image_hw[0], box_format=box_format,
            box_units=box_units, clip_boxes=clip_boxes, max_instances=max_instances,
        )
        self._check_devices()
        vae_sf = self.pipe.vae_scale_factor
        _warn_tiny(
            per_prompt,
            _map_sizes(self.adapter, (image_hw[0] // vae_sf, image_hw[1] // vae_sf), vae_sf),
            self.adapter.paste_rule,
        )

        self._match_unet()
        cond = None
        if any(per_prompt):
            cak = kwargs.get("cross_attention_kwargs") or {}
            captions = sorted({inst.caption for row in per_prompt for inst in row})
            with torch.no_grad():
                emb = self.encode_captions(captions, kwargs.get("clip_skip"), cak.get("scale"))
            index = {c: k for k, c in enumerate(captions)}
            n_max = max(len(row) for row in per_prompt)
            rows = [row for row in per_prompt for _ in range(n_images)]  # diffusers repeats prompt-major
            boxes = torch.zeros(len(rows), n_max, 4, dtype=torch.float32)
            masks = torch.zeros(len(rows), n_max, dtype=torch.bool)
            which = torch.zeros(len(rows), n_max, dtype=torch.long)
            for s, row in enumerate(rows):
                for i, inst in enumerate(row):
                    boxes[s, i] = torch.tensor(inst.box)
                    masks[s, i] = True
                    which[s, i] = index[inst.caption]
            device = emb.device
            latent_hw = (image_hw[0] // vae_sf, image_hw[1] // vae_sf)
            regions_ = instance_regions(rows, n_max, latent_hw)
            cond = ROICtrlInstances(
                boxes.to(device), emb[which.to(device)], masks.to(device), scale=roictrl_scale,
                regions=None if regions_ is None else regions_.to(device),
            )

        unet = unwrap_unet(self.pipe.unet)
        state = _CallState(
            self.pipe, self.adapter, cond, num_prompts * n_images, float(beta), image_hw,
            _UNIT_ALIASES.get(box_units) == "pixels", return_blend_maps,
        )
        found = installed_adapter(unet)
        if found is not None and found is not self.adapter:
            raise RuntimeError(
                "pipe.unet already has another ROICtrlAdapter installed; uninstall it or wrap the pipeline with it"
            )
        we_installed = found is None
        was_enabled = self.adapter.enabled
        handles = []
        recording = contextlib.ExitStack()
        try:
            if we_installed:
                self.adapter.install(unet)
            self.adapter.enabled = True
            if return_blend_maps:
                state.recorder = recording.enter_context(self.adapter.record_blend_maps())
            # On the module the pipeline calls: for a torch.compile'd UNet that is the wrapper, whose own hooks
            # run eagerly around the compiled forward (step counting is Python state, not graph code).
            handles.append(self.pipe.unet.register_forward_pre_hook(state.unet_pre_hook, with_kwargs=True))
            handles.append(self.pipe.unet.register_forward_hook(state.unet_post_hook, with_kwargs=True))
            output = self.pipe(prompt, **kwargs)
        finally:
            for h in handles:
                h.remove()
            recording.close()
            self.adapter.enabled = was_enabled
            if we_installed and self.adapter.is_installed:
                self.adapter.uninstall(unet)
        self.last_active_steps = state.active_steps  # denoising steps the adapter acted on (for inspection)
        if not return_blend_maps:
            return output
        maps = state.blend_maps(per_prompt, n_images)
        if isinstance(output, tuple):
            return (*output, maps)
        output["blend_maps"] = maps
        return output
