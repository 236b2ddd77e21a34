"""The official ROICtrl release (showlab/ROICtrl, ``ROICtrl_sdv14_30K``) in one room: everything roi-ops knows of it.

* :mod:`.preset`: its architecture, :data:`OFFICIAL_OPTIONS` / :data:`OFFICIAL_CONFIG` (``preset="official"``);
* :mod:`.unpool`: its quantised ROI-Unpool, :func:`roi_unpool_quantized` (the ``unpool="official"`` paste rule);
* :mod:`.weights`: its file and key names (:func:`is_official_checkpoint`, :func:`read_official`,
  :func:`official_key_map`, :func:`load_official_weights`, :func:`to_official_state_dict`) and the SD1.4 UNet
  structure it fits (:data:`SD14_UNET_CONFIG`, :func:`sd14_unet_structure`).

Nothing here imports the adapter (the adapter imports this room): the entry points that build an adapter are
``ROICtrlAdapter.from_official`` / ``from_unet(unet, preset="official")`` / ``load_adapter``, and the
``roi-ops convert-official`` command is :mod:`roi_ops.roictrl_adapter.convert`. See docs/official.md.
"""

from .preset import OFFICIAL_CONFIG, OFFICIAL_OPTIONS
from .unpool import roi_unpool_quantized
from .weights import (
    SD14_UNET_CONFIG,
    is_official_checkpoint,
    load_official_weights,
    official_key_map,
    read_official,
    read_official_keys,
    sd14_unet_structure,
    to_official_state_dict,
)

__all__ = [
    "OFFICIAL_CONFIG",
    "OFFICIAL_OPTIONS",
    "SD14_UNET_CONFIG",
    "is_official_checkpoint",
    "load_official_weights",
    "official_key_map",
    "read_official",
    "read_official_keys",
    "roi_unpool_quantized",
    "sd14_unet_structure",
    "to_official_state_dict",
]
