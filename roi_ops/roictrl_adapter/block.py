"""One ROICtrl block: the adapter of one cross-attention layer, in the paper's order.

Nothing here knows about diffusers: the block is handed the layer's tensors and the layer's own pretrained
cross-attention module by the hooks in ``hooks.py``, so it can also be driven by hand (the tests do). How the
ROI grids go back into the feature map is the block's :class:`~roi_ops.roictrl_adapter.paste.PasteRule`
(``paste.py``); its layers are in ``layers.py``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import roi_ops
from roi_ops._ops import trusted_boxes

from .grids import GridGroup, blend_groups, plan_groups
from .instances import ROICtrlInstances
from .layers import FeedForward, SelfAttention, fourier_features, pixel_boxes
from .options import ArchitectureOptions
from .paste import instance_weights, paste_rule, resolve_fused_blend

# Names this module held before paste.py and layers.py took them, importable from here as before.
from .layers import GEGLU, BoxEncoder  # noqa: F401,E402
from .paste import blend, coverage, paste_for_blend, roi_unpool_quantized  # noqa: F401,E402

__all__ = ["ROICtrlBlock"]


def _gather_encoder_states(encoder_hidden_states: Any, text: torch.Tensor, batch: torch.Tensor) -> Any:
    """The instance path's ``encoder_hidden_states``: the instance captions, plus any IP-Adapter image tokens of
    the instance's own sample (diffusers passes those as ``(text, [image_tokens, ...])``)."""
    if isinstance(encoder_hidden_states, tuple):
        _, image_states = encoder_hidden_states
        return (text, [s.index_select(0, batch) for s in image_states])
    return text


class ROICtrlBlock(nn.Module):
    """The adapter of one cross-attention layer, in the paper's order.

    1. ROI-Align of the layer's normed hidden states (``aligned=True``), one ``grid x grid`` crop per instance;
    2. instance injection: the layer's *own* cross-attention on the crop tokens with that instance's caption;
    3. ROI self-attention within each instance, through a tanh gate (zero at init);
    4. ROI-Unpool and blending: one shared 1x1 projection (C -> 1) gives a logit for the global output and for
       every instance cell (optionally scaled per slot by the official channel gate); per pixel, a softmax over
       the global output and the instances covering it, pasted by the block's :attr:`paste_rule`
       (``options.unpool``), by the fused ``roi_ops.roi_unpool_blend`` (memory of the feature map plus the ROI
       grids, whatever the instance count) or, with ``fused_blend=False`` or a rule without a fused form (the
       official paste), the unfused :func:`blend` (same function, materialises ``[K, C, H, W]``);
    5. box-coordinate guidance on the residual stream: gated self-attention over [visual tokens; position
       tokens], then a gated feed-forward (both gates zero at init; no feed-forward with
       ``options.guidance_feed_forward=False``).

    Args:
        dim: channels ``C`` of the layer. heads: attention heads of the new self-attentions.
        position_dim: width of the shared box encoder's tokens. grid: ROI grid side. ff_mult: FF expansion.
        fused_blend: step 4 by the fused op or by the unfused :func:`blend`; ``None`` (default): fused wherever the
            paste rule has a fused form (``unpool="exact"``); ``True`` with ``unpool="official"`` warns and runs
            the unfused blend (:func:`~roi_ops.roictrl_adapter.paste.resolve_fused_blend`).
        options: the :class:`~roi_ops.roictrl_adapter.options.ArchitectureOptions` (default: roi-ops' design).
        fourier_freqs: frequencies of the box encoder's Fourier features (the pixel features of
            ``guidance_keys="positions"`` use the same ones).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        position_dim: int,
        grid: int,
        ff_mult: int = 4,
        fused_blend: bool | None = None,
        options: ArchitectureOptions | None = None,
        fourier_freqs: int = 8,
    ):
        super().__init__()
        options = ArchitectureOptions() if options is None else options
        self.dim, self.grid, self.options = dim, grid, options
        #: how this block pastes its grids back (``options.unpool``): the blend, its coverage and the blend maps
        self.paste_rule = paste_rule(options.unpool)
        self._fused_blend = resolve_fused_blend(fused_blend, self.paste_rule)
        self.roi_norm = nn.LayerNorm(dim)
        self.roi_attn = SelfAttention(dim, heads, options.dropout)
        self.roi_gate = nn.Parameter(torch.zeros(()))
        # No bias: one shared by every logit would cancel in the softmax (and never get a gradient).
        self.blend_proj = nn.Linear(dim, 1, bias=False)
        # Equal logits at init: a covered pixel starts as the plain mean of the global and instance outputs.
        nn.init.zeros_(self.blend_proj.weight)
        if options.channel_gate:
            slots = options.max_instances + 1  # the global output + every instance slot
            self.blend_gate = nn.Sequential(nn.Linear(slots, slots), nn.ReLU(), nn.Linear(slots, slots))
            if options.slot_order == "seeded":
                generator = torch.Generator().manual_seed(options.slot_seed)
                perm = torch.randperm(options.max_instances, generator=generator)
                self.register_buffer("slot_permutation", perm, persistent=False)
        self.position_proj = nn.Linear(position_dim, dim)
        self.guide_norm = nn.LayerNorm(dim)
        self.guide_attn = SelfAttention(dim, heads, options.dropout)
        self.guide_attn_gate = nn.Parameter(torch.zeros(()))
        if options.guidance_feed_forward:
            self.guide_ff_norm = nn.LayerNorm(dim)
            self.guide_ff = FeedForward(dim, ff_mult, options.ff_activation, options.dropout)
            self.guide_ff_gate = nn.Parameter(torch.zeros(()))
        if options.region_embedding:  # last, and zero at init: the other weights draw the same random numbers
            self.region_outside = nn.Parameter(torch.zeros(dim))
            self.region_outside_gate = nn.Parameter(torch.zeros(dim))
        self.fourier_freqs = fourier_freqs
        if options.guidance_keys == "positions":  # zero at init, after every other weight (same random numbers)
            self.guide_pixel_proj = nn.Linear(8 * fourier_freqs, dim, bias=False)
            nn.init.zeros_(self.guide_pixel_proj.weight)
            self.guide_null = nn.Parameter(torch.zeros(dim))

    @property
    def fused_blend(self) -> bool:
        """Whether step 4 runs the fused op; assigning ``True`` under a rule without a fused form warns and keeps
        the unfused blend (as the constructor)."""
        return self._fused_blend

    @fused_blend.setter
    def fused_blend(self, value: bool | None) -> None:
        self._fused_blend = resolve_fused_blend(value, self.paste_rule)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid={self.grid}, fused_blend={self.fused_blend}"

    def _blend(self, base, base_logit, input, input_logit, boxes, spatial_scale, aligned, coverage=None):
        """Step 4's blend: :meth:`PasteRule.blend` of the block's rule, fused or not (the benchmarks' baselines
        replace this method); ``coverage`` is the instances' mask coverage (``None``: boxes only)."""
        return self.paste_rule.blend(
            base, base_logit, input, input_logit, boxes, spatial_scale, aligned, fused=self.fused_blend,
            coverage=coverage,
        )

    def _gate_logits(self, base_logit, inst_logits, groups, rois, instances, size):
        """The official channel gate: scale every slot's logits by ``sigmoid(MLP(max-pooled logit maps))``.

        ``inst_logits``: one ``Tensor[Kg, PH, PW]`` per grid group (:mod:`.grids`); returns them scaled, likewise."""
        B = base_logit.shape[0]
        S = self.options.max_instances
        device = base_logit.device
        # Max over the pasted map, 0 where the slot does not cover (as the official code pools its dense maps).
        maxima = [
            self.paste_rule.paste(logit.unsqueeze(1), self._group_rows(rois, g, groups), size).amax(dim=(1, 2, 3))
            for logit, g in zip(inst_logits, groups)
        ]
        inst_max = maxima[0] if len(groups) == 1 else torch.cat(maxima).index_select(
            0, torch.argsort(torch.cat([g.index for g in groups])))
        batch = instances.batch_index.to(device)
        position = instances.slot_position.to(device)
        pooled = base_logit.new_zeros(B, S + 1)
        pooled[:, 0] = base_logit.amax(dim=(1, 2))
        pooled = pooled.index_put((batch, position + 1), inst_max.to(pooled.dtype))
        order = self.options.slot_order
        perm = None
        if order == "seeded":
            perm = self.slot_permutation.to(device)
        elif order == "random":
            perm = torch.randperm(S).to(device)  # the global CPU generator, as the official code
        if perm is not None:
            pooled = torch.cat([pooled[:, :1], pooled[:, 1:].index_select(1, perm)], dim=1)
        scale = torch.sigmoid(self.blend_gate(pooled.to(self.blend_gate[0].weight.dtype))).to(base_logit.dtype)
        if perm is not None:
            scale = torch.cat([scale[:, :1], scale[:, 1:].index_select(1, torch.argsort(perm))], dim=1)
        inst_scale = scale[batch, position + 1]
        scaled = [
            logit * self._group_rows(inst_scale, g, groups)[:, None, None] for logit, g in zip(inst_logits, groups)
        ]
        return base_logit * scale[:, 0, None, None], scaled

    @staticmethod
    def _group_rows(tensor: torch.Tensor, group: GridGroup, groups: list[GridGroup]) -> torch.Tensor:
        """The rows of a per-instance ``tensor`` that belong to ``group`` (all of it, uncopied, for one group)."""
        return tensor if len(groups) == 1 else tensor.index_select(0, group.index)

    def grid_groups(
        self, instances: ROICtrlInstances, size: tuple[int, int], device: torch.device | str
    ) -> list[GridGroup]:
        """This layer's ROIs grouped by grid size under ``options.grid_policy`` (:func:`.grids.plan_groups`)."""
        return plan_groups(instances.host_boxes, size, self.grid, self.options.grid_policy, device)

    def check_slots(self, instances: ROICtrlInstances) -> None:
        """Raise ``ValueError`` if an instance sits beyond ``max_instances`` slots (fixed-slot configurations)."""
        limit = self.options.max_instances
        if limit is None or instances.boxes.shape[1] <= limit or instances.num_instances == 0:
            return
        last = int(instances.slot_position.max())
        if last >= limit:
            k = int((instances.slot_position == last).nonzero()[0, 0])
            raise ValueError(
                f"this ROICtrl configuration has max_instances={limit} instance slots (the official model's fixed "
                f"count is 30), but sample {int(instances.batch_index[k])} has an instance in slot {last} "
                f"(roictrl boxes hold {instances.boxes.shape[1]} slots per sample); pass at most {limit} slots, or "
                "use the default configuration (max_instances=None) for unbounded instance counts"
            )

    def _align(self, feature_map: torch.Tensor, rois: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Step 1: ROI-Align crops of the layer's normed states, as tokens ``[K, PH*PW, C]``."""
        crops = roi_ops.roi_align(
            feature_map, rois, grid, spatial_scale=1.0, sampling_ratio=self.options.sampling_ratio, aligned=True
        )
        return crops.flatten(2).transpose(1, 2)

    def _inject(self, tokens, attn, text, batch, encoder_hidden_states, attn_kwargs) -> torch.Tensor:
        """Step 2: the layer's own cross-attention on the crop tokens, each with its instance's caption."""
        return attn.forward(
            tokens,
            encoder_hidden_states=_gather_encoder_states(encoder_hidden_states, text, batch),
            attention_mask=None,
            **attn_kwargs,
        )

    def instance_path(
        self,
        hidden_states: torch.Tensor,
        global_out: torch.Tensor,
        attn: nn.Module,
        instances: ROICtrlInstances,
        size: tuple[int, int],
        encoder_hidden_states: Any = None,
        attn_kwargs: dict[str, Any] | None = None,
        blend_record: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1-4. Returns ``(blended [B, T, C], base_weight [B, H, W], rois [K, 5])``.

        ``hidden_states`` are the layer's normed states ``[B, H*W, C]`` (row-major pixels), ``global_out`` its
        cross-attention output, ``attn`` the pretrained cross-attention module (called through ``forward`` with
        ``attn_kwargs``), ``encoder_hidden_states`` what the layer got (only used to carry IP-Adapter tokens).
        Given a dict ``blend_record``, puts the blend maps in it: ``"instance_weights"`` ``Tensor[K, H, W]``
        (detached; the logits pasted once more, by the block's paste rule, as the blend pasted them).
        """
        B, T, C = hidden_states.shape
        H, W = size
        if H * W != T:
            raise ValueError(f"ROICtrlBlock size must satisfy H*W == tokens, got {H}x{W} for {T} tokens")
        if instances.batch_size != B:
            raise ValueError(
                f"roictrl instances are for a batch of {instances.batch_size} but the UNet batch is {B} "
                "(with classifier-free guidance, give the unconditional half all-zero masks)"
            )
        device, dtype = hidden_states.device, hidden_states.dtype
        rois = instances.rois(H, W, dtype=torch.float64 if dtype == torch.float64 else torch.float32).to(device)
        K = rois.shape[0]
        if K == 0:  # only reached with guide_empty_samples: nothing to paste
            return global_out, global_out.new_ones(B, H, W), rois
        feature_map = hidden_states.reshape(B, H, W, C).permute(0, 3, 1, 2)  # channels_last view, no copy
        batch = instances.batch_index.to(device)
        text = instances.instance_embeddings.to(device=device, dtype=dtype)
        kwargs = dict(attn_kwargs or {})
        kwargs.pop("ip_adapter_masks", None)  # full-image masks do not apply to ROI crops
        groups = self.grid_groups(instances, size, device)
        group_rois, injected = [], []
        for g in groups:  # one batched pass per grid size (one under grid_policy="fixed")
            rows = self._group_rows(rois, g, groups)
            x = self._align(feature_map, rows, (g.ph, g.pw))
            injected.append(self._inject(
                x, attn, self._group_rows(text, g, groups), self._group_rows(batch, g, groups),
                encoder_hidden_states, kwargs,
            ))
            group_rois.append(rows)
        # The token-wise parts (norm, projections, gate, logits) see every group's tokens at once, as rows
        # [sum K_g * T_g, C]; the attention itself stays within each ROI (SelfAttention over groups).
        shapes = [tuple(x.shape[:2]) for x in injected]
        tokens = torch.cat([x.reshape(-1, C) for x in injected]) if len(groups) > 1 else injected[0].reshape(-1, C)
        tokens = tokens + torch.tanh(self.roi_gate).to(dtype) * self.roi_attn(self.roi_norm(tokens), groups=shapes)
        # project(roi_unpool(x)) == roi_unpool(project(x)): the instance logits are made on the small grids.
        logits = self.blend_proj(tokens)
        sizes = [k * t for k, t in shapes]
        grids, inst_logits = [], []
        for g, x, logit in zip(groups, tokens.split(sizes), logits.split(sizes)):
            inst_logits.append(logit.reshape(-1, g.ph, g.pw))
            grids.append(x.reshape(-1, g.ph * g.pw, C).transpose(1, 2).reshape(-1, C, g.ph, g.pw))
        base_logit = self.blend_proj(global_out).reshape(B, H, W)
        if self.options.channel_gate:
            base_logit, inst_logits = self._gate_logits(base_logit, inst_logits, groups, rois, instances, size)
        base = global_out.reshape(B, H, W, C).permute(0, 3, 1, 2)
        coverage = instances.layer_coverage(rois, size, dtype)  # None: boxes only, the blend as before regions
        out, base_weight = blend_groups(
            lambda b, bl, v, vl, r, *c: self._blend(b, bl, v, vl, r, 1.0, True, *c), base, base_logit, grids,
            inst_logits, group_rois, None if coverage is None else [self._group_rows(coverage, g, groups) for g in groups],
        )
        if blend_record is not None:
            pasted = [
                self.paste_rule.paste_for_blend(v.detach(), vl.detach(), r, size)
                for v, vl, r in zip(grids, inst_logits, group_rois)
            ]
            logits, covered = (torch.cat([p[i] for p in pasted]) for i in (1, 2))
            if len(groups) > 1:  # back to the instances' order
                order = torch.argsort(torch.cat([g.index for g in groups]))
                logits, covered = logits.index_select(0, order), covered.index_select(0, order)
            blend_record["instance_weights"] = instance_weights(
                base_weight.detach(), base_logit.detach(), logits, covered, rois, coverage
            )
        return out.permute(0, 2, 3, 1).reshape(B, T, C), base_weight, rois

    def _outside_region(self, blended, rois, batch_size, size, covered) -> torch.Tensor:
        """``options.region_embedding`` on the blended output ``[B, H*W, C]``: with ``o`` how much each pixel is
        inside some box but outside every region there (``box coverage - covered``, in [0, 1]; 0 wherever a
        box-only instance covers), ``blended * (1 - o * region_outside_gate) + o * region_outside``. The blend alone
        cannot say "not this instance here": where the coverage is 0 the layer's own output passes, and it knows
        the caption but not the mask; the gate lets the vectors damp that output there, the vector replace it.
        Where ``o`` is 0 the result is ``blended`` bitwise."""
        box = self.paste_rule.coverage(rois, batch_size, size, grid=self.grid)
        dtype = blended.dtype
        outside = (box.to(dtype) - covered.to(dtype)).clamp_min(0).flatten(1).unsqueeze(-1)
        return blended * (1 - outside * self.region_outside_gate.to(dtype)) + outside * self.region_outside.to(dtype)

    def box_guidance(
        self,
        residual: torch.Tensor,
        position_tokens: torch.Tensor,
        instances: ROICtrlInstances,
        rows: torch.Tensor | None = None,
        null_position: torch.Tensor | None = None,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Step 5. ``residual`` is ``[S, T, C]``: the batch rows ``rows`` (default ``instances.sample_index``, the
        samples with instances), ``position_tokens`` ``[K, position_dim]``; returns the residual update.

        With ``position_padding="null_token"`` every row attends to ``max_instances`` tokens, padded slots holding
        ``null_position`` (``[position_dim]``), without a key mask; otherwise only to its real instances.

        With ``options.guidance_pool = p > 1`` the update is computed on the ``p x p`` average-pooled map (``size``,
        the map's ``(H, W)``, is then required) and resized back bilinearly."""
        pool = self.options.guidance_pool
        if pool > 1 or self.options.guidance_kv_pool > 1 or self.options.guidance_keys == "positions":
            if size is None:
                raise ValueError(
                    f"ROICtrlBlock.box_guidance needs size=(H, W) with guidance_pool={pool}, guidance_kv_pool="
                    f"{self.options.guidance_kv_pool}, guidance_keys={self.options.guidance_keys!r}, got None"
                )
            S, T, C = residual.shape
            H, W = size
            if H * W != T:
                raise ValueError(f"ROICtrlBlock.box_guidance size must satisfy H*W == tokens, got {H}x{W} for {T}")
        if pool > 1:
            grid = residual.transpose(1, 2).reshape(S, C, H, W)
            low = F.avg_pool2d(grid, pool, ceil_mode=True)
            h, w = low.shape[-2:]
            delta = self._guidance_update(
                low.flatten(2).transpose(1, 2), position_tokens, instances, rows, null_position, (h, w)
            )
            delta = F.interpolate(delta.transpose(1, 2).reshape(S, C, h, w), size=(H, W), mode="bilinear",
                                  align_corners=False)
            return delta.flatten(2).transpose(1, 2)
        return self._guidance_update(residual, position_tokens, instances, rows, null_position, size)

    def _guidance_update(self, residual, position_tokens, instances, rows, null_position, size) -> torch.Tensor:
        """Step 5 on ``residual`` ``[S, T, C]`` as it is (full or pooled resolution, ``size`` its ``(H, W)``)."""
        S, T, C = residual.shape
        device = residual.device
        rows = instances.sample_index.to(device) if rows is None else rows.to(device)
        row_of = torch.zeros(instances.batch_size, dtype=torch.long, device=device)
        row_of[rows] = torch.arange(S, device=device)
        inst_rows = row_of[instances.batch_index.to(device)]
        pos = self.position_proj(position_tokens.to(residual.dtype))
        if self.options.position_padding == "null_token":
            if null_position is None:
                raise ValueError("ROICtrlBlock with position_padding='null_token' needs null_position, got None")
            slots = self.options.max_instances
            null = self.position_proj(null_position.to(residual.dtype))
            dense = null.expand(S, slots, C).index_put((inst_rows, instances.slot_position.to(device)), pos)
            position_valid = None  # every slot attended, as the official code
        else:
            index = (inst_rows, instances.slot_index.to(device))
            slots = instances.max_instances_per_sample
            dense = residual.new_zeros(S, slots, C).index_put(index, pos)
            # Padded position slots are never attended to; no mask at all where every slot is real (the
            # instances know that on the host: no device read).
            position_valid = None
            if instances.num_instances < S * slots:
                position_valid = torch.zeros(S, slots, dtype=torch.bool, device=device)
                position_valid[index] = True

        # LayerNorm is per token: the visual and the position tokens are normed apart, as one sequence would be.
        visual = self.guide_norm(residual)
        positions = self.guide_norm(dense)
        kv_pool = self.options.guidance_kv_pool
        key_bias = None
        queries = visual
        if self.options.guidance_keys == "positions":  # pixels query with their coordinates; no visual keys
            features = fourier_features(pixel_boxes(size, device), self.fourier_freqs, self.options.fourier_embedding,
                                        torch.float64 if residual.dtype == torch.float64 else torch.float32)
            queries = visual + self.guide_pixel_proj(features.to(residual.dtype))
            keys = torch.cat([self.guide_null.to(residual.dtype).expand(S, 1, C), positions], dim=1)
        elif kv_pool > 1:  # keys / values: the window means, each weighted by its pixel count (options.py)
            H, W = size
            grid = visual.transpose(1, 2).reshape(S, C, H, W)
            pooled = F.avg_pool2d(grid, kv_pool, ceil_mode=True)
            counts = F.avg_pool2d(grid.new_ones(1, 1, H, W), kv_pool, ceil_mode=True, divisor_override=1)
            keys = torch.cat([pooled.flatten(2).transpose(1, 2), positions], dim=1)
            key_bias = torch.cat([counts.flatten().log(), counts.new_zeros(slots)]).expand(S, -1)
        else:
            keys = torch.cat([visual, positions], dim=1)
        key_valid = None
        if position_valid is not None:
            key_valid = torch.cat([position_valid.new_ones(S, keys.shape[1] - slots), position_valid], dim=1)
        # Only the visual tokens query: the position tokens' own outputs would be dropped.
        attn_out = self.guide_attn(queries, key_valid, context=keys, key_bias=key_bias)
        d_attn = torch.tanh(self.guide_attn_gate).to(residual.dtype) * attn_out
        if not self.options.guidance_feed_forward:
            return d_attn
        d_ff = torch.tanh(self.guide_ff_gate).to(residual.dtype) * self.guide_ff(self.guide_ff_norm(residual + d_attn))
        return d_attn + d_ff

    def forward(
        self,
        hidden_states: torch.Tensor,
        residual: torch.Tensor,
        global_out: torch.Tensor,
        attn: nn.Module,
        instances: ROICtrlInstances,
        size: tuple[int, int],
        position_tokens: torch.Tensor,
        encoder_hidden_states: Any = None,
        attn_kwargs: dict[str, Any] | None = None,
        null_position: torch.Tensor | None = None,
        record_blend: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Replace the layer's cross-attention output.

        The caller's block then adds the result to ``residual`` as it would the plain output. Samples with no
        valid instance get ``global_out`` back bitwise (unless ``guide_empty_samples``: then the guidance runs on
        them too); for the others the result is ``global_out + scale * (blended + guidance - global_out)``.
        ``null_position`` is the box encoder's null token, needed with ``position_padding="null_token"``.

        Returns ``(new_output [B, T, C], stats)`` where ``stats`` holds ``base_weight`` ``[B, H, W]`` and
        ``covered`` ``BoolTensor[B, H, W]`` for the fusion-weight regulariser (with regions: the soft union of the
        instances' coverage, a float map); with ``record_blend`` and at least
        one instance also ``instance_weights`` ``Tensor[K, H, W]`` (the blend maps) and ``rois`` ``Tensor[K, 5]``.
        """
        empty_too = self.options.guide_empty_samples
        if instances.num_instances == 0 and not empty_too:
            shape = (global_out.shape[0], *size)
            covered = torch.zeros(shape, dtype=torch.bool, device=global_out.device)
            return global_out, {"base_weight": global_out.new_ones(shape), "covered": covered}
        self.check_slots(instances)
        record = {} if record_blend else None
        # The ROIs come from a validated ROICtrlInstances: the ops need not read them back (a device sync per op
        # call on CUDA); roi_ops._ops.trusted_boxes.
        with trusted_boxes():
            blended, base_weight, rois = self.instance_path(
                hidden_states, global_out, attn, instances, size, encoder_hidden_states, attn_kwargs,
                blend_record=record,
            )
            B = global_out.shape[0]
            region = instances.layer_coverage(rois, size, global_out.dtype)
            if region is None:  # boxes only: the call as before regions existed
                covered = self.paste_rule.coverage(rois, B, size, grid=self.grid)
            else:
                covered = self.paste_rule.coverage(rois, B, size, grid=self.grid, coverage=region)
                if self.options.region_embedding:
                    blended = self._outside_region(blended, rois, B, size, covered)
        sel = torch.arange(B, device=global_out.device) if empty_too else instances.sample_index.to(global_out.device)
        every_row = sel.shape[0] == B  # sample_index is sorted and unique: then it is 0..B-1, no gather needed
        rows_of = (lambda t: t) if every_row else (lambda t: t.index_select(0, sel))
        blended_rows = rows_of(blended)
        delta = self.box_guidance(
            rows_of(residual) + blended_rows, position_tokens, instances, sel, null_position, size
        )
        new_rows = blended_rows + delta
        if instances.scale != 1.0:
            g = rows_of(global_out)
            new_rows = g + instances.scale * (new_rows - g)
        out = new_rows if every_row else global_out.index_copy(0, sel, new_rows)
        stats = {"base_weight": base_weight, "covered": covered}
        if record:
            stats.update(record, rois=rois)
        return out, stats
