"""Per-call instance data for the ROICtrl adapter.

The UNet receives it the diffusers way, as one entry of ``cross_attention_kwargs``::

    unet(latents, t, text, cross_attention_kwargs={"roictrl": {"boxes": ..., "masks": ..., "embeddings": ...}})

Either a plain dict or a :class:`ROICtrlInstances` is accepted; the dict may use the official release's key names
``instance_boxes`` / ``instance_masks`` / ``instance_embeddings`` too. The dataclass validates once and keeps the
compacted list of valid instances (padded slots dropped), so the per-layer work never touches padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

import roi_ops

_KEYS = ("boxes", "embeddings", "masks", "scale", "regions")
# The official ROICtrl release names the same entries instance_boxes / instance_masks / instance_embeddings.
ALIASES = {"instance_boxes": "boxes", "instance_embeddings": "embeddings", "instance_masks": "masks"}


def _shape(t: object) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} Tensor{list(t.shape)}"
    return type(t).__name__


@dataclass(frozen=True, eq=False)
class ROICtrlInstances:
    """Boxes, captions and validity of the instances of every sample in a batch.

    Args:
        boxes: ``Tensor[B, N, 4]`` of ``(x1, y1, x2, y2)`` normalised to ``[0, 1]`` (``x1 <= x2``, ``y1 <= y2``),
            x along the width of the image, y along its height.
        embeddings: ``Tensor[B, N, L, D]``, each instance's caption encoded by the base model's own text encoder
            (``D`` = the UNet's ``cross_attention_dim``).
        masks: ``Tensor[B, N]`` (bool, or 0/1 of any dtype), 1 for a real instance and 0 for padding; ``None``
            means every slot is an instance. Padded slots may hold anything (their boxes are not checked).
        scale: strength of the adapter for this call; ``0`` skips it entirely, ``1`` is the trained behaviour.
        regions: optional ``Tensor[B, N, Hr, Wr]`` (bool or floating, values in ``[0, 1]``): each instance's shape
            as a soft mask over the whole image (any resolution, best a multiple of every layer's map). Per layer it
            is area-averaged onto the map (:meth:`layer_coverage`) and weights the instance's blend term
            (docs/ops.md, "Mask-shaped instances"); outside the box it is ignored. An instance without a shape has
            a region of all ones. ``None``: boxes only, bitwise the adapter without regions. Not to be confused
            with ``masks``, which marks the valid slots.

    Derived attributes (computed once in ``__post_init__``; ``K`` = number of valid instances):
        ``batch_index`` ``LongTensor[K]``, ``instance_boxes`` ``Tensor[K, 4]``, ``instance_embeddings``
        ``Tensor[K, L, D]``, ``slot_index`` ``LongTensor[K]`` (rank of the instance within its sample),
        ``slot_position`` ``LongTensor[K]`` (its slot ``n`` in the padded ``[B, N]`` input),
        ``sample_index`` ``LongTensor[S]`` (sorted samples with at least one instance), ``num_instances`` (K),
        ``max_instances_per_sample``, ``host_boxes`` (``instance_boxes`` as a tuple of ``K`` tuples of Python
        floats: the layers' grid sizes are planned from it without a device sync, and as constants under
        ``torch.compile``).
    """

    boxes: torch.Tensor
    embeddings: torch.Tensor
    masks: torch.Tensor | None = None
    scale: float = 1.0
    regions: torch.Tensor | None = None

    batch_index: torch.Tensor = field(init=False, repr=False)
    instance_boxes: torch.Tensor = field(init=False, repr=False)
    instance_embeddings: torch.Tensor = field(init=False, repr=False)
    slot_index: torch.Tensor = field(init=False, repr=False)
    slot_position: torch.Tensor = field(init=False, repr=False)
    sample_index: torch.Tensor = field(init=False, repr=False)
    num_instances: int = field(init=False, repr=False)
    max_instances_per_sample: int = field(init=False, repr=False)
    instance_regions: torch.Tensor | None = field(init=False, repr=False)
    _coverage_cache: dict = field(init=False, repr=False)
    host_boxes: tuple = field(init=False, repr=False)

    def __post_init__(self) -> None:
        boxes, emb, masks = self.boxes, self.embeddings, self.masks
        if not isinstance(boxes, torch.Tensor) or boxes.dim() != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"roictrl boxes must be Tensor[B, N, 4] (x1, y1, x2, y2 in [0, 1]), got {_shape(boxes)}")
        if not boxes.is_floating_point():
            raise TypeError(f"roictrl boxes must be a floating-point tensor, got {boxes.dtype}")
        B, N = boxes.shape[:2]
        if not isinstance(emb, torch.Tensor) or emb.dim() != 4 or tuple(emb.shape[:2]) != (B, N):
            raise ValueError(
                f"roictrl embeddings must be Tensor[B, N, L, D] with B={B}, N={N} as in boxes, got {_shape(emb)}"
            )
        if not emb.is_floating_point():
            raise TypeError(f"roictrl embeddings must be a floating-point tensor, got {emb.dtype}")
        if masks is None:
            valid = torch.ones(B, N, dtype=torch.bool, device=boxes.device)
        else:
            if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != (B, N):
                raise ValueError(
                    f"roictrl masks must be Tensor[B, N] with B={B}, N={N} as in boxes, got {_shape(masks)}"
                )
            if masks.dtype != torch.bool:
                if masks.is_complex() or not bool(((masks == 0) | (masks == 1)).all()):
                    raise ValueError("roictrl masks must be bool or hold only 0 and 1")
            valid = masks.to(device=boxes.device, dtype=torch.bool)
        if emb.device != boxes.device:
            raise ValueError(f"roictrl boxes and embeddings must be on one device, got {boxes.device} and {emb.device}")
        scale = self.scale
        if isinstance(scale, torch.Tensor):
            if scale.numel() != 1:
                raise ValueError(f"roictrl scale must be a number, got {_shape(scale)}")
            scale = float(scale)
        if not isinstance(scale, (int, float)) or not float(scale) == float(scale) or abs(float(scale)) == float("inf"):
            raise ValueError(f"roictrl scale must be a finite number, got {scale!r}")
        object.__setattr__(self, "scale", float(scale))

        regions = self.regions
        if regions is not None:
            if not isinstance(regions, torch.Tensor) or regions.dim() != 4 or tuple(regions.shape[:2]) != (B, N):
                raise ValueError(
                    f"roictrl regions must be Tensor[B, N, H, W] with B={B}, N={N} as in boxes (one soft mask per "
                    f"instance, all ones for a box-only one), got {_shape(regions)}"
                )
            if regions.dtype != torch.bool and not regions.is_floating_point():
                raise TypeError(f"roictrl regions must be bool or floating point, got {regions.dtype}")
            if min(regions.shape[2:]) < 1:
                raise ValueError(f"roictrl regions must have a non-empty H x W, got {_shape(regions)}")
            if regions.device != boxes.device:
                raise ValueError(
                    f"roictrl boxes and regions must be on one device, got {boxes.device} and {regions.device}"
                )
        # One host sync for all value checks: compacting to the valid instances needs their count anyway.
        idx = valid.nonzero()  # [K, 2], row-major: grouped by sample, in slot order
        b_idx, n_idx = idx[:, 0], idx[:, 1]
        inst_boxes = boxes[b_idx, n_idx]
        inst_emb = emb[b_idx, n_idx]
        inst_regions = None
        if regions is not None:
            inst_regions = regions[b_idx, n_idx].float() if regions.dtype == torch.bool else regions[b_idx, n_idx]
            if inst_regions.numel():
                bad = ~(torch.isfinite(inst_regions) & (inst_regions >= 0) & (inst_regions <= 1)).flatten(1).all(1)
                if bool(bad.any()):
                    k = int(bad.nonzero()[0, 0])
                    raise ValueError(
                        "roictrl regions of valid instances must hold values in [0, 1] (a soft mask), got values "
                        f"outside for sample {int(b_idx[k])}, slot {int(n_idx[k])}"
                    )
        if inst_boxes.numel():
            x1, y1, x2, y2 = inst_boxes.unbind(-1)
            bad = ~torch.isfinite(inst_boxes).all(-1)
            bad |= (inst_boxes < 0).any(-1) | (inst_boxes > 1).any(-1) | (x2 < x1) | (y2 < y1)
            bad_emb = ~torch.isfinite(inst_emb.flatten(1)).all(-1)
            # one host sync for both verdicts
            verdict = torch.stack([bad.any(), bad_emb.any()]).tolist()
            if verdict[0]:
                k = int(bad.nonzero()[0, 0])
                raise ValueError(
                    "roictrl boxes of valid instances must be finite (x1, y1, x2, y2) with 0 <= x1 <= x2 <= 1 and "
                    f"0 <= y1 <= y2 <= 1, got {inst_boxes[k].tolist()} for sample {int(b_idx[k])}, slot {int(n_idx[k])}"
                )
            if verdict[1]:
                k = int(bad_emb.nonzero()[0, 0])
                raise ValueError(
                    "roictrl embeddings of valid instances must be finite (no NaN or inf), got non-finite values "
                    f"for sample {int(b_idx[k])}, slot {int(n_idx[k])}"
                )
        counts = valid.sum(1)
        # Rank of each valid instance among the valid instances of its sample.
        slot = (valid.long().cumsum(1) - 1)[b_idx, n_idx]
        object.__setattr__(self, "batch_index", b_idx)
        object.__setattr__(self, "instance_boxes", inst_boxes)
        object.__setattr__(self, "instance_embeddings", inst_emb)
        object.__setattr__(self, "slot_index", slot)
        object.__setattr__(self, "slot_position", n_idx)
        object.__setattr__(self, "sample_index", (counts > 0).nonzero().flatten())
        object.__setattr__(self, "num_instances", int(idx.shape[0]))
        object.__setattr__(self, "max_instances_per_sample", int(counts.max()) if B > 0 else 0)
        object.__setattr__(self, "instance_regions", inst_regions)
        object.__setattr__(self, "_coverage_cache", {})
        object.__setattr__(self, "host_boxes", tuple(map(tuple, inst_boxes.detach().double().tolist())))

    @property
    def has_regions(self) -> bool:
        """Whether the instances carry regions (mask shapes)."""
        return self.instance_regions is not None

    def layer_coverage(self, rois: torch.Tensor, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor | None:
        """The instances' soft coverage on an ``H x W`` layer map, cropped to each ROI's footprint, the
        ``coverage`` of ``roi_ops.roi_unpool_blend``: ``Tensor[K, FH, FW]``, or ``None`` without regions.

        A feature pixel's coverage is the mean of the region over the pixel's footprint in the image (adaptive
        average pooling: an exact area average when the region's size is a multiple of the map's). Computed once
        per map size and dtype for all layers of that size (the dense ``[K, H, W]`` map is not kept)."""
        if self.instance_regions is None:
            return None
        key = (tuple(size), dtype, rois.device)
        cached = self._coverage_cache.get(key)
        if cached is None:
            regions = self.instance_regions.to(device=rois.device)
            dense = torch.nn.functional.adaptive_avg_pool2d(regions.float()[:, None], tuple(size))[:, 0]
            cached = roi_ops.reference.footprint_crops(dense.to(dtype), rois, 1.0, True, rois.dtype)
            self._coverage_cache[key] = cached
        return cached

    @property
    def batch_size(self) -> int:
        return self.boxes.shape[0]

    def check_embedding_width(self, width: int, layer: str) -> None:
        """Raise ``ValueError`` unless the caption embeddings are ``width`` wide, the ``cross_attention_dim`` of
        ``layer`` (they feed its cross-attention's key and value projections)."""
        got = self.embeddings.shape[-1]
        if got != width:
            raise ValueError(
                f"roictrl embeddings must be Tensor[B, N, L, {width}]: {layer} takes caption embeddings of width "
                f"{width} (its cross_attention_dim), got Tensor{list(self.embeddings.shape)}"
            )

    @classmethod
    def coerce(cls, data: object) -> "ROICtrlInstances":
        """Return ``data`` if it already is a ``ROICtrlInstances``, else build one from a mapping."""
        if isinstance(data, cls):
            return data
        if isinstance(data, Mapping):
            unknown = sorted(set(data) - set(_KEYS) - set(ALIASES))
            if unknown:
                raise ValueError(
                    f"roictrl got unknown keys {unknown}; expected some of {list(_KEYS)} "
                    f"(or the official names {list(ALIASES)})"
                )
            data = dict(data)
            for alias, key in ALIASES.items():
                if alias in data:
                    if key in data:
                        raise ValueError(f"roictrl got both {key!r} and its official alias {alias!r}; pass one")
                    data[key] = data.pop(alias)
            missing = [k for k in ("boxes", "embeddings") if k not in data]
            if missing:
                raise ValueError(
                    f"roictrl needs keys {missing} (expected boxes, embeddings and optionally masks, scale, regions)"
                )
            return cls(**data)
        raise TypeError(
            "cross_attention_kwargs['roictrl'] must be a ROICtrlInstances or a dict with keys boxes, embeddings, "
            f"masks, scale, regions; got {type(data).__name__}"
        )

    def rois(self, height: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in pixel units of an ``height x width`` map."""
        scale = torch.tensor([width, height, width, height], dtype=dtype, device=self.boxes.device)
        return torch.cat([self.batch_index.to(dtype).unsqueeze(1), self.instance_boxes.to(dtype) * scale], dim=1)
