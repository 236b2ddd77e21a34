"""roi-ops: ROI-Align and ROI-Unpool as PyTorch custom ops, and the ROICtrl
instance-control adapter built on them.

>>> import torch, roi_ops
>>> feats = torch.randn(2, 8, 64, 64)
>>> boxes = torch.tensor([[0, 4.0, 4.0, 40.0, 30.0]])
>>> crops = roi_ops.roi_align(feats, boxes, (7, 7), aligned=True)      # [1, 8, 7, 7]
>>> pasted = roi_ops.roi_unpool(crops, boxes, (64, 64), aligned=True)  # [1, 8, 64, 64]
"""
from . import reference
from ._version import __version__
from ._ops import native_available, native_import_error
from .functional import footprint_crops, roi_align, roi_unpool, roi_unpool_blend
from .modules import RoIAlign, RoIUnpool

__all__ = [
    "roi_align",
    "roi_unpool",
    "roi_unpool_blend",
    "footprint_crops",
    "RoIAlign",
    "RoIUnpool",
    "native_available",
    "native_import_error",
    "reference",
]
