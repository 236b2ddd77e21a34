"""The model behind ``roi-ops ui``: loaded once, one generation at a time, and the pictures the page shows.

The ROICtrl pipeline is not re-entrant (a second call while one runs raises), so :meth:`Engine.generate` holds a
lock around the call; the app's queue already runs one request at a time, the lock keeps that true for any
other caller of the engine.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from roi_ops.roictrl_adapter.generate import BOX_COLORS, draw_boxes

from .layouts import Request

#: The longest side, in pixels, the page shows an image or a blend map at (smaller images are scaled up by a
#: whole factor with nearest-neighbour sampling, so each pixel stays a sharp square).
DISPLAY_SIDE = 384


@dataclass
class Result:
    """One generation: the image and, per instance, its blend map (``Tensor[n, H, W]``, see docs/pipeline.md)."""

    image: Any  # PIL.Image, the pipeline's size
    blend_maps: torch.Tensor
    request: Request
    seconds: float


class Engine:
    """A :class:`~roi_ops.roictrl_adapter.pipeline.ROICtrlPipeline` with the size of its images and a lock."""

    def __init__(self, roictrl, device: str | torch.device = "cpu"):
        self.roictrl = roictrl
        self.device = torch.device(device)
        pipe = roictrl.pipe
        self.vae_factor = int(pipe.vae_scale_factor)
        sample = pipe.unet.config.sample_size
        sample = (sample, sample) if isinstance(sample, int) else tuple(sample)
        #: The model's default image size (what a layout without width/height gets), as (height, width).
        self.height, self.width = (int(s) * self.vae_factor for s in sample)
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model: str, adapter: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "Engine":
        """Load the diffusers folder ``model`` and the adapter ``adapter`` (folder or official file), as
        ``roi-ops generate`` does."""
        from roi_ops.roictrl_adapter import load_adapter
        from roi_ops.roictrl_adapter.generate import load_pipeline
        from roi_ops.roictrl_adapter.pipeline import ROICtrlPipeline

        pipe = load_pipeline(model, None, device, dtype)
        pipe.set_progress_bar_config(disable=True)  # the page shows the progress
        return cls(ROICtrlPipeline.from_pipe(pipe, load_adapter(adapter, pipe.unet)), device)

    def generate(self, request: Request, on_step: Callable[[int, int], None] | None = None) -> Result:
        """Run one checked request; ``on_step(done, total)`` after each denoising step."""
        import time

        def step_end(pipe, step, timestep, kwargs):
            if on_step is not None:
                on_step(step + 1, request.steps)
            return kwargs

        with self._lock:
            start = time.perf_counter()
            out = self.roictrl(
                request.prompt, instances=[list(request.instances)], negative_prompt=request.negative_prompt,
                num_inference_steps=request.steps, guidance_scale=request.guidance_scale,
                height=request.height, width=request.width,
                generator=torch.Generator(self.device).manual_seed(request.seed),
                roictrl_scheduled_sampling_beta=request.beta, roictrl_scale=request.scale,
                return_blend_maps=True, callback_on_step_end=step_end,
            )
            seconds = time.perf_counter() - start
        return Result(out.images[0], out.blend_maps[0], request, seconds)


def display_factor(height: int, width: int) -> int:
    """The whole factor that scales a ``height`` x ``width`` image up to about :data:`DISPLAY_SIDE` (1 for
    images that large already)."""
    return max(1, math.floor(DISPLAY_SIDE / max(height, width)))


def _scaled(image, factor: int):
    from PIL import Image

    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def boxes_overlay(result: Result):
    """The image scaled up for display with every box and caption drawn on it (``roi-ops generate``'s
    ``.boxes.png``, at display size so the captions stay legible)."""
    factor = display_factor(result.image.height, result.image.width)
    return draw_boxes(_scaled(result.image, factor), list(result.request.instances))


def blend_map_images(result: Result) -> list[tuple[Any, str]]:
    """Per instance, its blend map as a picture in its box colour (black = weight 0, the full colour = weight 1),
    captioned ``k: caption (max w)``; last, the global output's share ``1 - sum``. Scaled up for display."""
    from PIL import Image

    maps = result.blend_maps.float().clamp(0, 1)
    factor = display_factor(result.image.height, result.image.width)
    shown = [(m, BOX_COLORS[k % len(BOX_COLORS)], f"{k}: {inst.caption}")
             for k, (m, inst) in enumerate(zip(maps, result.request.instances))]
    shown.append(((1 - maps.sum(0)).clamp(0, 1), (255, 255, 255), "global (1 - sum)"))
    out = []
    for weight, color, label in shown:
        rgb = (weight[..., None] * torch.tensor(color, dtype=torch.float32)).round().to(torch.uint8)
        image = Image.fromarray(rgb.numpy(), "RGB")
        out.append((_scaled(image, factor), f"{label} (max {float(weight.max()):.2f})"))
    return out
