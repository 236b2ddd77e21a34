"""Architecture options of the ROICtrl adapter: the one place that names them, their types, ranges and defaults.

Every option is a constructor argument of :class:`~roi_ops.roictrl_adapter.ROICtrlAdapter` and a key of its
``config.json``. The defaults are roi-ops' own design; the official release's values are
:data:`roi_ops.roictrl_adapter.official.OFFICIAL_OPTIONS` (``docs/official.md`` lists every difference and its
measured effect).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["ArchitectureOptions", "OPTION_RULES"]

#: key -> (allowed types, allowed values or a range description checked in ``ArchitectureOptions.__post_init__``).
#: Kept as data so that a config.json validator can reuse it.
OPTION_RULES: dict[str, tuple[tuple[type, ...], Any]] = {
    "ff_activation": ((str,), ("gelu", "geglu")),
    "fourier_embedding": ((str,), ("pow2_pi", "gligen")),
    "position_padding": ((str,), ("drop", "null_token")),
    "channel_gate": ((bool,), (False, True)),
    "max_instances": ((int, type(None)), "None or an int >= 1"),
    "slot_order": ((str,), ("identity", "seeded", "random")),
    "slot_seed": ((int,), "an int >= 0"),
    "sampling_ratio": ((int,), "-1 (adaptive) or an int >= 1"),
    "guide_empty_samples": ((bool,), (False, True)),
    "dropout": ((float, int), "a number in [0, 1)"),
    "unpool": ((str,), ("exact", "official")),
    "grid_policy": ((str,), ("fixed", "footprint")),
    "guidance_pool": ((int,), "an int in [1, 8]"),
    "guidance_kv_pool": ((int,), "an int in [1, 8]"),
    "guidance_kv_pool_scope": ((str,), ("all", "finest")),
    "region_embedding": ((bool,), (False, True)),
    "guidance_feed_forward": ((bool,), (False, True)),
    "guidance_keys": ((str,), ("visual", "positions")),
}


@dataclass(frozen=True)
class ArchitectureOptions:
    """What the blocks compute, where roi-ops and the official release differ (defaults: roi-ops).

    Attributes:
        ff_activation: guidance feed-forward: ``"gelu"`` (Linear C->4C, tanh-GELU, Linear 4C->C) or ``"geglu"``
            (official: diffusers' GEGLU, Linear C->8C whose second half gates the first through exact GELU,
            Linear 4C->C).
        fourier_embedding: box features before the box encoder's MLP: ``"pow2_pi"`` (frequencies ``2**k * pi``,
            features ordered [coordinate, sin/cos, frequency]) or ``"gligen"`` (official: ``100 ** (k / F)``, no
            pi, ordered [frequency, sin/cos, coordinate]).
        position_padding: ``"drop"`` (padded instances give no position token; the guidance attention sees only
            real ones) or ``"null_token"`` (official: a learned null Fourier feature replaces every padded slot up
            to ``max_instances`` slots, all of them attended, no key mask).
        channel_gate: official blend gate: per sample, max-pool every slot's pasted logit map (global + each of
            ``max_instances`` slots, 0 where uncovered), MLP ``S -> S -> S`` with ReLU, multiply each slot's
            logits by ``sigmoid`` of it. Needs ``max_instances``.
        max_instances: fixed slot count (official: 30); an instance in a slot beyond it is an error. ``None``:
            unbounded (only with ``channel_gate=False`` and ``position_padding="drop"``).
        slot_order: order of the instance slots seen by the channel gate: ``"identity"``, ``"seeded"`` (one fixed
            permutation drawn from ``slot_seed``) or ``"random"`` (official: a fresh ``torch.randperm`` from the
            global CPU generator on every call, so outputs depend on the RNG).
        slot_seed: seed of the ``"seeded"`` permutation.
        sampling_ratio: ROI-Align samples per grid cell and axis; ``-1`` adaptive (``ceil(roi / grid)``), the
            official code uses 2.
        guide_empty_samples: ``False``: a sample without a valid instance gets the layer's own output back
            bitwise. ``True`` (official): the box guidance (self-attention with null tokens, feed-forward) runs on
            every sample of a call that carries instance data.
        dropout: dropout of the new attentions' outputs and of the feed-forward's hidden layer, in training
            only (official: 0.2).
        unpool: ``"exact"`` (roi-ops' ROI-Unpool: every pixel of the box covered, fused blend available) or
            ``"official"`` (the release's quantised unpool: box pixel range ``ceil(c*s - 0.5)``, grid position
            without the half-cell offset, pixels whose bilinear neighbours leave the grid set to 0, coverage =
            "feature sum != 0"; always the unfused blend).
        grid_policy: ROI grid size per instance (``grids.py``): ``"fixed"`` (the layer's ``grid x grid`` for
            every ROI; official, and what a saved config without this key means) or ``"footprint"`` (per axis
            ``min(grid, ceil(the box's extent in feature pixels))``; ROIs of one grid size share each call).
        guidance_pool: the box guidance (step 5) runs on the ``guidance_pool x guidance_pool`` average-pooled
            map and its update is resized back bilinearly; ``1`` (official, and what a saved config without this
            key means): full resolution. ``2`` costs about a quarter of the projections and feed-forward and a
            sixteenth of the attention scores.
        guidance_kv_pool: the guidance self-attention's visual keys and values are the means of their
            ``guidance_kv_pool x guidance_kv_pool`` windows of the map (cut by its edge): every pixel still queries
            (and the feed-forward still runs) at full resolution, the position tokens are attended as they are. It
            equals full-resolution attention over keys and values replaced by their window means, computed once
            per window (a score bias of ``log(pixels in the window)``), so about ``1 / guidance_kv_pool**2`` of
            the attention scores. ``1`` (official, and what a saved config without this key means): off.
        guidance_kv_pool_scope: where ``guidance_kv_pool`` applies: ``"all"`` levels, or only the ``"finest"``
            (the adapter's blocks with the smallest downsampling: the 64x64 map of a 512 px SD1.5 UNet, which holds
            most of the guidance attention's scores).
        region_embedding: ``True``: every block holds two learned per-channel vectors (zero at init), a gate
            ``g`` and a vector ``r``; where an instance's box covers a pixel but its mask (region) does not, by
            ``o = box - coverage``, its output becomes ``out * (1 - o * g) + o * r``: the one signal "inside the
            box, not this instance" that the box-only parts cannot get. Acts only on calls with regions; without
            them the block is bitwise the one without the option. ``False`` (official, and what a saved config
            without this key means): no such vectors.
        guidance_feed_forward: ``True`` (official, and what a saved config without this key means): the box
            guidance ends with its gated feed-forward over the whole map (step 8 of the official block: as many
            multiply-adds per pixel as the layer's own feed-forward). ``False``: the guidance is its gated
            self-attention alone, and the block holds no feed-forward weights (about half the adapter's
            parameters).
        guidance_keys: what the box guidance's attention attends to. ``"visual"`` (official, GLIGEN's gated
            self-attention, and what a saved config without this key means): the visual tokens (pooled by
            ``guidance_kv_pool``) and the position tokens. ``"positions"``: only the position tokens and one
            learned null token (zero at init: a pixel inside no box can attend to it and change nothing); every
            pixel's query gets a learned projection (zero at init) of its own centre's Fourier features, so it
            knows where it is without looking at the other pixels. No pixel-to-pixel scores: the attention costs
            ``H*W x (instances + 1)`` scores instead of ``H*W x (H*W / guidance_kv_pool**2 + instances)``.
    """

    ff_activation: str = "gelu"
    fourier_embedding: str = "pow2_pi"
    position_padding: str = "drop"
    channel_gate: bool = False
    max_instances: int | None = None
    slot_order: str = "identity"
    slot_seed: int = 0
    sampling_ratio: int = -1
    guide_empty_samples: bool = False
    dropout: float = 0.0
    unpool: str = "exact"
    grid_policy: str = "fixed"
    guidance_pool: int = 1
    guidance_kv_pool: int = 1
    guidance_kv_pool_scope: str = "all"
    region_embedding: bool = False
    guidance_feed_forward: bool = True
    guidance_keys: str = "visual"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            types, allowed = OPTION_RULES[f.name]
            # bool is an int subclass: accept it only where bool is the declared type.
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
                names = " or ".join("None" if t is type(None) else t.__name__ for t in types)
                raise TypeError(f"ROICtrl option {f.name} must be {names}, got {type(value).__name__} {value!r}")
            if isinstance(allowed, tuple) and value not in allowed:
                raise ValueError(f"ROICtrl option {f.name} must be one of {list(allowed)}, got {value!r}")
        if self.max_instances is not None and self.max_instances < 1:
            raise ValueError(f"ROICtrl option max_instances must be None or >= 1, got {self.max_instances}")
        if self.slot_seed < 0:
            raise ValueError(f"ROICtrl option slot_seed must be >= 0, got {self.slot_seed}")
        if self.sampling_ratio == 0 or self.sampling_ratio < -1:
            raise ValueError(f"ROICtrl option sampling_ratio must be -1 or >= 1, got {self.sampling_ratio}")
        for name in ("guidance_pool", "guidance_kv_pool"):
            if not 1 <= getattr(self, name) <= 8:
                raise ValueError(f"ROICtrl option {name} must be an int in [1, 8], got {getattr(self, name)}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"ROICtrl option dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "dropout", float(self.dropout))
        needs_slots = [
            name
            for name, on in (("channel_gate=True", self.channel_gate), ("position_padding='null_token'",
                             self.position_padding == "null_token"))
            if on
        ]
        if needs_slots and self.max_instances is None:
            raise ValueError(f"ROICtrl options {' and '.join(needs_slots)} need a fixed max_instances, got None")
        if self.grid_policy == "footprint" and self.unpool != "exact":
            raise ValueError(
                f"ROICtrl option grid_policy='footprint' needs unpool='exact', got unpool={self.unpool!r} (the "
                "official quantised paste's coverage depends on the grid size); use grid_policy='fixed' with it"
            )
        if self.guidance_keys == "positions" and self.guidance_kv_pool > 1:
            raise ValueError(
                f"ROICtrl option guidance_kv_pool={self.guidance_kv_pool} pools the guidance attention's visual keys, "
                "but guidance_keys='positions' (new adapters' default) has none; leave guidance_kv_pool=1, or set "
                "guidance_keys='visual'"
            )
        if self.slot_order != "identity" and not self.channel_gate:
            raise ValueError(
                f"ROICtrl option slot_order={self.slot_order!r} only affects the channel gate; set "
                "channel_gate=True or leave slot_order='identity'"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
