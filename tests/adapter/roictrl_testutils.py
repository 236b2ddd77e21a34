"""Builders shared by the ROICtrl adapter tests: tiny random-weight diffusers models made from configs (no download)."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from roi_ops.roictrl_adapter import ROICtrlAdapter

SD15 = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
# SDXL's structure in miniature: no attention at the top level, several transformer layers per block,
# linear projections, a per-level head count and the added text/time embedding.
SDXL = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=24, attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 2, 2),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24 + 6 * 8, norm_num_groups=8,
)
CONFIGS = {"sd15": SD15, "sdxl": SDXL}
# Small crops keep the suite fast; the default grid sizes get their own test.
GRIDS = {"sd15": {8: 6, 16: 4}, "sdxl": {16: 5, 32: 3}}


def make_unet(kind: str, seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**CONFIGS[kind])
    return unet.requires_grad_(False).eval()


def make_adapter(unet, kind: str, seed: int = 1, randomize: bool = True, **kwargs) -> ROICtrlAdapter:
    torch.manual_seed(seed)
    kwargs.setdefault("grid_sizes", GRIDS[kind])
    adapter = ROICtrlAdapter.from_unet(unet, position_dim=16, position_hidden_dim=16, **kwargs)
    if randomize:
        randomize_(adapter, seed)
    return adapter


def randomize_(adapter: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (gates and the zero-initialised blend projection included) a random non-zero value,
    so that the tests hold for any adapter weights, not only the fresh ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter.named_parameters():
            if p.dim() == 0:  # tanh gates: well away from 0, either sign
                sign = 1.0 if torch.rand((), generator=g) > 0.5 else -1.0
                p.fill_(sign * (0.5 + float(torch.rand((), generator=g))))
            elif "blend_proj" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return adapter


def unet_inputs(kind: str, batch: int = 2, size: tuple[int, int] = (16, 12), seed: int = 2):
    """(sample, timestep, encoder_hidden_states, extra kwargs) for a tiny UNet of ``kind``."""
    g = torch.Generator().manual_seed(seed)
    cfg = CONFIGS[kind]
    D = cfg["cross_attention_dim"]
    sample = torch.randn(batch, 4, *size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    text = torch.randn(batch, 7, D, generator=g)
    extra = {}
    if kind == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, D, generator=g), "time_ids": torch.randn(batch, 6, generator=g)}
    return sample, t, text, extra


def make_instances(batch: int, n: int, dim: int, masks=None, seed: int = 3, length: int = 5) -> dict:
    """Random boxes (well inside the image, at least 20% a side) and caption embeddings."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(batch, n, 2, generator=g) * 0.5
    size = 0.2 + torch.rand(batch, n, 2, generator=g) * 0.3
    boxes = torch.cat([lo, lo + size], dim=-1)
    data = {"boxes": boxes, "embeddings": torch.randn(batch, n, length, dim, generator=g)}
    if masks is not None:
        data["masks"] = torch.as_tensor(masks)
    return data
