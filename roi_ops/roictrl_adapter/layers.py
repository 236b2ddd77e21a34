"""The generic layers of a ROICtrl block: the box encoder, self-attention and feed-forward.

Plain PyTorch modules with diffusers-compatible parameter names; nothing here knows about ROIs or pasting.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GEGLU", "BoxEncoder", "FeedForward", "SelfAttention", "fourier_frequencies", "fourier_features",
           "pixel_boxes"]


def fourier_frequencies(num_freqs: int, style: str, device: torch.device | str | None = None) -> torch.Tensor:
    """``Tensor[num_freqs]``, float32: ``2**k * pi`` (``"pow2_pi"``) or ``100 ** (k / num_freqs)`` (``"gligen"``)."""
    k = torch.arange(num_freqs, dtype=torch.float32, device=device)
    # Computed in float32 as the official code does (its float64 runs use these rounded values too).
    return (2.0**k) * math.pi if style == "pow2_pi" else 100.0 ** (k / num_freqs)


def fourier_features(boxes: torch.Tensor, num_freqs: int, style: str, dtype: torch.dtype) -> torch.Tensor:
    """Fourier features ``Tensor[K, 8 * num_freqs]`` of ``Tensor[K, 4]`` boxes, in ``dtype``: ``"pow2_pi"``
    orders them [coordinate, sin/cos, frequency], ``"gligen"`` [frequency, sin/cos, coordinate]."""
    angles = boxes.to(dtype).unsqueeze(-1) * fourier_frequencies(num_freqs, style, boxes.device).to(dtype)  # [K, 4, F]
    if style == "pow2_pi":
        return torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(1)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).permute(0, 2, 3, 1).flatten(1)  # [K, F, 2, 4]


def pixel_boxes(size: tuple[int, int], device: torch.device | str | None = None) -> torch.Tensor:
    """``Tensor[H*W, 4]``: every pixel centre of an ``H x W`` map (row-major) as the point box ``(x, y, x, y)`` in
    ``[0, 1]`` image coordinates, float32."""
    H, W = size
    y = (torch.arange(H, dtype=torch.float32, device=device) + 0.5) / H
    x = (torch.arange(W, dtype=torch.float32, device=device) + 0.5) / W
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    points = torch.stack([xx.flatten(), yy.flatten()], dim=1)
    return torch.cat([points, points], dim=1)


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
        return fourier_features(boxes, self.num_freqs, self.fourier, dtype)

    def frequencies(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``Tensor[num_freqs]``, float32 whatever the module's dtype (not a buffer, so ``.half()`` cannot round
        them: 402.12 would become 402.0 and shift the angles of a float16 adapter)."""
        return fourier_frequencies(self.num_freqs, self.fourier, device)

    def forward(self, boxes: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(boxes).to(self.mlp[0].weight.dtype))

    def null_token(self) -> torch.Tensor:
        """``Tensor[out_dim]``: the position token of a padded slot (the MLP of ``null_feature``)."""
        if self.null_feature is None:
            raise RuntimeError("this BoxEncoder has no null token (built with null_token=False)")
        return self.mlp(self.null_feature.unsqueeze(0))[0]


class SelfAttention(nn.Module):
    """Multi-head attention of ``Tensor[B, T, C]`` queries over their own tokens or over ``context``.

    ``key_valid`` ``BoolTensor[B, Tk]`` masks keys out; ``key_bias`` ``Tensor[B, Tk]`` is added to every query's
    score of each key (0 nowhere changes nothing). With neither, no mask reaches the attention kernel.
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

    def forward(
        self,
        x: torch.Tensor,
        key_valid: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
        groups: list[tuple[int, int]] | None = None,
    ) -> torch.Tensor:
        """``x`` ``[B, T, C]``; or, with ``groups`` (a list of ``(B_g, T_g)``), the rows ``[sum B_g * T_g, C]`` of
        several token groups laid one after another: self-attention within each of the ``B_g`` sequences of
        ``T_g`` tokens, the result laid out as ``x``. The projections then run once over every group's rows (one
        read of each weight and one weight gradient per call, not one per group)."""
        if groups is not None:
            if key_valid is not None or context is not None or key_bias is not None:
                raise ValueError("SelfAttention over groups takes no key_valid, context or key_bias")
            return self._forward_groups(x, groups)
        B, T, C = x.shape
        context = x if context is None else context
        q, k, v = self._heads(self.to_q(x), B), self._heads(self.to_k(context), B), self._heads(self.to_v(context), B)
        mask = None
        if key_bias is not None:
            mask = key_bias if key_valid is None else key_bias.masked_fill(~key_valid, float("-inf"))
            mask = mask.to(q.dtype)[:, None, None, :]
        elif key_valid is not None:
            mask = key_valid[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return F.dropout(self.to_out(out.transpose(1, 2).reshape(B, T, C)), self.dropout, self.training)

    def _heads(self, t: torch.Tensor, B: int) -> torch.Tensor:
        """``[B * T, C]`` or ``[B, T, C]`` projections -> ``[B, heads, T, C / heads]`` (a view)."""
        return t.view(B, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

    def _forward_groups(self, rows: torch.Tensor, groups: list[tuple[int, int]]) -> torch.Tensor:
        C = rows.shape[-1]
        q, k, v = self.to_q(rows), self.to_k(rows), self.to_v(rows)
        outs, start = [], 0
        for B, T in groups:
            part = slice(start, start + B * T)
            start += B * T
            heads = [self._heads(t[part], B) for t in (q, k, v)]
            outs.append(F.scaled_dot_product_attention(*heads).transpose(1, 2).reshape(B * T, C))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return F.dropout(self.to_out(out), self.dropout, self.training)


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

