"""The two ROICtrl baselines the adapter benchmark measures against (benchmarks only, not product API).

Both are :class:`roi_ops.roictrl_adapter.ROICtrlBlock` subclasses: same parameters, same ROI self-attention,
box-coordinate guidance, gates and regulariser statistics; only the part under study is replaced.

* :class:`NaiveROICtrlBlock` ("naive ROICtrl"): ROI-Align, instance injection and ROI self-attention on the ROI
  grids as in the adapter, but the paste-back and blend done the way the official ROICtrl release does it
  (``FuseWeightGenerator`` in ``roictrl/models/stable_diffusion_models/roictrl.py``): every sample's instances are
  padded to the batch's largest count ``N``; ROI-Unpool pastes every padded slot back to full resolution
  (``[B*N, C, H, W]``); that is concatenated with the global output into ``[B, N+1, C, H, W]``; the shared 1x1
  projection runs on that stack (a 1x1 convolution, as there); uncovered or padded entries get logit ``-inf``;
  a softmax over the ``N+1`` axis weighs the stack and a sum reduces it. The official channel gate (an MLP
  over pooled logits) is left out because the adapter has none. It computes the adapter's function (to
  rounding: the logits are projected after pasting instead of before, equal by linearity).
* :class:`MaskedAttnROICtrlBlock` ("masked-attention ROICtrl", the paper's Mask-Attn ROICtrl ablation, the
  MIGC / InstanceDiffusion way): no ROI-Align or ROI-Unpool, every per-instance step runs on the full map with
  a box mask (the pixels ROI-Unpool would cover, so both methods touch the same region). Each instance's
  cross-attention (the layer's own pretrained ``attn2``) runs on all ``H*W`` tokens of its sample with the
  instance's caption; the ROI self-attention becomes a self-attention over all ``H*W`` tokens with keys
  restricted to the box (MIGC's layout attention does the same); outside the box both outputs are discarded:
  masked-out entries get logit ``-inf`` in a blend over the stacked full-resolution outputs
  ``[B, N+1, H*W, C]`` (logits from the same shared projection). Cost: ``N * H*W`` cross-attention queries and
  ``N * (H*W)^2`` self-attention scores. ``masked_self_attention=False`` (benchmark method ``masked_xattn``)
  leaves the self-attention out: a lower bound of the masked design's cost, doing less work than the adapter.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import roi_ops
from roi_ops.roictrl_adapter import ROICtrlBlock, ROICtrlInstances
from roi_ops.roictrl_adapter.block import _gather_encoder_states

__all__ = ["MaskedAttnROICtrlBlock", "NaiveROICtrlBlock", "METHODS", "make_block"]


def _dense_index(instances: ROICtrlInstances, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(batch index [K], slot index [K], N): where each valid instance sits in the padded [B, N] layout."""
    return (
        instances.batch_index.to(device),
        instances.slot_index.to(device),
        instances.max_instances_per_sample,
    )


def _softmax_dtype(t: torch.Tensor) -> torch.dtype:
    """float32 for half types, float64 stays float64: as the adapter's blend."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class NaiveROICtrlBlock(ROICtrlBlock):
    """ROICtrl with the official code's blend: materialises ``[B, N+1, C, H, W]`` (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs["fused_blend"] = False  # the blend is replaced below; the flag does not apply
        super().__init__(*args, **kwargs)
        self._dense: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, grid={self.grid}, blend=naive [B, N+1, C, H, W]"

    def instance_path(self, hidden_states, global_out, attn, instances, size, encoder_hidden_states=None,
                      attn_kwargs=None, blend_record=None):
        # The padded layout needs each instance's slot, which the blend's arguments do not carry.
        self._dense = _dense_index(instances, hidden_states.device)
        try:
            return super().instance_path(
                hidden_states, global_out, attn, instances, size, encoder_hidden_states, attn_kwargs, blend_record
            )
        finally:
            self._dense = None

    def _blend(self, base, base_logit, input, input_logit, boxes, spatial_scale, aligned):
        # base_logit / input_logit (made on the grids by the adapter) are ignored: as in the official code the
        # logits are projected from the pasted full-resolution stack.
        batch, slot, N = self._dense
        B, C, H, W = base.shape
        K, _, PH, PW = input.shape
        dense = batch * N + slot
        grids = input.new_zeros(B * N, C, PH, PW).index_copy(0, dense, input)
        # Padded slots get an empty box (zero width and height covers nothing): their paste-back is all zeros.
        dense_boxes = boxes.new_zeros(B * N, 5)
        dense_boxes[:, 0] = torch.arange(B, device=boxes.device, dtype=boxes.dtype).repeat_interleave(N)
        dense_boxes = dense_boxes.index_copy(0, dense, boxes)
        pasted = roi_ops.roi_unpool(grids, dense_boxes, (H, W), spatial_scale=spatial_scale, aligned=aligned)
        ones = input.new_ones(B * N, 1, 1, 1)
        covered = roi_ops.roi_unpool(ones, dense_boxes, (H, W), spatial_scale=spatial_scale, aligned=aligned) > 0

        stack = torch.cat([base.unsqueeze(1), pasted.view(B, N, C, H, W)], dim=1)  # [B, N+1, C, H, W]
        weight = self.blend_proj.weight.view(1, C, 1, 1).to(stack.dtype)
        logits = F.conv2d(stack.view(B * (N + 1), C, H, W), weight).view(B, N + 1, H, W)
        valid = torch.cat([covered.new_ones(B, 1, H, W), covered.view(B, N, H, W)], dim=1)
        logits = logits.to(_softmax_dtype(stack)).masked_fill(~valid, float("-inf"))
        weights = torch.softmax(logits, dim=1).to(stack.dtype)  # [B, N+1, H, W]
        out = (stack * weights.unsqueeze(2)).sum(1)
        return out, weights[:, 0]


class MaskedAttnROICtrlBlock(ROICtrlBlock):
    """ROICtrl with masked attention on the full map instead of ROI grids (see the module docstring).

    Args: those of :class:`ROICtrlBlock`, plus ``masked_self_attention``: run the ROI self-attention as a
    full-map self-attention with keys restricted to the box (``N * (H*W)^2``; the default, as the adapter has
    the step); ``False`` leaves the step out.
    """

    def __init__(self, *args: Any, masked_self_attention: bool = True, **kwargs: Any):
        kwargs["fused_blend"] = False
        super().__init__(*args, **kwargs)
        self.masked_self_attention = masked_self_attention

    def extra_repr(self) -> str:
        return f"dim={self.dim}, masked attention on H*W tokens, masked_self_attention={self.masked_self_attention}"

    def masked_roi_self_attention(self, x: torch.Tensor, box_mask: torch.Tensor) -> torch.Tensor:
        """The ROI self-attention in masked form: ``x`` ``[K, H*W, C]``, every token a query, keys restricted to
        ``box_mask`` ``BoolTensor[K, H*W]``. Inside the box it equals the self-attention of the box's tokens."""
        # A box that covers no pixel would leave its queries no key (NaN); its output is masked out anyway.
        keys = box_mask | ~box_mask.any(1, keepdim=True)
        return self.roi_attn(self.roi_norm(x), keys)

    def instance_path(self, hidden_states, global_out, attn, instances, size, encoder_hidden_states=None,
                      attn_kwargs=None, blend_record=None):  # blend_record: not filled (no ROI paste to record)
        B, T, C = hidden_states.shape
        H, W = size
        if H * W != T:
            raise ValueError(f"MaskedAttnROICtrlBlock size must satisfy H*W == tokens, got {H}x{W} for {T} tokens")
        device, dtype = hidden_states.device, hidden_states.dtype
        rois = instances.rois(H, W, dtype=torch.float64 if dtype == torch.float64 else torch.float32).to(device)
        batch, slot, N = _dense_index(instances, device)
        K = rois.shape[0]
        # The box mask: the pixels ROI-Unpool would cover, so both methods act on the same region.
        ones = hidden_states.new_ones(K, 1, 1, 1)
        box_mask = roi_ops.roi_unpool(ones, rois, (H, W), spatial_scale=1.0, aligned=True).view(K, T) > 0

        text = instances.instance_embeddings.to(device=device, dtype=dtype)
        kwargs = dict(attn_kwargs or {})
        kwargs.pop("ip_adapter_masks", None)
        x = attn.forward(  # every instance's caption on every token of its sample: [K, H*W, C]
            hidden_states.index_select(0, batch),
            encoder_hidden_states=_gather_encoder_states(encoder_hidden_states, text, batch),
            attention_mask=None,
            **kwargs,
        )
        if self.masked_self_attention:
            x = x + torch.tanh(self.roi_gate).to(dtype) * self.masked_roi_self_attention(x, box_mask)

        # Blend over the stacked full-resolution outputs, masked outside each box.
        stack = global_out.new_zeros(B, N + 1, T, C)
        stack[:, 0] = global_out
        stack.index_put_((batch, slot + 1), x)
        logits = self.blend_proj(stack).squeeze(-1).to(_softmax_dtype(stack))  # [B, N+1, T]
        valid = torch.zeros(B, N + 1, T, dtype=torch.bool, device=device)
        valid[:, 0] = True
        valid.index_put_((batch, slot + 1), box_mask)
        weights = torch.softmax(logits.masked_fill(~valid, float("-inf")), dim=1).to(dtype)
        out = (stack * weights.unsqueeze(-1)).sum(1)
        return out, weights[:, 0].reshape(B, H, W), rois


#: Benchmark method name -> block class and constructor overrides.
METHODS = {
    "fused": (ROICtrlBlock, {"fused_blend": True}),
    "unfused": (ROICtrlBlock, {"fused_blend": False}),
    "naive": (NaiveROICtrlBlock, {}),
    "masked": (MaskedAttnROICtrlBlock, {}),
    "masked_xattn": (MaskedAttnROICtrlBlock, {"masked_self_attention": False}),
}


def make_block(method: str, dim: int, heads: int, position_dim: int, grid: int, ff_mult: int = 4) -> ROICtrlBlock:
    """One block of ``method`` (a key of :data:`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    cls, overrides = METHODS[method]
    return cls(dim, heads, position_dim, grid, ff_mult, **overrides)
