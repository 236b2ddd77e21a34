"""The frozen model of ``roi-ops train`` (a diffusers SD1.x/SD2.x/SDXL folder) and the adapter architecture it
implies.

:func:`model_geometry` reads only the config files (no weights), so every size problem (no UNet, a resolution
the VAE cannot take) is reported before anything heavy is loaded. :func:`adapter_defaults` turns the geometry
into ``ROICtrlAdapter.from_unet`` arguments:

* ``vae_scale_factor`` = ``2 ** (len(vae.block_out_channels) - 1)`` (8 for SD1.x/SDXL, 2 for the toy model);
* the ROI grid of each cross-attention level: the paper's grids are a function of the feature map's side ``m``
  (25/19/13/7 on the 64/32/16/8 maps of SD1.5 at 512 px, i.e. ``6 log2(m) - 11``), capped at
  ``ceil(m / 2)``: a ROI grid finer than a box half the map wide resamples the same pixels; and at least
  ``min(m, 2)`` (the formula falls under 2 on maps under 8 wide). SD1.5 at 512 px:
  ``{8: 25, 16: 16, 32: 8, 64: 4}``; SDXL at 1024 px: ``{16: 25, 32: 16}`` (its cross-attention levels); the 32 px toy: ``{2: 8, 4: 4}``;
* ``position_dim`` = the caption width (the UNet's ``cross_attention_dim``), at most 768;
  ``position_hidden_dim`` = ``min(512, 2 * position_dim)`` (512 as the adapter's default for SD-sized models).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

__all__ = ["ModelError", "Geometry", "model_geometry", "adapter_defaults", "grid_for_map", "FrozenModel",
           "load_frozen_model"]


class ModelError(ValueError):
    """The model folder cannot be trained on (missing parts, sizes it cannot take)."""


@dataclass(frozen=True)
class Geometry:
    vae_scale_factor: int
    unet_levels: int  # number of 2x downsamplings inside the UNet
    cross_attention_dim: int
    sample_size: int  # the UNet's default latent side
    attention_levels: tuple[int, ...]  # levels (0 = latent size) that hold cross-attention
    sdxl: bool

    @property
    def multiple(self) -> int:
        """Image sides must be multiples of this (the VAE factor x the UNet's downsampling)."""
        return self.vae_scale_factor * 2 ** self.unet_levels

    @property
    def default_resolution(self) -> int:
        return self.sample_size * self.vae_scale_factor


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ModelError(f"{what}: no {path}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{what}: {path} is not a readable JSON file ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{what}: {path} does not hold a JSON object")
    return cfg


def model_geometry(model_dir: str) -> Geometry:
    """Sizes of the diffusers folder ``model_dir`` from its ``unet/``, ``vae/`` and ``model_index.json`` configs."""
    if not os.path.isdir(model_dir):
        raise ModelError(f"--model {model_dir!r}: no such folder (a diffusers folder with unet/, vae/, "
                         "text_encoder/, tokenizer/, scheduler/)")
    if not os.path.isfile(os.path.join(model_dir, "unet", "config.json")):
        raise ModelError(f"--model {model_dir!r} has no UNet (no unet/config.json); expected a diffusers "
                         "Stable Diffusion / SDXL folder")
    unet = _read_json(os.path.join(model_dir, "unet", "config.json"), "--model unet")
    vae = _read_json(os.path.join(model_dir, "vae", "config.json"), "--model vae")
    try:
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        downs = list(unet["down_block_types"])
        cross = unet["cross_attention_dim"]
        sample = unet.get("sample_size") or 64
    except (KeyError, TypeError) as e:
        raise ModelError(f"--model {model_dir!r}: unet/vae config lacks {e}") from None
    if isinstance(cross, (list, tuple)):
        cross = cross[0]
    if isinstance(sample, (list, tuple)):
        sample = sample[0]
    levels = tuple(i for i, t in enumerate(downs) if "CrossAttn" in t)
    sdxl = unet.get("addition_embed_type") == "text_time"
    return Geometry(factor, len(downs) - 1, int(cross), int(sample), levels, sdxl)


def grid_for_map(m: int) -> int:
    """ROI grid side for a feature map of side ``m`` (see the module docstring)."""
    paper = round(6 * math.log2(max(m, 1)) - 11)
    return max(min(paper, math.ceil(m / 2)), min(m, 2))


def adapter_defaults(geometry: Geometry, resolution: int) -> dict[str, Any]:
    """``ROICtrlAdapter.from_unet`` keyword arguments for this model trained at ``resolution`` px."""
    f = geometry.vae_scale_factor
    grids = {}
    for level in range(geometry.unet_levels + 1):  # every level (the mid block sits at the last)
        factor = f * 2 ** level
        grids[factor] = grid_for_map(max(1, resolution // factor))
    position_dim = min(geometry.cross_attention_dim, 768)
    return {"grid_sizes": grids, "vae_scale_factor": f, "position_dim": position_dim,
            "position_hidden_dim": min(512, 2 * position_dim)}


@dataclass
class FrozenModel:
    """The frozen parts: the diffusers pipeline (its encoders, for training and validation), the training noise
    scheduler and the geometry."""

    pipe: Any
    noise_scheduler: Any
    geometry: Geometry

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae


def load_frozen_model(model_dir: str, dtype=None) -> FrozenModel:
    """The pipeline of ``model_dir`` (local files only; no safety checker) and a ``DDPMScheduler`` with the
    folder's noise schedule. Every module frozen and in eval mode."""
    import torch
    from diffusers import DDPMScheduler, DiffusionPipeline

    geometry = model_geometry(model_dir)
    index = _read_json(os.path.join(model_dir, "model_index.json"), "--model")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        pipe = DiffusionPipeline.from_pretrained(model_dir, **kwargs)
        noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler", local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelError(f"--model {model_dir!r} cannot be loaded as a diffusers pipeline: {e}") from None
    for name in ("unet", "vae", "encode_prompt"):
        if getattr(pipe, name, None) is None:
            raise ModelError(f"--model {model_dir!r} loads as {type(pipe).__name__}, which has no {name}")
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    return FrozenModel(pipe, noise_scheduler, geometry)
