"""ROICtrl: regional instance control for diffusers UNets, built on ``roi_ops.roi_align`` / ``roi_ops.roi_unpool``.

Quick start::

    from roi_ops.roictrl_adapter import ROICtrlAdapter

    adapter = ROICtrlAdapter.from_unet(unet).to(unet.device).install(unet)
    noise_pred = unet(latents, t, text_emb, cross_attention_kwargs={"roictrl": {
        "boxes": boxes,            # Tensor[B, N, 4], (x1, y1, x2, y2) in [0, 1]
        "masks": masks,            # Tensor[B, N], 1 = instance, 0 = padding
        "embeddings": inst_emb,    # Tensor[B, N, L, D] from the model's own text encoder
    }}).sample
    loss = mse + 0.01 * adapter.regularization_loss()
    adapter.uninstall()

Whole pipelines: ``ROICtrlPipeline.from_pipe(pipe, adapter)(prompt, instances=[{"box": ..., "caption": ...}])``
(docs/pipeline.md). See docs/adapter.md.
"""

from .adapter import DEFAULT_GRID_SIZES, BlockSpec, ROICtrlAdapter, load_adapter
from .block import ROICtrlBlock
from .layers import BoxEncoder
from .paste import PasteRule, blend, coverage
from .instances import ROICtrlInstances
from .official import OFFICIAL_CONFIG, is_official_checkpoint
from .options import ArchitectureOptions
from .pipeline import Instance, ROICtrlPipeline, normalize_instances, validate_layout

__all__ = [
    "OFFICIAL_CONFIG",
    "ArchitectureOptions",
    "DEFAULT_GRID_SIZES",
    "BlockSpec",
    "BoxEncoder",
    "Instance",
    "PasteRule",
    "ROICtrlAdapter",
    "ROICtrlBlock",
    "ROICtrlInstances",
    "ROICtrlPipeline",
    "blend",
    "coverage",
    "is_official_checkpoint",
    "load_adapter",
    "normalize_instances",
    "validate_layout",
]
