"""One ROICtrl block (the adapter of one cross-attention layer) and its building pieces.

Nothing here knows about diffusers: the block is handed the layer's tensors and the layer's own pretrained
cross-attention module by the hooks in ``adapter.py``, so it can also be driven by hand (the tests do).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import roi_ops

from .instances import ROICtrlInstances


def blend(
    base: torch.Tensor,
    base_logit: torch.Tensor,
    input: torch.Tensor,
    input_logit: torch.Tensor,
    boxes: torch.Tensor,
    spatial_scale: float = 1.0,
    aligned: bool = False,
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

    Returns:
        ``(out, base_weight)``: ``out`` ``Tensor[B, C, H, W]`` is ``softmax``-weighted ``base`` plus the pasted
        grids that cover each pixel (the softmax runs over the global output and only the covering ROIs of that
        image); ``base_weight`` ``Tensor[B, H, W]`` is the global output's weight. Where no ROI covers a pixel
        ``out`` is bitwise ``base`` and ``base_weight`` is exactly 1.

    This version materialises ``[B, max ROIs per image, C, H, W]`` and reads the ROI count back to the host; it is
    the readable reference for the fused op, which the adapter uses unless ``fused_blend=False``.
    """
    B, C, H, W = base.shape
    K = input.shape[0]
    if K == 0:
        return base, base.new_ones(B, H, W)
    ones = input.new_ones(K, 1, input.shape[2], input.shape[3])
    # One paste for values, logits and coverage: the ones channel is > 0 exactly on covered pixels.
    pasted = roi_ops.roi_unpool(
        torch.cat([input, input_logit.unsqueeze(1).to(input.dtype), ones], dim=1),
        boxes,
        (H, W),
        spatial_scale=spatial_scale,
        aligned=aligned,
    )
    # Softmax in float32 for half types (float64 stays float64), as the ops accumulate.
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    values, logits, covered = pasted[:, :C], pasted[:, C].to(acc), pasted[:, C + 1] > 0

    # Stack each image's ROIs into dense slots [B, S] so the softmax runs over a plain tensor axis.
    batch = boxes[:, 0].long()
    onehot = F.one_hot(batch, B)
    slot = ((onehot.cumsum(0) - 1) * onehot).sum(1)
    slots = int(onehot.sum(0).max())
    index = (batch, slot)
    neg_inf = torch.tensor(float("-inf"), dtype=acc, device=base.device)
    dense_logit = torch.full((B, slots, H, W), float("-inf"), dtype=acc, device=base.device).index_put(
        index, torch.where(covered, logits, neg_inf)
    )
    dense_value = values.new_zeros(B, slots, C, H, W).index_put(index, values)
    any_covered = torch.zeros(B, slots, H, W, dtype=torch.bool, device=base.device).index_put(index, covered).any(1)

    weights = torch.softmax(torch.cat([base_logit.to(acc).unsqueeze(1), dense_logit], dim=1), dim=1)
    w_base = weights[:, 0].to(base.dtype)
    mixed = w_base.unsqueeze(1) * base + (weights[:, 1:].to(base.dtype).unsqueeze(2) * dense_value).sum(1)
    out = torch.where(any_covered.unsqueeze(1), mixed, base)
    base_weight = torch.where(any_covered, w_base, torch.ones_like(w_base))
    return out, base_weight


def coverage(boxes: torch.Tensor, batch_size: int, size: tuple[int, int], aligned: bool = True) -> torch.Tensor:
    """``BoolTensor[B, H, W]``: pixels covered by at least one ROI of their image (ROI-Unpool's coverage rule)."""
    H, W = size
    # Coverage depends on the box only, so a 1x1 grid of ones is enough.
    ones = torch.ones(boxes.shape[0], 1, 1, 1, device=boxes.device)
    pasted = roi_ops.roi_unpool(ones, boxes, (H, W), spatial_scale=1.0, aligned=aligned)[:, 0]
    counts = torch.zeros(batch_size, H, W, device=boxes.device)
    return counts.index_put((boxes[:, 0].long(),), pasted, accumulate=True) > 0


class BoxEncoder(nn.Module):
    """Fourier features of box coordinates -> MLP -> one position token per instance.

    Only the coordinates go in (no caption), so the guidance path cannot leak attributes between instances.
    ``Tensor[K, 4]`` in ``[0, 1]`` -> ``Tensor[K, out_dim]``.
    """

    def __init__(self, out_dim: int, num_freqs: int = 8, hidden_dim: int = 512):
        super().__init__()
        self.num_freqs = num_freqs
        self.register_buffer("freqs", (2.0 ** torch.arange(num_freqs, dtype=torch.float32)) * math.pi, persistent=False)
        self.mlp = nn.Sequential(
            nn.Linear(8 * num_freqs, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        angles = boxes.float().unsqueeze(-1) * self.freqs  # [K, 4, F]
        feats = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``Tensor[B, T, C]`` with an optional key mask ``BoolTensor[B, T]``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"SelfAttention dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v)
        )
        mask = None if key_valid is None else key_valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU(approximate="tanh"), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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
       every instance cell; per pixel, a softmax over the global output and the instances covering it, by the
       fused ``roi_ops.roi_unpool_blend`` (memory of the feature map plus the ROI grids, whatever the instance
       count) or, with ``fused_blend=False``, the unfused :func:`blend` (same function, materialises
       ``[B, N, C, H, W]``);
    5. box-coordinate guidance on the residual stream: gated self-attention over [visual tokens; position
       tokens], then a gated feed-forward (both gates zero at init).

    Args:
        dim: channels ``C`` of the layer. heads: attention heads of the new self-attentions.
        position_dim: width of the shared box encoder's tokens. grid: ROI grid side. ff_mult: FF expansion.
        fused_blend: step 4 by the fused op (default) or by the unfused :func:`blend`.
    """

    def __init__(self, dim: int, heads: int, position_dim: int, grid: int, ff_mult: int = 4, fused_blend: bool = True):
        super().__init__()
        self.dim, self.grid, self.fused_blend = dim, grid, fused_blend
        self.roi_norm = nn.LayerNorm(dim)
        self.roi_attn = SelfAttention(dim, heads)
        self.roi_gate = nn.Parameter(torch.zeros(()))
        # No bias: one shared by every logit would cancel in the softmax (and never get a gradient).
        self.blend_proj = nn.Linear(dim, 1, bias=False)
        # Equal logits at init: a covered pixel starts as the plain mean of the global and instance outputs.
        nn.init.zeros_(self.blend_proj.weight)
        self.position_proj = nn.Linear(position_dim, dim)
        self.guide_norm = nn.LayerNorm(dim)
        self.guide_attn = SelfAttention(dim, heads)
        self.guide_attn_gate = nn.Parameter(torch.zeros(()))
        self.guide_ff_norm = nn.LayerNorm(dim)
        self.guide_ff = FeedForward(dim, ff_mult)
        self.guide_ff_gate = nn.Parameter(torch.zeros(()))
        # Set by ROICtrlPipeline(return_blend_maps=True): keep (base_logit, inst_logit, rois) of the last call.
        self.keep_blend_logits = False
        self.blend_logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid={self.grid}, fused_blend={self.fused_blend}"

    def _blend(self, base, base_logit, input, input_logit, boxes, spatial_scale, aligned):
        if self.fused_blend:
            # The fused op takes one dtype for all four tensors; under autocast the logits may come out in
            # another one than the global output (no-op casts otherwise).
            dtype = base.dtype
            return roi_ops.roi_unpool_blend(
                base, base_logit.to(dtype), input.to(dtype), input_logit.to(dtype), boxes, spatial_scale, aligned
            )
        return blend(base, base_logit, input, input_logit, boxes, spatial_scale, aligned)

    def instance_path(
        self,
        hidden_states: torch.Tensor,
        global_out: torch.Tensor,
        attn: nn.Module,
        instances: ROICtrlInstances,
        size: tuple[int, int],
        encoder_hidden_states: Any = None,
        attn_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1-4. Returns ``(blended [B, T, C], base_weight [B, H, W], rois [K, 5])``.

        ``hidden_states`` are the layer's normed states ``[B, H*W, C]`` (row-major pixels), ``global_out`` its
        cross-attention output, ``attn`` the pretrained cross-attention module (called through ``forward`` with
        ``attn_kwargs``), ``encoder_hidden_states`` what the layer got (only used to carry IP-Adapter tokens).
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
        K, P = rois.shape[0], self.grid
        feature_map = hidden_states.reshape(B, H, W, C).permute(0, 3, 1, 2)  # channels_last view, no copy
        crops = roi_ops.roi_align(feature_map, rois, (P, P), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        tokens = crops.flatten(2).transpose(1, 2)  # [K, P*P, C]

        batch = instances.batch_index.to(device)
        text = instances.instance_embeddings.to(device=device, dtype=dtype)
        kwargs = dict(attn_kwargs or {})
        kwargs.pop("ip_adapter_masks", None)  # full-image masks do not apply to ROI crops
        x = attn.forward(
            tokens,
            encoder_hidden_states=_gather_encoder_states(encoder_hidden_states, text, batch),
            attention_mask=None,
            **kwargs,
        )
        x = x + torch.tanh(self.roi_gate).to(dtype) * self.roi_attn(self.roi_norm(x))

        # project(roi_unpool(x)) == roi_unpool(project(x)): the instance logits are made on the small grids.
        inst_logit = self.blend_proj(x).view(K, P, P)
        base_logit = self.blend_proj(global_out).reshape(B, H, W)
        grid_values = x.transpose(1, 2).reshape(K, C, P, P)
        base = global_out.reshape(B, H, W, C).permute(0, 3, 1, 2)
        out, base_weight = self._blend(base, base_logit, grid_values, inst_logit, rois, 1.0, True)
        if self.keep_blend_logits:
            self.blend_logits = (base_logit.detach(), inst_logit.detach(), rois)
        return out.permute(0, 2, 3, 1).reshape(B, T, C), base_weight, rois

    def box_guidance(
        self, residual: torch.Tensor, position_tokens: torch.Tensor, instances: ROICtrlInstances
    ) -> torch.Tensor:
        """Step 5 on the samples that have instances. ``residual`` is ``[S, T, C]`` (rows of
        ``instances.sample_index``), ``position_tokens`` ``[K, position_dim]``; returns the residual update."""
        S, T, C = residual.shape
        device = residual.device
        rows = torch.zeros(instances.batch_size, dtype=torch.long, device=device)
        rows[instances.sample_index.to(device)] = torch.arange(S, device=device)
        index = (rows[instances.batch_index.to(device)], instances.slot_index.to(device))
        slots = instances.max_instances_per_sample
        pos = self.position_proj(position_tokens.to(residual.dtype))
        dense = residual.new_zeros(S, slots, C).index_put(index, pos)
        key_valid = torch.zeros(S, T + slots, dtype=torch.bool, device=device)
        key_valid[:, :T] = True
        key_valid[index[0], T + index[1]] = True  # padded position slots are never attended to

        attn_out = self.guide_attn(self.guide_norm(torch.cat([residual, dense], dim=1)), key_valid)[:, :T]
        d_attn = torch.tanh(self.guide_attn_gate).to(residual.dtype) * attn_out
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
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Replace the layer's cross-attention output.

        The caller's block then adds the result to ``residual`` as it would the plain output. Samples with no
        valid instance get ``global_out`` back bitwise; for the others the result is
        ``global_out + scale * (blended + guidance - global_out)``.

        Returns ``(new_output [B, T, C], stats)`` where ``stats`` holds ``base_weight`` ``[B, H, W]`` and
        ``covered`` ``BoolTensor[B, H, W]`` for the fusion-weight regulariser.
        """
        if instances.num_instances == 0:
            shape = (global_out.shape[0], *size)
            covered = torch.zeros(shape, dtype=torch.bool, device=global_out.device)
            return global_out, {"base_weight": global_out.new_ones(shape), "covered": covered}
        blended, base_weight, rois = self.instance_path(
            hidden_states, global_out, attn, instances, size, encoder_hidden_states, attn_kwargs
        )
        sel = instances.sample_index.to(global_out.device)
        blended_rows = blended.index_select(0, sel)
        delta = self.box_guidance(residual.index_select(0, sel) + blended_rows, position_tokens, instances)
        new_rows = blended_rows + delta
        if instances.scale != 1.0:
            g = global_out.index_select(0, sel)
            new_rows = g + instances.scale * (new_rows - g)
        out = global_out.index_copy(0, sel, new_rows)
        covered = coverage(rois, global_out.shape[0], size)
        return out, {"base_weight": base_weight, "covered": covered}
