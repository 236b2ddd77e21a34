"""The paper's ROICtrl ablations on the toy benchmark, without touching ``roi_ops``' adapter code.

Each is the ROICtrl stage of ``train.py`` (the trainer ``roi_ops.training.trainer.train_adapter``, the same data,
steps, learning rate, seed and noise) with one part removed or replaced:

``no_guidance``  box-coordinate guidance removed: every block's ``guide_attn_gate`` and ``guide_ff_gate`` frozen at
                 0, so ``tanh(gate) = 0`` and the path adds exactly nothing (its weights get zero gradient);
``no_reg``       without ``L_reg`` (its weight 0);
``no_roi_attn``  ROI self-attention removed: every block's ``roi_gate`` frozen at 0;
``masked_attn``  the paper's "Mask-Attn" variant: ``benchmarks/adapter_baselines.MaskedAttnROICtrlBlock`` in place of
                 every block (masked full-resolution attention instead of ROI-Align / ROI-Unpool; same parameters).

``python -m benchmarks.instance_control.train --out CKPT --stages roictrl --ablation NAME`` writes the adapter to
``CKPT/ablations/NAME/`` with an ``ablation.json``; :func:`load` rebuilds it (the masked variant needs its blocks
swapped again, since ``save_pretrained`` stores only weights and the adapter's own configuration).
"""

from __future__ import annotations

import json
import os
import sys

ABLATIONS = {
    "no_guidance": "without box guidance (guide_attn_gate, guide_ff_gate frozen at 0)",
    "no_reg": "without L_reg (weight 0)",
    "no_roi_attn": "without ROI self-attention (roi_gate frozen at 0)",
    "masked_attn": "masked full-resolution attention instead of ROI-Align/Unpool (paper's Mask-Attn)",
}
_FROZEN_GATES = {"no_guidance": ("guide_attn_gate", "guide_ff_gate"), "no_roi_attn": ("roi_gate",)}


def check(name: str) -> str:
    if name not in ABLATIONS:
        raise ValueError(f"ablation must be one of {sorted(ABLATIONS)}, got {name!r}")
    return name


def masked_block_class():
    """``MaskedAttnROICtrlBlock`` of ``benchmarks/adapter_baselines.py`` (a benchmark module, not a package)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if here not in sys.path:
        sys.path.insert(0, here)
    from adapter_baselines import MaskedAttnROICtrlBlock

    return MaskedAttnROICtrlBlock


def apply(adapter, name: str):
    """Turn a fresh (or loaded) ``ROICtrlAdapter`` into ablation ``name`` in place; returns it. The reg weight of
    ``no_reg`` is the trainer's, see :func:`reg_weight`."""
    import torch

    check(name)
    for gate in _FROZEN_GATES.get(name, ()):
        for block in adapter.blocks:
            param = getattr(block, gate)
            with torch.no_grad():
                param.zero_()
            param.requires_grad_(False)
    if name == "masked_attn":
        cls = masked_block_class()
        for block in adapter.blocks:
            # Same parameters and constructor state; only instance_path differs (a subclass adding one flag).
            block.__class__ = cls
            block.masked_self_attention = True
    return adapter


def reg_weight(name: str, default: float) -> float:
    return 0.0 if check(name) == "no_reg" else default


def save(adapter, folder: str, name: str, record: dict) -> None:
    adapter.save_pretrained(folder)
    with open(os.path.join(folder, "ablation.json"), "w") as f:
        json.dump({"ablation": name, "description": ABLATIONS[name], **record}, f, indent=2)


def load(folder: str, unet):
    """The ablation adapter saved in ``folder``, ready for ``ROICtrlPipeline.from_pipe``."""
    from roi_ops.roictrl_adapter import ROICtrlAdapter

    with open(os.path.join(folder, "ablation.json")) as f:
        name = json.load(f)["ablation"]
    adapter = ROICtrlAdapter.from_pretrained(folder, unet=unet)
    return apply(adapter, name).eval()
