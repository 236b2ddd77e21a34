"""What ``roi-ops ui`` does with layouts, without gradio: the canvas's value, the layout JSON of ``roi-ops generate``
and the checked request one generation runs on.

The canvas's value is ``{"width": W, "height": H, "instances": [{"box": [x1, y1, x2, y2], "caption": str}]}``:
boxes normalised xyxy, W x H the size of the image the boxes are drawn for. It comes from the browser, so it is
checked here like any layout (:func:`~roi_ops.roictrl_adapter.pipeline.validate_layout`, the one validator of
layouts) before anything runs.

Masks (the mask issue, not on this branch yet): a mask becomes one more key of an instance, checked by
``validate_layout`` like the others; :func:`instance_json` is the one place a checked instance becomes the JSON
of the canvas and of an exported layout, so it is where the mask is written back; the JavaScript ``read`` of
``canvas.py`` keeps an instance's keys, and the brush or upload that makes a mask goes in its list row there.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from roi_ops.roictrl_adapter.generate import MAX_SEED, parse_layout
from roi_ops.roictrl_adapter.pipeline import (
    Instance,
    check_image_size,
    check_scales,
    normalize_instances,
    validate_layout,
)

#: Digits a normalised box coordinate keeps in the canvas and the exported JSON (1e-4 of the side: far below a
#: pixel of any image up to 8192 px, so a drawn box keeps its pixels).
BOX_DIGITS = 4
#: Seeds the page accepts: integers a browser holds exactly (the API and ``roi-ops generate`` take up to 2**64 - 1).
MAX_UI_SEED = 2**53 - 1
#: Denoising steps of one request (diffusers' schedulers have 1000 training timesteps).
MAX_STEPS = 1000
#: The defaults of ``roi-ops generate`` (its --guidance-scale, --beta and --scale), used by the API endpoint,
#: which takes only prompt, layout, seed and steps, and shown first on the page.
DEFAULT_GUIDANCE_SCALE = 7.5
DEFAULT_BETA = 1.0
DEFAULT_SCALE = 1.0
DEFAULT_STEPS = 30


@dataclass(frozen=True)
class Request:
    """One checked generation: what :meth:`roi_ops.ui.engine.Engine.generate` runs."""

    prompt: str
    negative_prompt: str | None
    instances: tuple[Instance, ...]  # boxes normalised xyxy, inside the image
    height: int
    width: int
    seed: int
    steps: int
    guidance_scale: float
    beta: float
    scale: float


def instance_json(instance: Instance) -> dict[str, Any]:
    """A checked instance (normalised xyxy box) as the canvas and the layout file hold it: box rounded to
    :data:`BOX_DIGITS` digits. (The mask issue's mask is written here too.)"""
    return {"box": [round(float(v), BOX_DIGITS) for v in instance.box], "caption": instance.caption}


def canvas_value(layout: Mapping[str, Any], height: int, width: int) -> dict[str, Any]:
    """The canvas's value for a checked layout (``validate_layout``'s output, any box format and units): its size
    (the layout's, else ``height`` x ``width``) and its instances with normalised xyxy boxes."""
    height = layout.get("height") or height
    width = layout.get("width") or width
    instances = normalize_instances(layout["instances"], 1, width=width, height=height,
                                    box_format=layout["box_format"], box_units=layout["box_units"])[0]
    return {"width": width, "height": height,
            "instances": [instance_json(inst) for inst in instances]}


def layout_from_canvas(prompt: Any, negative_prompt: Any, canvas: Any, require_prompt: bool = True) -> dict[str, Any]:
    """The layout JSON object (as ``roi-ops generate --layout`` reads it) of the page's prompt, negative prompt and
    canvas value, checked: raises ``ValueError`` naming what is wrong (``instances[1].caption must be a non-empty
    string, got ''``). An empty prompt (allowed unless ``require_prompt``) or negative prompt is left out."""
    if not isinstance(canvas, Mapping) or not isinstance(canvas.get("instances"), list):
        raise ValueError(f"the canvas must hold {{'width', 'height', 'instances': [...]}}, got {_short(canvas)}")
    unknown = sorted(set(canvas) - {"width", "height", "instances"})
    if unknown:
        raise ValueError(f"the canvas has unknown keys {unknown}; expected 'width', 'height', 'instances'")
    layout: dict[str, Any] = {}
    if prompt or require_prompt:
        layout["prompt"] = prompt
    if negative_prompt:
        layout["negative_prompt"] = negative_prompt
    layout.update(width=canvas.get("width"), height=canvas.get("height"), instances=canvas["instances"])
    checked = validate_layout(layout, require_prompt=require_prompt)
    for key in ("width", "height"):
        if checked[key] is None:
            raise ValueError(f"the canvas must give the image's {key} in pixels, got None")
    normalize_instances(checked["instances"], 1, width=checked["width"], height=checked["height"])
    layout["instances"] = [instance_json(i) for i in checked["instances"]]
    return layout


def layout_json(layout: Mapping[str, Any]) -> str:
    """The text of a layout file: one key per line and one instance per line, UTF-8 characters kept as they
    are."""
    def dumps(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    lines = [f"  {dumps(key)}: {dumps(value)}" for key, value in layout.items() if key != "instances"]
    if "instances" in layout:
        rows = ",\n".join(f"    {dumps(dict(instance))}" for instance in layout["instances"])
        lines.append(f'  "instances": [\n{rows}\n  ]' if rows else '  "instances": []')
    return "{\n" + ",\n".join(lines) + "\n}\n"


def import_layout(content: bytes | str, height: int, width: int) -> tuple[str, str, dict[str, Any]]:
    """A layout file's content (never a path) -> (prompt, negative prompt, canvas value); the file is checked as
    ``roi-ops generate`` checks it, its boxes against its size (else ``height`` x ``width``)."""
    if content is None:
        raise ValueError("no layout file was uploaded")
    layout = parse_layout(content, "the layout file")
    try:
        canvas = canvas_value(layout, height, width)
    except (ValueError, TypeError) as e:
        raise ValueError(f"the layout file: {e}") from None
    return layout.get("prompt") or "", layout.get("negative_prompt") or "", canvas


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _integer(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]``; a float with an integer value (what a browser's number field sends)
    is accepted."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) \
            and float(value).is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {_short(value)}")
    return value


def make_request(layout: Mapping[str, Any], *, prompt: Any = None, seed: Any, steps: Any,
                 guidance_scale: Any = DEFAULT_GUIDANCE_SCALE, beta: Any = DEFAULT_BETA,
                 scale: Any = DEFAULT_SCALE, height: int, width: int, vae_factor: int,
                 max_seed: int = MAX_SEED) -> Request:
    """Check everything one generation asks for and return it as a :class:`Request`; raises ``ValueError`` naming
    the field. ``layout`` is ``validate_layout``'s output; a non-empty ``prompt`` overrides its prompt (as
    ``--prompt`` does); the image is the layout's size, else ``height`` x ``width`` (the model's)."""
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {_short(prompt)}")
    text = prompt if prompt and prompt.strip() else layout.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("no prompt: give a prompt, or a non-empty \"prompt\" in the layout")
    validate_layout({"prompt": text})  # its length
    height = layout.get("height") or height
    width = layout.get("width") or width
    check_image_size(height, width, vae_factor, where="layout: ")
    instances = normalize_instances(layout["instances"], 1, width=width, height=height,
                                    box_format=layout["box_format"], box_units=layout["box_units"])[0]
    seed = _integer("seed", seed, 0, max_seed)
    steps = _integer("steps", steps, 1, MAX_STEPS)
    check_scales(guidance_scale, scale, beta, names=("guidance", "scale", "beta"))
    return Request(prompt=text, negative_prompt=layout.get("negative_prompt") or None, instances=tuple(instances),
                   height=height, width=width, seed=seed, steps=steps, guidance_scale=float(guidance_scale),
                   beta=float(beta), scale=float(scale))
