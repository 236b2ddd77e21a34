"""``nn.Module`` wrappers of the ops."""
from __future__ import annotations

from torch import Tensor, nn

from ._validation import BoxesLike
from .functional import Size2, roi_align, roi_unpool


class RoIAlign(nn.Module):
    """Module form of :func:`roi_ops.roi_align`."""

    def __init__(self, output_size: Size2, spatial_scale: float = 1.0,
                 sampling_ratio: int = -1, aligned: bool = False) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned

    def forward(self, input: Tensor, boxes: BoxesLike) -> Tensor:
        return roi_align(input, boxes, self.output_size, self.spatial_scale,
                         self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


class RoIUnpool(nn.Module):
    """Module form of :func:`roi_ops.roi_unpool`."""

    def __init__(self, output_size: Size2, spatial_scale: float = 1.0,
                 aligned: bool = False) -> None:
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.aligned = aligned

    def forward(self, input: Tensor, boxes: BoxesLike) -> Tensor:
        return roi_unpool(input, boxes, self.output_size, self.spatial_scale, self.aligned)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"aligned={self.aligned}")
