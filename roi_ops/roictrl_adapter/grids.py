"""ROI grid sizes per instance (the ``grid_policy`` option) and the blend of ROIs whose grids differ.

``grid_policy="fixed"``: every ROI of a layer gets the layer's ``grid x grid`` (the paper's 25/19/13/7).

``grid_policy="footprint"``: an ROI's grid follows its footprint on the layer's feature map, per axis::

    PH = min(grid, ceil(FOOTPRINT_CELLS * box height in feature pixels)),  PW likewise (at least 1)

with ``FOOTPRINT_CELLS = 1``: one cell per feature pixel the box spans. The crop then holds the map at the map's
own resolution (each cell averages the bilinear samples of its bin, ``sampling_ratio`` adaptive), which is all
the information there is inside the box; a finer grid only interpolates between the same pixels, and costs its
square in the attentions. Beyond the cap the fixed grid applies. A box of 10 % of a 512 px image spans 6.4
feature pixels at 64x64 (7 cells, not 25) and 1.6 at 16x16 (2 cells, not 13); one of 50 % keeps 25 cells at
64x64 but gets 16 at 32x32 (not 19), 8 at 16x16 (not 13).

ROIs with the same ``(PH, PW)`` form one :class:`GridGroup` and go through ROI-Align, the attentions and the blend
in one batched call each, with no padding. :func:`plan_groups` makes the groups (instance indices in their input
order, so any per-instance tensor is split by ``tensor.index_select(0, group.index)``); :func:`blend_groups`
blends them all into the map as the one per-pixel softmax over ``{global, every covering instance}``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from roi_ops._ops import _trusted_now, trusted_boxes

__all__ = ["FOOTPRINT_CELLS", "GRID_POLICIES", "GridGroup", "blend_groups", "grid_sides", "plan_groups"]

#: grid cells per feature pixel of the box under ``grid_policy="footprint"`` (see the module docstring)
FOOTPRINT_CELLS = 1
GRID_POLICIES = ("fixed", "footprint")


@dataclass(frozen=True)
class GridGroup:
    """The ROIs of one layer that share a grid size: ``index`` ``LongTensor[Kg]`` (positions in the instances'
    order, ascending, on the layer's device) and their grid ``(ph, pw)``."""

    index: torch.Tensor
    ph: int
    pw: int


def grid_sides(
    boxes: Sequence[Sequence[float]], size: tuple[int, int], grid: int, policy: str
) -> list[tuple[int, int]]:
    """``(PH, PW)`` of each box under ``policy``; ``boxes`` normalised ``(x1, y1, x2, y2)`` as Python floats
    (``ROICtrlInstances.host_boxes``: no device sync, and constants to ``torch.compile``), ``size`` the layer's
    ``(H, W)``."""
    if policy == "fixed":
        return [(grid, grid)] * len(boxes)
    if policy != "footprint":
        raise ValueError(f"grid_policy must be one of {list(GRID_POLICIES)}, got {policy!r}")
    H, W = size

    def side(extent: float) -> int:  # extent in feature pixels
        return max(1, min(grid, math.ceil(FOOTPRINT_CELLS * extent)))

    return [(side((y2 - y1) * H), side((x2 - x1) * W)) for x1, y1, x2, y2 in boxes]


def plan_groups(
    host_boxes: Sequence[Sequence[float]], size: tuple[int, int], grid: int, policy: str, device: torch.device
) -> list[GridGroup]:
    """The :class:`GridGroup` s of one layer, largest grids first (one group under ``"fixed"``); ``host_boxes``
    as in :func:`grid_sides`."""
    K = len(host_boxes)
    if policy == "fixed" or K == 0:
        return [GridGroup(torch.arange(K, device=device), grid, grid)]
    members: dict[tuple[int, int], list[int]] = {}
    for k, sides in enumerate(grid_sides(host_boxes, size, grid, policy)):
        members.setdefault(sides, []).append(k)
    return [
        GridGroup(torch.tensor(members[sides], dtype=torch.long, device=device), *sides)
        for sides in sorted(members, reverse=True)
    ]


def blend_groups(blend, base, base_logit, grids, logits, boxes, coverages=None):
    """Blend ROI grids of several sizes into ``base`` as one per-pixel softmax, through
    ``blend(base, base_logit, input, input_logit, boxes) -> (out, base_weight)`` (the fused op or the unfused
    blend), called once per group.

    ``grids``, ``logits``, ``boxes``: per group, ``Tensor[Kg, C, PH, PW]``, ``Tensor[Kg, PH, PW]`` and
    ``Tensor[Kg, 5]``; ``coverages``, when given, per group the ROIs' mask coverage crops (``Tensor[Kg, FH, FW]``),
    passed to ``blend`` as a sixth argument. Returns ``(out, base_weight)`` as one call over all ROIs would.

    One group is one call, as before. With more, the calls are chained: group ``g`` blends into the previous
    result, whose logit is the log-sum-exp of everything blended so far, ``b_g = b_{g-1} - log(w_{g-1})`` (``w``
    the previous call's base weight, ``b_0`` the global logit); then ``e^(b_g) * out_{g-1} = e^b base + S_1 + ..
    + S_{g-1}`` and the last output is ``(e^b base + S_1 + .. + S_G) / (e^b + Z_1 + .. + Z_G)``, with ``S``/``Z``
    each group's weighted values / weights; the global output's weight is the product of the ``w_g``. The chain
    runs in float32 (float64 for float64), where ``log(w)`` is finite unless a group's logits exceed all that came
    before by more than ~100 (float32); ``w`` is clamped at the dtype's smallest normal number there, so nothing
    becomes infinite. Under autograd the chain's intermediate maps are not kept: its backward reruns the chain's
    forward (``torch.utils.checkpoint``), so the memory kept for the backward does not grow with the groups.
    """
    extra = [()] * len(grids) if coverages is None else [(c,) for c in coverages]
    if len(grids) == 1:
        return blend(base, base_logit, grids[0], logits[0], boxes[0], *extra[0])
    inputs = (base, base_logit, *grids, *logits)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and any(t.requires_grad for t in inputs):
        # Every link's output is a full-resolution map that the next link's backward reads: autograd would keep
        # one per group, memory growing with the instances. The backward reruns the chain's forward instead (a
        # small part of its cost next to the backward) and only the chain's inputs are kept.
        trusted = _trusted_now()

        def rerunnable(*args):
            with trusted_boxes(trusted):  # the rerun checks boxes as the first run did
                return _chain(blend, *args)

        return torch.utils.checkpoint.checkpoint(
            rerunnable, base, base_logit, grids, logits, boxes, extra, use_reentrant=False, preserve_rng_state=False
        )
    return _chain(blend, base, base_logit, grids, logits, boxes, extra)


def _chain(blend, base, base_logit, grids, logits, boxes, extra):
    dtype = base.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tiny = torch.finfo(acc).tiny
    out, logit, weight = base.to(acc), base_logit.to(acc), None
    for values, cell_logits, rois, more in zip(grids, logits, boxes, extra):
        out, w = blend(out, logit, values.to(acc), cell_logits.to(acc), rois, *(c.to(acc) for c in more))
        weight = w if weight is None else weight * w
        logit = logit - torch.log(w.clamp(min=tiny))
    return out.to(dtype), weight.to(dtype)
