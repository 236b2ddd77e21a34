"""GLIGEN with the localisation given: a diagnostic, not GLIGEN (``train.py --gligen-oracle-box-mask``).

GLIGEN must *learn* which box token a visual token should attend to (its fuser is a plain self-attention over
[visual tokens; box tokens]). This variant removes that part of the problem: in every fuser a visual token may
attend to every visual token but only to the box tokens whose box holds its pixel centre (an additive -1e4 on
the other box keys), the attention masking of InstanceDiffusion-style methods and of ROICtrl's "Mask-Attn"
ablation. Everything else (position net, fuser layers, gates, frozen base, data, recipe) is GLIGEN's. If this
variant controls the layout where GLIGEN does not, what GLIGEN lacks on this toy is the localisation, not the
value path (phrase -> colour in the frozen UNet).

The boxes reach the fusers through a forward pre-hook on the UNet that reads ``cross_attention_kwargs["gligen"]``
(what ``train.py`` and ``StableDiffusionGLIGENPipeline`` pass); the map size through the hook of
``gligen_positions``. :func:`save_config` / :func:`install_from_folder` record it next to the weights, so
``train.load_gligen_unet`` (and ``evaluate.load_pipelines``) rebuild it.
"""

from __future__ import annotations

import json
import os
import types

import torch
from diffusers.models.attention import GatedSelfAttentionDense
from diffusers.models.transformers.transformer_2d import Transformer2DModel

CONFIG_NAME = "gligen_oracle_box_mask.json"
MASKED = 1e4  # the oracle's strength: exp(-1e4) is 0 in float32


def inside(hw, boxes, masks):
    """[B, H*W, N] bool: whether each pixel centre (row-major) lies in each real box (``masks`` > 0)."""
    h, w = hw
    ys = (torch.arange(h, device=boxes.device, dtype=boxes.dtype) + 0.5) / h
    xs = (torch.arange(w, device=boxes.device, dtype=boxes.dtype) + 0.5) / w
    y, x = (t.reshape(-1) for t in torch.meshgrid(ys, xs, indexing="ij"))
    b = boxes[:, None]
    return ((x[None, :, None] >= b[..., 0]) & (x[None, :, None] < b[..., 2]) & (y[None, :, None] >= b[..., 1])
            & (y[None, :, None] < b[..., 3]) & (masks[:, None, :] > 0))


def _oracle_forward(self, x: torch.Tensor, objs: torch.Tensor) -> torch.Tensor:
    """``GatedSelfAttentionDense.forward`` (with the pixel positions of ``gligen_positions`` when installed) with
    ``-oracle_strength`` added to the attention logits of every visual token on the box tokens outside its box."""
    from .gligen_positions import has_pixel_positions, pixel_fourier_embedding

    if not self.enabled:
        return x
    n_visual, n_obj = x.shape[1], objs.shape[1]
    hw = self.pixel_grid_hw
    if hw is None or hw[0] * hw[1] != n_visual:
        raise RuntimeError(f"the fuser got {n_visual} visual tokens but its map size is {hw} (gligen_oracle.install)")
    visual = x
    if has_pixel_positions(self):
        pos = pixel_fourier_embedding(*hw, self.pixel_position_freqs, dtype=x.dtype, device=x.device)
        visual = x + self.pixel_position_proj(pos)[None]
    bias = None
    if self.oracle_strength:
        boxes, masks = self.oracle_boxes, self.oracle_masks
        if boxes is None:
            raise RuntimeError("the box-masked fuser needs the UNet's gligen boxes (gligen_oracle.install's hook)")
        if boxes.shape[0] != x.shape[0]:  # classifier-free guidance may batch [uncond; cond]: boxes repeat
            boxes = boxes.repeat(x.shape[0] // boxes.shape[0], 1, 1)
            masks = masks.repeat(x.shape[0] // masks.shape[0], 1)
        bias = torch.zeros(x.shape[0], n_visual + n_obj, n_visual + n_obj, dtype=x.dtype, device=x.device)
        bias[:, :n_visual, n_visual:] = (~inside(hw, boxes, masks)).to(x.dtype) * -self.oracle_strength
    objs = self.linear(objs)
    x = x + self.alpha_attn.tanh() * self.attn(self.norm1(torch.cat([visual, objs], dim=1)),
                                               attention_mask=bias)[:, :n_visual, :]
    x = x + self.alpha_dense.tanh() * self.ff(self.norm2(x))
    return x


def install(unet, strength: float = MASKED) -> list:
    """Mask every fuser of the GLIGEN ``unet`` to its pixels' boxes with ``strength`` (adds no parameters; keeps
    the pixel positions of ``gligen_positions`` when they are installed first). Returns the fusers, whose
    ``oracle_strength`` :func:`set_strength` changes (0: no mask, the plain fuser)."""
    from . import gligen_positions

    fusers = [m for m in unet.modules() if isinstance(m, GatedSelfAttentionDense)]
    if not fusers:
        raise ValueError("gligen_oracle.install needs a GLIGEN UNet (attention_type='gated'); found no fuser")
    if any(hasattr(f, "oracle_strength") for f in fusers):
        raise RuntimeError("gligen_oracle.install: this UNet has the box mask already")
    positions = any(gligen_positions.has_pixel_positions(f) for f in fusers)  # its hook records the map size
    for f in fusers:
        f.oracle_boxes = f.oracle_masks = None
        f.oracle_strength = float(strength)
        if not positions:
            f.pixel_grid_hw = None
        f.forward = types.MethodType(_oracle_forward, f)
    if not positions:
        for transformer in unet.modules():
            mine = [m for m in transformer.modules() if m in fusers] if isinstance(transformer, Transformer2DModel) else []
            if mine:
                transformer.register_forward_pre_hook(gligen_positions._record_map_size(mine), with_kwargs=True)

    def record_boxes(module, args, kwargs):
        g = (kwargs.get("cross_attention_kwargs") or {}).get("gligen")
        if g is not None:
            for f in fusers:
                f.oracle_boxes, f.oracle_masks = g["boxes"], g["masks"]

    unet.register_forward_pre_hook(record_boxes, with_kwargs=True)
    return fusers


def set_strength(fusers, strength: float) -> None:
    for f in fusers:
        f.oracle_strength = float(strength)


def strength_at(step: int, full_steps: int, end_step: int, start: float) -> float:
    """The box-mask curriculum: ``start`` for the first ``full_steps`` steps, then linearly down to 0 at
    ``end_step`` (0 after it: the fuser is GLIGEN's own)."""
    if step < full_steps:
        return start
    if step >= end_step:
        return 0.0
    return start * (end_step - step) / (end_step - full_steps)


def save_config(folder: str, strength: float = MASKED) -> None:
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump({"variant": "gligen with box-masked fuser attention (diagnostic; not GLIGEN)",
                   "strength": strength, "module": __name__}, f, indent=2)


def install_from_folder(unet, folder: str) -> bool:
    """:func:`install` with the strength recorded in ``folder``; False (no mask) when it records none."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        strength = json.load(f).get("strength", MASKED)
    if not isinstance(strength, (int, float)) or strength < 0:
        raise ValueError(f"{path}: strength must be a number >= 0, got {strength!r}")
    install(unet, strength)
    return True
