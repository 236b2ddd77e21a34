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
from .options import ArchitectureOptions


def blend(
    base: torch.Tensor,
    base_logit: torch.Tensor,
    input: torch.Tensor,
    input_logit: torch.Tensor,
    boxes: torch.Tensor,
    spatial_scale: float = 1.0,
    aligned: bool = False,
    unpool: str = "exact",
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
        unpool: ``"exact"`` (``roi_ops.roi_unpool``, coverage by geometry) or ``"official"`` (the official
            release's :func:`roi_unpool_quantized` with ``aligned=True``, and its coverage rule: a pixel is covered
            by an ROI where the pasted features do not sum to exactly 0).

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
    values, logits, covered = paste_for_blend(input, input_logit, boxes, (H, W), spatial_scale, aligned, unpool)
    # Softmax in float32 for half types (float64 stays float64), as the ops accumulate.
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    logits = logits.to(acc)

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


def paste_for_blend(
    input: torch.Tensor,
    input_logit: torch.Tensor,
    boxes: torch.Tensor,
    size: tuple[int, int],
    spatial_scale: float = 1.0,
    aligned: bool = False,
    unpool: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paste-back step of :func:`blend`: ``(values [K, C, H, W], logits [K, H, W], covered [K, H, W] bool)``.

    ``unpool="exact"``: ``roi_ops.roi_unpool``, covered by geometry; ``"official"``: :func:`roi_unpool_quantized`
    with the official coverage rule (a pixel is covered where the pasted features do not sum to exactly 0).
    """
    K, C = input.shape[:2]
    H, W = size
    if unpool == "official":
        pasted = roi_unpool_quantized(
            torch.cat([input, input_logit.unsqueeze(1).to(input.dtype)], dim=1), boxes, (H, W), spatial_scale
        )
        values, logits = pasted[:, :C], pasted[:, C]
        covered = values.sum(1) != 0  # the official rule: zeroed rims fall back to the global output
    elif unpool == "exact":
        ones = input.new_ones(K, 1, input.shape[2], input.shape[3])
        # One paste for values, logits and coverage: the ones channel is > 0 exactly on covered pixels.
        pasted = roi_ops.roi_unpool(
            torch.cat([input, input_logit.unsqueeze(1).to(input.dtype), ones], dim=1),
            boxes,
            (H, W),
            spatial_scale=spatial_scale,
            aligned=aligned,
        )
        values, logits, covered = pasted[:, :C], pasted[:, C], pasted[:, C + 1] > 0
    else:
        raise ValueError(f"blend unpool must be 'exact' or 'official', got {unpool!r}")
    return values, logits, covered


def instance_weights(
    base_weight: torch.Tensor,
    base_logit: torch.Tensor,
    logits: torch.Tensor,
    covered: torch.Tensor,
    boxes: torch.Tensor,
) -> torch.Tensor:
    """``Tensor[K, H, W]``: each instance's weight in the per-pixel softmax of :func:`blend` (the blend maps).

    ``w_k = W_global * exp(l_k - l_global)`` where instance ``k`` covers, 0 elsewhere (in log space, so no
    overflow); ``base_weight`` is what the blend returned, ``logits`` and ``covered`` what
    :func:`paste_for_blend` gave it, ``boxes`` the ROI rows (their batch index picks the image).
    """
    H, W = logits.shape[-2:]
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    b = boxes[:, 0].long()
    log_w = base_weight.to(acc)[b].log() + logits.to(acc) - base_logit.to(acc).reshape(-1, H, W)[b]
    return torch.where(covered, log_w.exp(), torch.zeros((), dtype=acc, device=logits.device))


def _quantized_axis(lo: torch.Tensor, hi: torch.Tensor, pooled: int, size: int):
    """One axis of :func:`roi_unpool_quantized`: ``[K, size, pooled]`` tap weights (illegal taps dropped),
    ``[K, size]`` inside-the-box flags and ``[K, size]`` sums of the legal weights."""
    start = torch.ceil(lo - 0.5)
    end = torch.ceil(hi - 0.5)
    pix = torch.arange(size, device=lo.device, dtype=lo.dtype)
    inside = (pix >= start[:, None]) & (pix < end[:, None])
    pos = (pix - start[:, None]) / (end - start)[:, None] * pooled
    pos = torch.where(inside, pos, torch.zeros_like(pos))  # outside the box: any value, masked below
    low = pos.floor()
    frac = pos - low
    high_legal = (pos.ceil() < pooled).to(pos.dtype)
    low_i = low.long().clamp(max=pooled - 1)
    high_i = pos.ceil().long().clamp(max=pooled - 1)
    taps = torch.zeros(*pos.shape, pooled, dtype=pos.dtype, device=pos.device)
    taps.scatter_add_(-1, low_i.unsqueeze(-1), (1 - frac).unsqueeze(-1))
    taps.scatter_add_(-1, high_i.unsqueeze(-1), (frac * high_legal).unsqueeze(-1))
    return taps, inside, (1 - frac) + frac * high_legal


def roi_unpool_quantized(
    input: torch.Tensor, boxes: torch.Tensor, output_size: tuple[int, int], spatial_scale: float = 1.0
) -> torch.Tensor:
    """ROI-Unpool as the official ROICtrl release computes it (its CUDA op with ``aligned=True``), in PyTorch.

    For a box with corners ``c1 <= c2`` (feature units ``c * spatial_scale``), the covered pixels along an axis are
    ``ceil(c1 - 0.5) <= h < ceil(c2 - 0.5)`` (quantised, half-open); pixel ``h`` reads the grid at
    ``(h - start) / (end - start) * pooled`` (no half-cell offset) by bilinear interpolation whose taps outside
    the grid are dropped, and a pixel whose remaining weights sum to less than ``1 - 1e-5`` gets 0 (the zeroed
    rim along the far edges of boxes larger than the grid). Uncovered pixels are 0.

    Unlike ``roi_ops.roi_unpool`` this is not the adjoint of ROI-Align and leaves holes: use it to reproduce the
    released model, not otherwise. ``input`` ``Tensor[K, C, PH, PW]``, ``boxes`` ``Tensor[K, 5]``; returns
    ``Tensor[K, C, H, W]``. Materialises ``[K, C, H, W]`` (autograd through plain tensor ops).
    """
    if input.dim() != 4 or boxes.dim() != 2 or boxes.shape[1] != 5 or boxes.shape[0] != input.shape[0]:
        raise ValueError(
            "roi_unpool_quantized needs input Tensor[K, C, PH, PW] and boxes Tensor[K, 5] with the same K, got "
            f"input {list(input.shape)} and boxes {list(boxes.shape)}"
        )
    H, W = output_size
    K, C, PH, PW = input.shape
    coord = torch.float64 if input.dtype == torch.float64 else torch.float32
    b = boxes.to(coord) * spatial_scale
    my, in_y, sum_y = _quantized_axis(b[:, 2], b[:, 4], PH, H)
    mx, in_x, sum_x = _quantized_axis(b[:, 1], b[:, 3], PW, W)
    keep = (in_y[:, :, None] & in_x[:, None, :]) & ((1 - sum_y[:, :, None] * sum_x[:, None, :]) < 1e-5)
    rows = torch.matmul(my.to(input.dtype).unsqueeze(1), input)  # [K, C, H, PW]
    out = torch.matmul(rows, mx.to(input.dtype).transpose(1, 2).unsqueeze(1))  # [K, C, H, W]
    return out * keep.unsqueeze(1).to(input.dtype)


def coverage(
    boxes: torch.Tensor,
    batch_size: int,
    size: tuple[int, int],
    aligned: bool = True,
    unpool: str = "exact",
    grid: int = 1,
) -> torch.Tensor:
    """``BoolTensor[B, H, W]``: pixels covered by at least one ROI of their image (ROI-Unpool's coverage rule).

    With ``unpool="official"``, that of :func:`roi_unpool_quantized` for a ``grid x grid`` ROI grid (always
    aligned): its zeroed rims, which depend on the grid size, are not covered."""
    H, W = size
    if boxes.shape[0] == 0:
        return torch.zeros(batch_size, H, W, dtype=torch.bool, device=boxes.device)
    if unpool == "official":
        ones = torch.ones(boxes.shape[0], 1, grid, grid, device=boxes.device, dtype=boxes.dtype)
        pasted = roi_unpool_quantized(ones, boxes, (H, W))[:, 0]
    else:
        # Coverage depends on the box only, so a 1x1 grid of ones is enough.
        ones = torch.ones(boxes.shape[0], 1, 1, 1, device=boxes.device)
        pasted = roi_ops.roi_unpool(ones, boxes, (H, W), spatial_scale=1.0, aligned=aligned)[:, 0]
    counts = torch.zeros(batch_size, H, W, device=boxes.device)
    return counts.index_put((boxes[:, 0].long(),), pasted.to(counts.dtype), accumulate=True) > 0


class BoxEncoder(nn.Module):
    """Fourier features of box coordinates -> MLP -> one position token per instance.

    Only the coordinates go in (no caption), so the guidance path cannot leak attributes between instances.
    ``Tensor[K, 4]`` in ``[0, 1]`` -> ``Tensor[K, out_dim]``.

    Args:
        fourier: ``"pow2_pi"`` (frequencies ``2**k * pi``, features [coordinate, sin/cos, frequency]) or
            ``"gligen"`` (the official release and GLIGEN: ``100 ** (k / num_freqs)``, [frequency, sin/cos,
            coordinate]).
        null_token: add ``null_feature``, a learned Fourier feature that stands in for padded slots
            (:meth:`null_token`).
    """

    def __init__(
        self,
        out_dim: int,
        num_freqs: int = 8,
        hidden_dim: int = 512,
        fourier: str = "pow2_pi",
        null_token: bool = False,
    ):
        super().__init__()
        if fourier not in ("pow2_pi", "gligen"):
            raise ValueError(f"BoxEncoder fourier must be 'pow2_pi' or 'gligen', got {fourier!r}")
        self.num_freqs, self.fourier = num_freqs, fourier
        self.mlp = nn.Sequential(
            nn.Linear(8 * num_freqs, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )
        # Zero at init, as in the official code.
        self.null_feature = nn.Parameter(torch.zeros(8 * num_freqs)) if null_token else None

    def features(self, boxes: torch.Tensor) -> torch.Tensor:
        """The Fourier features ``Tensor[K, 8 * num_freqs]`` that enter the MLP."""
        # float32 features (float64 for a float64 encoder): the box coordinates need the precision.
        dtype = torch.float64 if self.mlp[0].weight.dtype == torch.float64 else torch.float32
        angles = boxes.to(dtype).unsqueeze(-1) * self.frequencies(boxes.device).to(dtype)  # [K, 4, F]
        if self.fourier == "pow2_pi":
            return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)
        return torch.stack([angles.sin(), angles.cos()], dim=-1).permute(0, 2, 3, 1).flatten(1)  # [K, F, 2, 4]

    def frequencies(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``Tensor[num_freqs]``, float32 whatever the module's dtype (not a buffer, so ``.half()`` cannot round
        them: 402.12 would become 402.0 and shift the angles of a float16 adapter)."""
        k = torch.arange(self.num_freqs, dtype=torch.float32, device=device)
        # Computed in float32 as the official code does (its float64 runs use these rounded values too).
        return (2.0**k) * math.pi if self.fourier == "pow2_pi" else 100.0 ** (k / self.num_freqs)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(boxes).to(self.mlp[0].weight.dtype))

    def null_token(self) -> torch.Tensor:
        """``Tensor[out_dim]``: the position token of a padded slot (the MLP of ``null_feature``)."""
        if self.null_feature is None:
            raise RuntimeError("this BoxEncoder has no null token (built with null_token=False)")
        return self.mlp(self.null_feature.unsqueeze(0))[0]


class SelfAttention(nn.Module):
    """Multi-head self-attention over ``Tensor[B, T, C]`` with an optional key mask ``BoolTensor[B, T]``.

    ``dropout`` applies to the output projection's result in training mode (as diffusers' ``Attention``)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"SelfAttention dim must be divisible by heads, got dim={dim}, heads={heads}")
        self.heads, self.dropout = heads, dropout
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
        return F.dropout(self.to_out(out.transpose(1, 2).reshape(B, T, C)), self.dropout, self.training)


class GEGLU(nn.Module):
    """``proj`` Linear(dim -> 2 * inner); the first half times the exact GELU of the second (diffusers' GEGLU)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    """``net.0`` (Linear + tanh-GELU, or :class:`GEGLU` with ``activation="geglu"``), dropout, ``net.2`` Linear."""

    def __init__(self, dim: int, mult: int = 4, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        if activation == "gelu":
            self.net = nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, dim))
        elif activation == "geglu":
            # Same indices as diffusers' FeedForward: net.0.proj, net.1 (dropout), net.2.
            self.net = nn.Sequential(GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim))
        else:
            raise ValueError(f"FeedForward activation must be 'gelu' or 'geglu', got {activation!r}")
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.net[0], GEGLU):
            return self.net(x)  # net.1 is the dropout
        return self.net[2](F.dropout(self.net[1](self.net[0](x)), self.dropout, self.training))


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
       the global output and the instances covering it, by the fused ``roi_ops.roi_unpool_blend`` (memory of the
       feature map plus the ROI grids, whatever the instance count) or, with ``fused_blend=False`` or
       ``unpool="official"``, the unfused :func:`blend` (same function, materialises ``[B, N, C, H, W]``);
    5. box-coordinate guidance on the residual stream: gated self-attention over [visual tokens; position
       tokens], then a gated feed-forward (both gates zero at init).

    Args:
        dim: channels ``C`` of the layer. heads: attention heads of the new self-attentions.
        position_dim: width of the shared box encoder's tokens. grid: ROI grid side. ff_mult: FF expansion.
        fused_blend: step 4 by the fused op (default) or by the unfused :func:`blend`.
        options: the :class:`~roi_ops.roictrl_adapter.options.ArchitectureOptions` (default: roi-ops' design).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        position_dim: int,
        grid: int,
        ff_mult: int = 4,
        fused_blend: bool = True,
        options: ArchitectureOptions | None = None,
    ):
        super().__init__()
        options = ArchitectureOptions() if options is None else options
        self.dim, self.grid, self.fused_blend, self.options = dim, grid, fused_blend, options
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
        self.guide_ff_norm = nn.LayerNorm(dim)
        self.guide_ff = FeedForward(dim, ff_mult, options.ff_activation, options.dropout)
        self.guide_ff_gate = nn.Parameter(torch.zeros(()))
        # Set by ROICtrlPipeline(return_blend_maps=True): keep (base_logit, pasted logits, covered, rois) of the
        # last call, what instance_weights needs.
        self.keep_blend_logits = False
        self.blend_logits: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

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

    def _paste(self, grids: torch.Tensor, rois: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.options.unpool == "official":
            return roi_unpool_quantized(grids, rois, size)
        return roi_ops.roi_unpool(grids, rois, size, spatial_scale=1.0, aligned=True)

    def _gate_logits(self, base_logit, inst_logit, rois, instances, size):
        """The official channel gate: scale every slot's logits by ``sigmoid(MLP(max-pooled logit maps))``."""
        B = base_logit.shape[0]
        S = self.options.max_instances
        device = base_logit.device
        # Max over the pasted map, 0 where the slot does not cover (as the official code pools its dense maps).
        inst_max = self._paste(inst_logit.unsqueeze(1), rois, size).amax(dim=(1, 2, 3))
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
        return base_logit * scale[:, 0, None, None], inst_logit * scale[batch, position + 1][:, None, None]

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
        if K == 0:  # only reached with guide_empty_samples: nothing to paste
            return global_out, global_out.new_ones(B, H, W), rois
        feature_map = hidden_states.reshape(B, H, W, C).permute(0, 3, 1, 2)  # channels_last view, no copy
        crops = roi_ops.roi_align(
            feature_map, rois, (P, P), spatial_scale=1.0, sampling_ratio=self.options.sampling_ratio, aligned=True
        )
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
        if self.options.channel_gate:
            base_logit, inst_logit = self._gate_logits(base_logit, inst_logit, rois, instances, size)
        grid_values = x.transpose(1, 2).reshape(K, C, P, P)
        base = global_out.reshape(B, H, W, C).permute(0, 3, 1, 2)
        if self.options.unpool == "official":  # no fused form of the quantised paste
            out, base_weight = blend(base, base_logit, grid_values, inst_logit, rois, 1.0, True, "official")
        else:
            out, base_weight = self._blend(base, base_logit, grid_values, inst_logit, rois, 1.0, True)
        if self.keep_blend_logits:  # the pipeline's blend maps: the logits pasted as the blend pasted them
            _, logits, covered = paste_for_blend(
                grid_values.detach(), inst_logit.detach(), rois, size, 1.0, True, self.options.unpool
            )
            self.blend_logits = (base_logit.detach(), logits, covered, rois)
        return out.permute(0, 2, 3, 1).reshape(B, T, C), base_weight, rois

    def box_guidance(
        self,
        residual: torch.Tensor,
        position_tokens: torch.Tensor,
        instances: ROICtrlInstances,
        rows: torch.Tensor | None = None,
        null_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Step 5. ``residual`` is ``[S, T, C]``: the batch rows ``rows`` (default ``instances.sample_index``, the
        samples with instances), ``position_tokens`` ``[K, position_dim]``; returns the residual update.

        With ``position_padding="null_token"`` every row attends to ``max_instances`` tokens, padded slots holding
        ``null_position`` (``[position_dim]``), without a key mask; otherwise only to its real instances."""
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
            key_valid = None  # every slot attended, as the official code
        else:
            index = (inst_rows, instances.slot_index.to(device))
            slots = instances.max_instances_per_sample
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
        null_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Replace the layer's cross-attention output.

        The caller's block then adds the result to ``residual`` as it would the plain output. Samples with no
        valid instance get ``global_out`` back bitwise (unless ``guide_empty_samples``: then the guidance runs on
        them too); for the others the result is ``global_out + scale * (blended + guidance - global_out)``.
        ``null_position`` is the box encoder's null token, needed with ``position_padding="null_token"``.

        Returns ``(new_output [B, T, C], stats)`` where ``stats`` holds ``base_weight`` ``[B, H, W]`` and
        ``covered`` ``BoolTensor[B, H, W]`` for the fusion-weight regulariser.
        """
        empty_too = self.options.guide_empty_samples
        if instances.num_instances == 0 and not empty_too:
            shape = (global_out.shape[0], *size)
            covered = torch.zeros(shape, dtype=torch.bool, device=global_out.device)
            return global_out, {"base_weight": global_out.new_ones(shape), "covered": covered}
        self.check_slots(instances)
        blended, base_weight, rois = self.instance_path(
            hidden_states, global_out, attn, instances, size, encoder_hidden_states, attn_kwargs
        )
        B = global_out.shape[0]
        sel = torch.arange(B, device=global_out.device) if empty_too else instances.sample_index.to(global_out.device)
        blended_rows = blended.index_select(0, sel)
        delta = self.box_guidance(
            residual.index_select(0, sel) + blended_rows, position_tokens, instances, sel, null_position
        )
        new_rows = blended_rows + delta
        if instances.scale != 1.0:
            g = global_out.index_select(0, sel)
            new_rows = g + instances.scale * (new_rows - g)
        out = global_out.index_copy(0, sel, new_rows)
        covered = coverage(rois, B, size, unpool=self.options.unpool, grid=self.grid)
        return out, {"base_weight": base_weight, "covered": covered}
