"""A GLIGEN UNet on the toy model's config (random weights) with its gates opened, for the GLIGEN variant tests."""

from __future__ import annotations

import torch

from instance_control import gligen_positions, models


def tiny_gligen(pixel_positions: bool = False):
    """The GLIGEN UNet of ``models.gligen_unet_from_base`` (seed 0) with every gate at 0.5, so the fusers' outputs
    matter; ``pixel_positions``: with ``gligen_positions.install(init="random")`` (seed 1)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    gligen, _ = models.gligen_unet_from_base(UNet2DConditionModel(**models.unet_config()))
    with torch.no_grad():
        for n, p in gligen.named_parameters():
            if n.endswith(("alpha_attn", "alpha_dense")):
                p.fill_(0.5)
    if pixel_positions:
        torch.manual_seed(1)
        gligen_positions.install(gligen, init="random")
    return gligen.eval()
