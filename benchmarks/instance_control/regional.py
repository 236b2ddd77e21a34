"""A training-free regional baseline, as users run one today: masked cross-attention per region.

Regional prompting (the "regional prompter" extensions, diffusers' community regional-prompting pipeline, the
training-free part of MultiDiffusion-style methods) needs no training: in every cross-attention layer of the
UNet, the pixels inside a region's box attend to that region's caption, the other pixels to the global prompt.
Here that is a diffusers attention processor on every ``attn2`` (cross-attention) of the unchanged base UNet:

* every pixel first gets the layer's usual output with the global caption;
* for each region, the same layer (same weights) runs on the region's caption, and the pixels whose centres
  fall inside the region's box take that output instead; where boxes overlap, the covering regions' outputs
  are averaged;
* only the conditional half of a classifier-free-guidance batch is regional; the unconditional half keeps
  the empty prompt everywhere (what the regional pipelines do with the negative prompt).

:func:`regional_sampler` returns the same kind of callable as ``evaluate.load_pipelines`` (layout, generators,
sampling keywords -> images), so the method is sampled and scored exactly as the others.
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.models.attention_processor import AttnProcessor2_0


def box_masks(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bool ``[N, height*width]``: the pixels of a ``height x width`` map whose centres lie in each normalised
    ``(x1, y1, x2, y2)`` box of ``boxes`` ``[N, 4]``."""
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be [N, 4] (x1, y1, x2, y2) in [0, 1], got shape {tuple(boxes.shape)}")
    ys = (torch.arange(height, dtype=boxes.dtype) + 0.5) / height
    xs = (torch.arange(width, dtype=boxes.dtype) + 0.5) / width
    inx = (xs[None] >= boxes[:, 0:1]) & (xs[None] <= boxes[:, 2:3])  # [N, W]
    iny = (ys[None] >= boxes[:, 1:2]) & (ys[None] <= boxes[:, 3:4])  # [N, H]
    return (iny[:, :, None] & inx[:, None, :]).reshape(len(boxes), height * width)


class RegionalCrossAttnProcessor:
    """The processor of one cross-attention layer: global caption everywhere, each region's caption inside its
    box (see the module docstring). ``regions`` holds the per-call state shared by every layer."""

    def __init__(self, regions: "RegionalPrompts"):
        self.regions = regions
        self.plain = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        out = self.plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        states, boxes = self.regions.states, self.regions.boxes
        if states is None or encoder_hidden_states is None:
            return out
        B, T, _ = hidden_states.shape
        side = int(round(T**0.5))
        if side * side != T:
            raise ValueError(f"regional attention needs a square latent map, got {T} tokens")
        masks = box_masks(boxes, side, side).to(out.device)  # [N, T]
        cond = slice(B // 2, B) if self.regions.cfg else slice(0, B)
        q = hidden_states[cond]
        acc = torch.zeros_like(out[cond])
        count = torch.zeros(T, 1, dtype=out.dtype, device=out.device)
        for k in range(len(boxes)):  # one region's caption for every pixel, kept inside its box
            ctx = states[k: k + 1].expand(q.shape[0], -1, -1).to(q.dtype)
            region_out = self.plain(attn, q, ctx, None, temb)
            m = masks[k].to(out.dtype)[:, None]
            acc += region_out * m
            count += m
        covered = count > 0
        out[cond] = torch.where(covered, acc / count.clamp(min=1), out[cond])
        return out


class RegionalPrompts:
    """The regions of the current call (caption states ``[N, L, D]``, boxes ``[N, 4]``), read by every layer's
    processor, and whether the batch holds a classifier-free-guidance unconditional half first."""

    def __init__(self):
        self.states: torch.Tensor | None = None
        self.boxes: torch.Tensor | None = None
        self.cfg = True

    @contextlib.contextmanager
    def active(self, unet, states: torch.Tensor, boxes: torch.Tensor, cfg: bool):
        """Install the regional processor on every ``attn2`` of ``unet`` for the duration of the block, then
        restore the UNet's own processors (the base pipeline stays unchanged for the other methods)."""
        saved = unet.attn_processors
        processor = RegionalCrossAttnProcessor(self)
        unet.set_attn_processor({name: processor if name.endswith("attn2.processor") else p
                                 for name, p in saved.items()})
        self.states, self.boxes, self.cfg = states, boxes, cfg
        try:
            yield
        finally:
            self.states = self.boxes = None
            unet.set_attn_processor(saved)


def regional_sampler(base):
    """A callable ``(layout, generators, **sampling) -> float [n, 3, R, R] in [0, 1]`` sampling ``base`` (a
    ``StableDiffusionPipeline``) with regional cross-attention for the layout's instances."""
    import numpy as np

    from . import models

    regions = RegionalPrompts()

    def sample(layout, gens, **kw):
        captions = [inst.caption for inst in layout.instances]
        states, _ = models.encode_text(base.text_encoder, base.tokenizer, captions, device=base.device)
        boxes = torch.tensor([list(inst.box) for inst in layout.instances], dtype=torch.float32)
        with regions.active(base.unet, states, boxes, cfg=kw.get("guidance_scale", 7.5) > 1.0):
            images = base(layout.caption, num_images_per_prompt=len(gens), generator=gens, output_type="np",
                          **kw).images
        return np.asarray(images, np.float32).transpose(0, 3, 1, 2)

    return sample
