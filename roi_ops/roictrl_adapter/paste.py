"""The paste rule: how a block pastes its ROI grids back into the feature map, and which pixels each ROI covers.

One object per rule, asked by everything that depends on it (the blend, the blend's coverage for the
regulariser, the blend maps and the pipeline's tiny-box warning):

* :data:`EXACT` (``unpool="exact"``): roi-ops' ``roi_ops.roi_unpool``, the adjoint of ROI-Align; a pixel is
  covered by geometry. The fused ``roi_ops.roi_unpool_blend`` op computes its blend.
* :data:`OFFICIAL` (``unpool="official"``): the official release's quantised paste (:func:`roi_unpool_quantized`,
  always aligned); a pixel is covered where the pasted features do not sum to exactly 0, so its zeroed rims fall
  back to the global output. No fused form.

:func:`paste_rule` turns the ``unpool`` option into its rule. The softmax of the blend itself is
``roi_ops.reference.blend_pasted``, shared with the ops' reference ``roi_unpool_blend`` (one unfused blend).
"""

from __future__ import annotations

import warnings

import torch

import roi_ops
from roi_ops import reference

from .official.unpool import roi_unpool_quantized

__all__ = [
    "EXACT",
    "OFFICIAL",
    "PasteRule",
    "blend",
    "coverage",
    "instance_weights",
    "paste_for_blend",
    "paste_rule",
    "resolve_fused_blend",
    "roi_unpool_quantized",
]


class PasteRule:
    """A paste rule (see the module docstring); use :data:`EXACT`, :data:`OFFICIAL` or :func:`paste_rule`."""

    #: the ``unpool`` option value that selects this rule
    name: str = ""
    #: whether the fused ``roi_ops.roi_unpool_blend`` op computes this rule's blend
    fused: bool = False

    def paste(self, input: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``Tensor[K, C, H, W]``: the grids ``input`` ``Tensor[K, C, PH, PW]`` pasted back (boxes in feature
        pixels, aligned), 0 outside each ROI."""
        raise NotImplementedError

    def paste_for_blend(
        self,
        input: torch.Tensor,
        input_logit: torch.Tensor,
        boxes: torch.Tensor,
        size: tuple[int, int],
        spatial_scale: float = 1.0,
        aligned: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The paste-back step of :func:`blend`: ``(values [K, C, H, W], logits [K, H, W], covered [K, H, W]
        bool)``."""
        raise NotImplementedError

    def coverage_of_boxes(
        self, boxes: torch.Tensor, size: tuple[int, int], grid: int = 1, aligned: bool = True
    ) -> torch.Tensor:
        """``BoolTensor[K, H, W]``: the pixels each ROI covers whatever its values, for a ``grid x grid`` ROI grid
        (boxes in feature pixels; ``aligned`` only matters to the exact rule, the official one is always aligned)."""
        raise NotImplementedError

    def coverage(
        self,
        boxes: torch.Tensor,
        batch_size: int,
        size: tuple[int, int],
        grid: int = 1,
        aligned: bool = True,
        coverage: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``BoolTensor[B, H, W]``: pixels covered by at least one ROI of their image. Given the ROIs' soft
        ``coverage`` (``Tensor[K, FH, FW]``, footprint crops), the float ``Tensor[B, H, W]`` of its maximum over
        the ROIs covering each pixel instead (the region mask ``M`` of the regulariser)."""
        H, W = size
        if boxes.shape[0] == 0:
            return torch.zeros(batch_size, H, W, dtype=torch.bool, device=boxes.device)
        pasted = self.coverage_of_boxes(boxes, size, grid, aligned)
        if coverage is not None:
            dense = reference.coverage_from_crops(coverage, boxes, size, 1.0, aligned, boxes.dtype)
            soft = torch.where(pasted, dense.float(), torch.zeros((), device=boxes.device))
            out = torch.zeros(batch_size, H, W, device=boxes.device)
            index = boxes[:, 0].long()[:, None, None].expand_as(soft)
            return out.scatter_reduce(0, index, soft, "amax", include_self=True)
        counts = torch.zeros(batch_size, H, W, device=boxes.device)
        return counts.index_put((boxes[:, 0].long(),), pasted.to(counts.dtype), accumulate=True) > 0

    def blend(
        self,
        base: torch.Tensor,
        base_logit: torch.Tensor,
        input: torch.Tensor,
        input_logit: torch.Tensor,
        boxes: torch.Tensor,
        spatial_scale: float = 1.0,
        aligned: bool = True,
        fused: bool = False,
        coverage: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`blend` under this rule; ``fused=True`` runs the fused op (only where :attr:`fused`).
        ``coverage``: the ROIs' soft coverage, footprint crops ``Tensor[K, FH, FW]`` (``roi_ops.roi_unpool_blend``)."""
        if fused:
            if not self.fused:
                raise ValueError(f"the {self.name!r} paste rule has no fused blend; use fused=False")
            # The fused op takes one dtype for all four tensors; under autocast the logits may come out in
            # another one than the global output (no-op casts otherwise).
            dtype = base.dtype
            if coverage is None:
                return roi_ops.roi_unpool_blend(
                    base, base_logit.to(dtype), input.to(dtype), input_logit.to(dtype), boxes, spatial_scale, aligned
                )
            return roi_ops.roi_unpool_blend(
                base, base_logit.to(dtype), input.to(dtype), input_logit.to(dtype), boxes, spatial_scale, aligned,
                coverage=coverage.to(dtype),
            )
        B, C, H, W = base.shape
        if input.shape[0] == 0:
            return base, base.new_ones(B, H, W)
        values, logits, covered = self.paste_for_blend(input, input_logit, boxes, (H, W), spatial_scale, aligned)
        dense = None
        if coverage is not None:
            dense = reference.coverage_from_crops(coverage, boxes, (H, W), spatial_scale, aligned, boxes.dtype)
        out, base_weight = reference.blend_pasted(
            base, base_logit, values, logits, covered, boxes[:, 0].long(), coverage=dense
        )
        return out, base_weight.to(base.dtype)

    def __repr__(self) -> str:
        return f"PasteRule({self.name!r})"


class _ExactPaste(PasteRule):
    name, fused = "exact", True

    def paste(self, input, boxes, size):
        return roi_ops.roi_unpool(input, boxes, size, spatial_scale=1.0, aligned=True)

    def paste_for_blend(self, input, input_logit, boxes, size, spatial_scale=1.0, aligned=True):
        K = input.shape[0]
        C = input.shape[1]
        ones = input.new_ones(K, 1, input.shape[2], input.shape[3])
        # One paste for values, logits and coverage: the ones channel is > 0 exactly on covered pixels.
        pasted = roi_ops.roi_unpool(
            torch.cat([input, input_logit.unsqueeze(1).to(input.dtype), ones], dim=1),
            boxes,
            size,
            spatial_scale=spatial_scale,
            aligned=aligned,
        )
        return pasted[:, :C], pasted[:, C], pasted[:, C + 1] > 0

    def coverage_of_boxes(self, boxes, size, grid=1, aligned=True):
        # Coverage depends on the box only, so a 1x1 grid of ones is enough.
        ones = torch.ones(boxes.shape[0], 1, 1, 1, device=boxes.device)
        return roi_ops.roi_unpool(ones, boxes, size, spatial_scale=1.0, aligned=aligned)[:, 0] > 0


class _OfficialPaste(PasteRule):
    name, fused = "official", False

    def paste(self, input, boxes, size):
        return roi_unpool_quantized(input, boxes, size)

    def paste_for_blend(self, input, input_logit, boxes, size, spatial_scale=1.0, aligned=True):
        C = input.shape[1]
        pasted = roi_unpool_quantized(
            torch.cat([input, input_logit.unsqueeze(1).to(input.dtype)], dim=1), boxes, size, spatial_scale
        )
        values, logits = pasted[:, :C], pasted[:, C]
        return values, logits, values.sum(1) != 0  # the official rule: zeroed rims fall back to the global output

    def coverage_of_boxes(self, boxes, size, grid=1, aligned=True):
        ones = torch.ones(boxes.shape[0], 1, grid, grid, device=boxes.device, dtype=boxes.dtype)
        return roi_unpool_quantized(ones, boxes, size)[:, 0] > 0


#: roi-ops' exact paste (``unpool="exact"``).
EXACT: PasteRule = _ExactPaste()
#: the official release's quantised paste (``unpool="official"``).
OFFICIAL: PasteRule = _OfficialPaste()
_RULES = {rule.name: rule for rule in (EXACT, OFFICIAL)}


def paste_rule(unpool: str | PasteRule) -> PasteRule:
    """The :class:`PasteRule` of an ``unpool`` option value (``"exact"`` or ``"official"``), or ``unpool`` itself."""
    if isinstance(unpool, PasteRule):
        return unpool
    if unpool not in _RULES:
        raise ValueError(f"blend unpool must be 'exact' or 'official', got {unpool!r}")
    return _RULES[unpool]


def resolve_fused_blend(fused_blend: bool | None, rule: PasteRule) -> bool:
    """Whether a block under ``rule`` blends with the fused op: ``None`` means wherever the rule has a fused form;
    ``True`` under a rule without one (the official paste) warns and gives ``False`` (the unfused blend runs)."""
    if fused_blend is None:
        return rule.fused
    if fused_blend and not rule.fused:
        warnings.warn(
            f"fused_blend=True has no effect with unpool={rule.name!r}: the fused roi_unpool_blend op pastes "
            "exactly (roi_ops.roi_unpool), not the official quantised way, so the unfused blend runs; pass "
            "fused_blend=None or False (a saved config.json: set \"fused_blend\": false) to silence this",
            UserWarning,
            stacklevel=3,
        )
        return False
    return bool(fused_blend)


def blend(
    base: torch.Tensor,
    base_logit: torch.Tensor,
    input: torch.Tensor,
    input_logit: torch.Tensor,
    boxes: torch.Tensor,
    spatial_scale: float = 1.0,
    aligned: bool = False,
    unpool: str | PasteRule = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste every ROI grid back and blend it with the global output by a per-pixel softmax (unfused).

    Same contract as the fused ``roi_unpool_blend`` op of the spec, which can replace it one for one:

    Args:
        base: ``Tensor[B, C, H, W]``, the global output (a channels_last view of token-major states is fine).
        base_logit: ``Tensor[B, H, W]``, its blending logit.
        input: ``Tensor[K, C, PH, PW]``, one grid per ROI.
        input_logit: ``Tensor[K, PH, PW]``, the blending logit of every grid cell.
        boxes: ``Tensor[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``.
        spatial_scale, aligned: as in ``roi_ops.roi_unpool``.
        unpool: the paste rule, ``"exact"`` (``roi_ops.roi_unpool``, coverage by geometry) or ``"official"`` (the
            official release's :func:`roi_unpool_quantized` with ``aligned=True``, and its coverage rule: a pixel
            is covered by an ROI where the pasted features do not sum to exactly 0), or a :class:`PasteRule`.

    Returns:
        ``(out, base_weight)``: ``out`` ``Tensor[B, C, H, W]`` is ``softmax``-weighted ``base`` plus the pasted
        grids that cover each pixel (the softmax runs over the global output and only the covering ROIs of that
        image); ``base_weight`` ``Tensor[B, H, W]`` is the global output's weight. Where no ROI covers a pixel
        ``out`` is ``base`` and ``base_weight`` is exactly 1.

    This version materialises ``[K, C, H, W]`` and runs the softmax of ``roi_ops.reference.blend_pasted`` (in
    float32 for half types); it is the readable reference for the fused op, which the adapter uses unless
    ``fused_blend=False``.
    """
    return paste_rule(unpool).blend(base, base_logit, input, input_logit, boxes, spatial_scale, aligned)


def paste_for_blend(
    input: torch.Tensor,
    input_logit: torch.Tensor,
    boxes: torch.Tensor,
    size: tuple[int, int],
    spatial_scale: float = 1.0,
    aligned: bool = False,
    unpool: str | PasteRule = "exact",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paste-back step of :func:`blend` (:meth:`PasteRule.paste_for_blend` of ``unpool``'s rule)."""
    return paste_rule(unpool).paste_for_blend(input, input_logit, boxes, size, spatial_scale, aligned)


def coverage(
    boxes: torch.Tensor,
    batch_size: int,
    size: tuple[int, int],
    aligned: bool = True,
    unpool: str | PasteRule = "exact",
    grid: int = 1,
) -> torch.Tensor:
    """``BoolTensor[B, H, W]``: pixels covered by at least one ROI of their image (ROI-Unpool's coverage rule).

    With ``unpool="official"``, that of :func:`roi_unpool_quantized` for a ``grid x grid`` ROI grid (always
    aligned): its zeroed rims, which depend on the grid size, are not covered."""
    return paste_rule(unpool).coverage(boxes, batch_size, size, grid, aligned)


def instance_weights(
    base_weight: torch.Tensor,
    base_logit: torch.Tensor,
    logits: torch.Tensor,
    covered: torch.Tensor,
    boxes: torch.Tensor,
    coverage: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Tensor[K, H, W]``: each instance's weight in the per-pixel softmax of :func:`blend` (the blend maps).

    ``w_k = W_global * exp(l_k - l_global)`` where instance ``k`` covers, 0 elsewhere (in log space, so no
    overflow), times its soft ``coverage`` (footprint crops, as the blend got them) when given; ``base_weight``
    is what the blend returned, ``logits`` and ``covered`` what :meth:`PasteRule.paste_for_blend` gave it,
    ``boxes`` the ROI rows (their batch index picks the image).
    """
    H, W = logits.shape[-2:]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    b = boxes[:, 0].long()
    log_w = base_weight.to(acc)[b].log() + logits.to(acc) - base_logit.to(acc).reshape(-1, H, W)[b]
    weights = torch.where(covered, log_w.exp(), torch.zeros((), dtype=acc, device=logits.device))
    if coverage is not None:
        weights = weights * reference.coverage_from_crops(coverage.detach(), boxes, (H, W), 1.0, True, boxes.dtype)
    return weights
