"""The official release's architecture: the option values and constructor arguments of its adapter.

``ROICtrlAdapter.from_unet(unet, preset="official")`` builds it (``**OFFICIAL_CONFIG`` is the same).
"""

from __future__ import annotations

from typing import Any

from ..options import ArchitectureOptions

__all__ = ["OFFICIAL_CONFIG", "OFFICIAL_OPTIONS"]

#: The official release's block (showlab/ROICtrl, ``ROICtrl_sdv14_30K``).
OFFICIAL_OPTIONS = ArchitectureOptions(
    ff_activation="geglu",
    fourier_embedding="gligen",
    position_padding="null_token",
    channel_gate=True,
    max_instances=30,
    slot_order="identity",
    sampling_ratio=2,
    guide_empty_samples=True,
    dropout=0.2,
    unpool="official",
)

#: Constructor arguments of ``ROICtrlAdapter`` (besides ``blocks``) for the official architecture:
#: ``ROICtrlAdapter.from_unet(unet, **OFFICIAL_CONFIG)`` or ``from_unet(unet, preset="official")``.
OFFICIAL_CONFIG: dict[str, Any] = {
    "position_dim": 64,
    "fourier_freqs": 8,
    "position_hidden_dim": 512,
    "ff_mult": 4,
    **OFFICIAL_OPTIONS.to_dict(),
}
