"""GLIGEN + pixel positions: a toy remedy, a deviation from GLIGEN (``train.py --gligen-pixel-positions``).

GLIGEN's grounding path is a gated self-attention (diffusers' ``GatedSelfAttentionDense``, the ``fuser`` of
every transformer block) over [visual tokens; box tokens]. The box tokens carry their boxes (a Fourier embedding
of x1, y1, x2, y2), but the visual tokens carry only the frozen UNet's features, so a visual token can find "its"
box only if those features encode where the token is. Stable Diffusion's deep UNet's do; this toy base's hardly
do (``position_probe.py``: ridge R^2 0.10-0.44 on the 16x16 maps, negative in their interior).

This variant gives the visual tokens what SD's features have: each fuser gets a fixed 2D Fourier embedding of
its visual tokens' pixel centres ``((j + 0.5) / W, (i + 0.5) / H)`` in [0, 1] (the frequency family GLIGEN uses
for its boxes, :func:`pixel_fourier_embedding`), projected by a new linear layer ``pixel_position_proj``
(zero-initialised) and added to the visual tokens **inside the gated self-attention only**::

    v = x + pixel_position_proj(fourier(pixel centres))
    x = x + tanh(alpha_attn) * attn(norm1([v; linear(objs)]))[:, :n_visual]
    x = x + tanh(alpha_dense) * ff(norm2(x))

so the UNet's residual stream never sees the embedding, the base stays frozen, and with the projection at zero
the fuser is exactly diffusers' (the test checks it). Everything else trains as GLIGEN does.

The fuser sees its tokens flattened (``[B, H*W, C]``); a forward pre-hook on each ``Transformer2DModel`` that
holds fusers records the map's ``(H, W)`` for them. :func:`install` adds the layers to a GLIGEN UNet;
:func:`save_config` / :func:`install_from_folder` record the variant next to the weights, so
``evaluate.load_pipelines(ckpt, ("gligen", ...))`` rebuilds it from the checkpoint folder by itself.
"""

from __future__ import annotations

import json
import math
import os
import types

import torch
from diffusers.models.attention import GatedSelfAttentionDense
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

CONFIG_NAME = "gligen_pixel_positions.json"
FOURIER_FREQS = 8  # as GLIGENTextBoundingboxProjection's fourier_freqs
PROJ = "pixel_position_proj"


def pixel_fourier_embedding(height: int, width: int, freqs: int = FOURIER_FREQS, dtype=torch.float32,
                            device=None) -> torch.Tensor:
    """[height * width, 4 * freqs]: for each pixel (row-major, as the transformer blocks flatten the map), the
    sin and cos of ``100 ** (k / freqs) * c`` for k < freqs and c the pixel centre's x and y in [0, 1]: the
    formula of diffusers' ``get_fourier_embeds_from_boundingbox`` applied to (x, y) instead of a box."""
    if height < 1 or width < 1 or freqs < 1:
        raise ValueError(f"height, width and freqs must be >= 1, got {height}, {width}, {freqs}")
    ys = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    xs = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    coords = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(height * width, 2)  # (x, y)
    emb = coords[:, None, :] * (100 ** (torch.arange(freqs, dtype=torch.float64) / freqs))[None, :, None]
    emb = torch.stack((emb.sin(), emb.cos()), dim=-1)  # [HW, freqs, 2 coords, sin/cos]
    return emb.reshape(height * width, 4 * freqs).to(device=device, dtype=dtype)


def _pixel_position_forward(self, x: torch.Tensor, objs: torch.Tensor) -> torch.Tensor:
    """``GatedSelfAttentionDense.forward`` with the pixel-position embedding added to the attention's visual
    tokens (the residual ``x`` is left as it is). :func:`install` binds it to each fuser instance, whose class
    stays diffusers' ``GatedSelfAttentionDense``: ``StableDiffusionGLIGENPipeline.enable_fuser`` (scheduled
    sampling) matches ``type(module) is GatedSelfAttentionDense`` and still switches these fusers."""
    if not self.enabled:
        return x
    n_visual = x.shape[1]
    hw = self.pixel_grid_hw
    if hw is None or hw[0] * hw[1] != n_visual:
        raise RuntimeError(f"the pixel-position fuser got {n_visual} visual tokens but its map size is {hw}: it "
                           f"must run inside the Transformer2DModel that gligen_positions.install hooked")
    pos = pixel_fourier_embedding(*hw, self.pixel_position_freqs, dtype=x.dtype, device=x.device)
    visual = x + self.pixel_position_proj(pos)[None]
    objs = self.linear(objs)
    x = x + self.alpha_attn.tanh() * self.attn(self.norm1(torch.cat([visual, objs], dim=1)))[:, :n_visual, :]
    x = x + self.alpha_dense.tanh() * self.ff(self.norm2(x))
    return x


def has_pixel_positions(module) -> bool:
    """Whether ``module`` is a fuser that :func:`install` gave pixel positions."""
    return isinstance(module, GatedSelfAttentionDense) and hasattr(module, PROJ)


def _record_map_size(fusers):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.dim() != 4:
            raise RuntimeError(f"expected the transformer's input as [B, C, H, W], got shape {tuple(hidden.shape)}")
        for f in fusers:
            f.pixel_grid_hw = tuple(hidden.shape[-2:])
    return hook


def install(unet, freqs: int = FOURIER_FREQS, init: str = "zero") -> set[str]:
    """Give every fuser of the GLIGEN ``unet`` (``attention_type="gated"``) a ``pixel_position_proj``
    (``Linear(4 * freqs, dim)``) and the forward :func:`_pixel_position_forward`. ``init="zero"``: the projection
    starts at zero (the fuser is diffusers' exactly); ``"random"``: PyTorch's default ``Linear`` init (from the
    global RNG), so the fuser's queries know their pixel from the first step (the UNet's output is still
    diffusers' while the gates are at 0). Returns the new parameters' names (to train and save with GLIGEN's own
    new layers)."""
    if freqs < 1:
        raise ValueError(f"freqs must be >= 1, got {freqs}")
    if init not in ("zero", "random"):
        raise ValueError(f"init must be 'zero' or 'random', got {init!r}")
    installed = 0
    for transformer in unet.modules():
        if not isinstance(transformer, Transformer2DModel):
            continue
        fusers = [m for m in transformer.modules() if isinstance(m, GatedSelfAttentionDense)]
        for f in fusers:
            if has_pixel_positions(f):
                raise RuntimeError("gligen_positions.install: this UNet has pixel positions already")
            proj = nn.Linear(4 * freqs, f.linear.out_features).to(f.linear.weight.dtype)
            if init == "zero":  # starts as plain GLIGEN; the gradient opens it with the gates
                nn.init.zeros_(proj.weight)
                nn.init.zeros_(proj.bias)
            f.add_module(PROJ, proj)
            f.pixel_position_freqs = freqs
            f.pixel_grid_hw = None
            f.forward = types.MethodType(_pixel_position_forward, f)
            installed += 1
        if fusers:
            transformer.register_forward_pre_hook(_record_map_size(fusers), with_kwargs=True)
    if not installed:
        raise ValueError("gligen_positions.install needs a GLIGEN UNet (attention_type='gated'); found no fuser")
    return {n for n, _ in unet.named_parameters() if f".{PROJ}." in n}


def save_config(folder: str, freqs: int = FOURIER_FREQS) -> None:
    """Record the variant next to GLIGEN's weights (what :func:`install_from_folder` reads)."""
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump({"variant": "gligen + pixel positions (toy remedy; not in the GLIGEN paper)",
                   "fourier_freqs": freqs, "module": __name__}, f, indent=2)


def install_from_folder(unet, folder: str) -> set[str]:
    """:func:`install` with the settings recorded in ``folder``, or nothing (plain GLIGEN) when it has none."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        freqs = json.load(f).get("fourier_freqs")
    if not isinstance(freqs, int) or freqs < 1:
        raise ValueError(f"{path}: fourier_freqs must be a positive integer, got {freqs!r}")
    return install(unet, freqs)


def max_projection_norm(unet) -> float:
    """The largest Frobenius norm of a fuser's ``pixel_position_proj`` weight (0 at initialisation)."""
    norms = [m.weight.detach().norm().item() for n, m in unet.named_modules() if n.endswith(PROJ)]
    return max(norms) if norms else math.nan
