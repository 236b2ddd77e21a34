"""An independent oracle of one ROICtrl adapter layer (docs/adapter.md, "How one layer works"; ROICtrl, Gu et
al., CVPR 2025), in plain tensor code.

Nothing here calls a method of ``ROICtrlBlock``, ``BoxEncoder``, their sub-modules, the diffusers ``Attention``
or a roi_ops kernel: the oracle reads the modules' *parameters* and does the arithmetic itself (attention as an
explicit softmax, layer norms, GELU, the Fourier features), crops and pastes back with ``roi_ops.reference``
(the pure-PyTorch, float64-exact reference of the ops), and blends with an explicit per-pixel softmax. It also
walks the batch one sample at a time over that sample's valid instances, where the block works on the compacted
instance list with masks and index bookkeeping, so the two share no structure that a bug could hide in.

It covers the adapter's default configuration. An architecture option (e.g. the official-release layout) gets
its own branch in the step it changes, keyed on the same constructor option; each step is a separate function.

``KNOCKOUTS`` are single-step deviations of the oracle (``oracle_layer(..., knockout=name)``); the tests check
that every one of them moves the result far beyond the comparison tolerance, i.e. that each step is exercised
strongly enough for a bug in it to fail the comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from roi_ops import reference

KNOCKOUTS = (
    "crop_not_aligned",  # step 1: ROI-Align without the half-pixel shift
    "crop_axes_swapped",  # step 1: boxes mapped to the map with x by H and y by W
    "instance_global_caption",  # step 2: the instance path attends to the global caption
    "roi_gate_no_tanh",  # step 3: gate used raw
    "roi_attention_off",  # step 3: no ROI self-attention
    "roi_attention_no_norm",  # step 3: self-attention on the un-normalised crop tokens
    "logits_off",  # step 4: equal logits (plain average)
    "blend_ignores_coverage",  # step 4: every instance of the image enters every pixel's softmax
    "paste_not_aligned",  # step 4: ROI-Unpool without the half-pixel shift
    "guide_attn_gate_no_tanh",  # step 5
    "guide_no_position_tokens",  # step 5: guidance self-attention over the visual tokens only
    "guide_attn_no_norm",  # step 5
    "guide_ff_gate_no_tanh",  # step 5
    "guide_ff_skips_attention",  # step 5: FF(LN(y)) instead of FF(LN(y + d1))
    "scale_ignored",  # the strength knob
)


# --------------------------------------------------------------------------- primitives


def layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x / (1 + torch.exp(-x))


def linear(x, weight, bias=None):
    y = x @ weight.transpose(0, 1)
    return y if bias is None else y + bias


def attention(query, context, wq, wk, wv, wo, bo, heads, bq=None, bk=None, bv=None):
    """Multi-head attention ``[..., Tq, C] x [..., Tk, D] -> [..., Tq, C]`` with an explicit softmax over keys."""
    q, k, v = linear(query, wq, bq), linear(context, wk, bk), linear(context, wv, bv)
    d = q.shape[-1] // heads

    def split(t):  # [..., T, heads * d] -> [..., heads, T, d]
        return t.reshape(*t.shape[:-1], heads, d).transpose(-3, -2)

    q, k, v = split(q), split(k), split(v)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    out = (weights @ v).transpose(-3, -2)
    return linear(out.reshape(*out.shape[:-2], heads * d), wo, bo)


def pretrained_cross_attention(attn, hidden, context):
    """The layer's diffusers ``Attention`` (plain configuration), from its weights."""
    assert attn.group_norm is None and attn.spatial_norm is None and attn.norm_cross is None, "plain Attention only"
    assert not attn.residual_connection and attn.rescale_output_factor == 1.0, "plain Attention only"
    assert getattr(attn, "norm_q", None) is None and getattr(attn, "norm_k", None) is None, "plain Attention only"
    out = attn.to_out[0]
    return attention(hidden, context, attn.to_q.weight, attn.to_k.weight, attn.to_v.weight, out.weight, out.bias,
                     attn.heads, attn.to_q.bias, attn.to_k.bias, attn.to_v.bias)


def self_attention(p, prefix, x, heads):
    """The adapter's new self-attention ``prefix`` (q, k, v without bias; output projection with bias)."""
    return attention(x, x, p[f"{prefix}.to_q.weight"], p[f"{prefix}.to_k.weight"], p[f"{prefix}.to_v.weight"],
                     p[f"{prefix}.to_out.weight"], p[f"{prefix}.to_out.bias"], heads)


def norm(p, prefix, x):
    return layer_norm(x, p[f"{prefix}.weight"], p[f"{prefix}.bias"])


def pooled_size(size, pool):
    return -(-size[0] // pool), -(-size[1] // pool)


def pool_tokens(x, size, pool):
    """``[H*W, C]`` row-major -> ``[h*w, C]``: the mean of each ``pool x pool`` cell (cut by the map's edge)."""
    H, W = size
    m = x.reshape(H, W, -1)
    h, w = pooled_size(size, pool)
    rows = [m[i * pool : min((i + 1) * pool, H), j * pool : min((j + 1) * pool, W)].mean((0, 1))
            for i in range(h) for j in range(w)]
    return torch.stack(rows)


def cell_means(x, size, pool):
    """``[H*W, C]`` row-major -> the same, every pixel replaced by the mean of its ``pool x pool`` cell."""
    H, W = size
    w = pooled_size(size, pool)[1]
    means = pool_tokens(x, size, pool)
    return torch.stack([means[(i // pool) * w + j // pool] for i in range(H) for j in range(W)])


def resize_tokens(x, size, out_size):
    """``[h*w, C]`` -> ``[H*W, C]``, bilinear with ``align_corners=False``."""
    (h, w), (H, W) = size, out_size
    grid = x.transpose(0, 1).reshape(1, -1, h, w)
    return torch.nn.functional.interpolate(grid, size=(H, W), mode="bilinear", align_corners=False)[0].reshape(
        -1, H * W).transpose(0, 1)


def box_tokens(encoder_params, boxes, num_freqs):
    """Position tokens of normalised boxes ``[..., 4]``: Fourier features (sin, then cos, of ``2^f * pi * coord``
    per coordinate) through the MLP Linear-SiLU-Linear-SiLU-Linear, in the MLP's dtype (float32 at least).

    The frequencies are float32 numbers, as the adapter's; callers pass coordinates that float32 holds exactly,
    so that whether an encoder rounds coordinates to float32 first does not matter."""
    p = encoder_params
    dtype = torch.promote_types(p["mlp.0.weight"].dtype, torch.float32)
    freqs = ((2.0 ** torch.arange(num_freqs, dtype=torch.float32)) * math.pi).to(dtype)
    angles = boxes.to(dtype).unsqueeze(-1) * freqs  # [..., 4, F]
    feats = torch.cat([torch.sin(angles), torch.cos(angles)], -1).flatten(-2).to(p["mlp.0.weight"].dtype)
    h = silu(linear(feats, p["mlp.0.weight"], p["mlp.0.bias"]))
    h = silu(linear(h, p["mlp.2.weight"], p["mlp.2.bias"]))
    return linear(h, p["mlp.4.weight"], p["mlp.4.bias"])


def pixel_features(size, num_freqs, dtype=torch.float32):
    """``[H*W, 8 * num_freqs]`` (row-major pixels): the Fourier features of each pixel centre ``((j + 0.5) / W,
    (i + 0.5) / H)`` (float32 numbers) as the point box ``(x, y, x, y)``, in :func:`box_tokens`' layout,
    computed in ``dtype``."""
    H, W = size
    freqs = ((2.0 ** torch.arange(num_freqs, dtype=torch.float32)) * math.pi).to(dtype)
    rows = []
    for i in range(H):
        for j in range(W):
            x, y = (j + 0.5) / W, (i + 0.5) / H
            angles = torch.tensor([x, y, x, y], dtype=torch.float32).to(dtype)[:, None] * freqs  # [4, F]
            rows.append(torch.cat([torch.sin(angles), torch.cos(angles)], -1).flatten())
    return torch.stack(rows)


# --------------------------------------------------------------------------- one layer


@dataclass
class LayerInputs:
    """What one cross-attention layer hands the adapter (one UNet call)."""

    normed: torch.Tensor  # [B, H*W, C]: norm2(x), attn2's input
    residual: torch.Tensor  # [B, H*W, C]: x, the residual stream entering the cross-attention sub-layer
    text: torch.Tensor  # [B, L, D]: the global caption
    size: tuple[int, int]  # (H, W)


def oracle_layer(
    attn,
    params: dict,
    heads: int,
    grid: int,
    inputs: LayerInputs,
    boxes: torch.Tensor,
    embeddings: torch.Tensor,
    masks: torch.Tensor,
    position_tokens: torch.Tensor,
    scale: float = 1.0,
    knockout: str | None = None,
    grid_policy: str = "fixed",
    guidance_pool: int = 1,
    guidance_kv_pool: int = 1,
    guidance_feed_forward: bool = True,
    guidance_keys: str = "visual",
    fourier_freqs: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's new cross-attention output ``[B, H*W, C]`` and the global output's blending weight
    ``[B, H, W]`` (exactly 1 where no instance covers a pixel; the regulariser's ``W_global``).

    ``params``: the block's parameters by name (``dict(block.named_parameters())``); ``boxes [B, N, 4]``
    normalised, ``embeddings [B, N, L, D]``, ``masks [B, N]``; ``position_tokens [B, N, position_dim]`` (the
    box encoder's tokens, see :func:`box_tokens`).

    ``grid_policy="footprint"``: instance ``n`` gets a ``PH x PW`` grid with ``PH = min(grid, ceil(box height
    in map pixels))`` (``PW`` likewise, at least 1), each instance on its own. ``guidance_pool = p > 1``: step 5
    runs on the map averaged over ``p x p`` cells (the last row / column of cells may be cut by the map's edge)
    and its update is resized back bilinearly (``align_corners=False``). ``guidance_kv_pool = q > 1``: the
    guidance attention's keys and values come from the normed map with every pixel replaced by the mean of its
    ``q x q`` cell (full resolution, piecewise constant), the queries from the map itself.
    ``guidance_feed_forward=False``: step 5 ends after the gated attention. ``guidance_keys="positions"``: the
    guidance attention's keys and values are ``guide_null`` followed by the normed position tokens (no visual
    token), and every pixel's query input is its normed token plus ``guide_pixel_proj`` of its centre's Fourier
    features (:func:`pixel_features`, on the map the guidance runs on).
    """
    assert knockout is None or knockout in KNOCKOUTS, knockout
    p = params
    H, W = inputs.size
    B, T, C = inputs.normed.shape
    ko = knockout
    g = pretrained_cross_attention(attn, inputs.normed, inputs.text)  # the global output
    ones = g.new_ones(H, W)
    if scale == 0:
        return g, ones.expand(B, H, W)
    outs, base_weights = [], []
    for b in range(B):
        valid = [n for n in range(boxes.shape[1]) if bool(masks[b, n])]
        if not valid:
            outs.append(g[b])
            base_weights.append(ones)
            continue
        k = len(valid)
        # step 1: ROI-Align crops of the normed states, boxes mapped onto this H x W map, aligned
        x1, y1, x2, y2 = boxes[b, valid].to(inputs.normed.dtype).unbind(-1)
        sx, sy = (H, W) if ko == "crop_axes_swapped" else (W, H)
        crop_rois = torch.stack([torch.zeros_like(x1), x1 * sx, y1 * sy, x2 * sx, y2 * sy], -1)
        rois = torch.stack([torch.zeros_like(x1), x1 * W, y1 * H, x2 * W, y2 * H], -1)
        feature_map = inputs.normed[b].transpose(0, 1).reshape(1, C, H, W)
        captions = inputs.text[b].expand(k, -1, -1) if ko == "instance_global_caption" else embeddings[b, valid]
        w_proj = p["blend_proj.weight"] * (0 if ko == "logits_off" else 1)
        aligned = ko != "paste_not_aligned"
        values, logit_maps = [], []
        for j, n in enumerate(valid):  # one instance at a time, each on its own grid
            if grid_policy == "footprint":
                bx = [float(c) for c in boxes[b, n]]
                gh = max(1, min(grid, math.ceil((bx[3] - bx[1]) * H)))
                gw = max(1, min(grid, math.ceil((bx[2] - bx[0]) * W)))
            else:
                gh = gw = grid
            crop = reference.roi_align(feature_map, crop_rois[j : j + 1], (gh, gw), 1.0, -1,
                                       aligned=ko != "crop_not_aligned")
            tokens = crop.reshape(1, C, gh * gw).transpose(1, 2)  # [1, PH*PW, C], row-major cells

            # step 2: the layer's own cross-attention on the crop with this instance's caption
            v = pretrained_cross_attention(attn, tokens, captions[j : j + 1].to(tokens.dtype))

            # step 3: gated ROI self-attention within the instance
            if ko != "roi_attention_off":
                gate = p["roi_gate"] if ko == "roi_gate_no_tanh" else torch.tanh(p["roi_gate"])
                a_in = v if ko == "roi_attention_no_norm" else norm(p, "roi_norm", v)
                v = v + gate * self_attention(p, "roi_attn", a_in, heads)

            # step 4 (per instance): logit by one shared 1x1 projection, both pasted back
            inst_logit = linear(v, w_proj).reshape(1, 1, gh, gw)
            grid_values = v.transpose(1, 2).reshape(1, C, gh, gw)
            values.append(reference.roi_unpool(grid_values, rois[j : j + 1], (H, W), 1.0, aligned)[0])
            logit_maps.append(reference.roi_unpool(inst_logit, rois[j : j + 1], (H, W), 1.0, aligned)[0, 0])
        values, logit_maps = torch.stack(values), torch.stack(logit_maps)  # [k, C, H, W], [k, H, W]

        # step 4: per-pixel softmax over g and the covering ROIs
        global_logit = linear(g[b], w_proj).reshape(H, W)
        covered = reference.roi_unpool_coverage(rois, (H, W), 1.0, aligned)  # [k, H, W]
        if ko != "blend_ignores_coverage":
            logit_maps = logit_maps.masked_fill(~covered, float("-inf"))
        weights = torch.softmax(torch.cat([global_logit[None], logit_maps]), 0)  # [1 + k, H, W]
        g_map = g[b].transpose(0, 1).reshape(C, H, W)
        mixed = weights[0] * g_map + (weights[1:, None] * values).sum(0)
        blended_map = torch.where(covered.any(0), mixed, g_map)
        base_weights.append(torch.where(covered.any(0), weights[0], ones))
        blended = blended_map.reshape(C, T).transpose(0, 1)  # [T, C]

        # step 5: box-coordinate guidance on y = x + blended, over [visual tokens; this sample's position tokens]
        y = inputs.residual[b] + blended
        if guidance_pool > 1:
            y = pool_tokens(y, (H, W), guidance_pool)
        pos = linear(position_tokens[b, valid].to(y.dtype), p["position_proj.weight"], p["position_proj.bias"])
        seq = y if ko == "guide_no_position_tokens" else torch.cat([y, pos])
        s_in = seq if ko == "guide_attn_no_norm" else norm(p, "guide_norm", seq)
        context, queries = s_in, s_in
        if guidance_keys == "positions":
            n = y.shape[0]
            y_size = pooled_size((H, W), guidance_pool) if guidance_pool > 1 else (H, W)
            feats = pixel_features(y_size, fourier_freqs, torch.promote_types(y.dtype, torch.float32)).to(y.dtype)
            queries = s_in[:n] + linear(feats, p["guide_pixel_proj.weight"])
            context = torch.cat([p["guide_null"][None], s_in[n:]])
        elif guidance_kv_pool > 1:
            y_size = pooled_size((H, W), guidance_pool) if guidance_pool > 1 else (H, W)
            context = torch.cat([cell_means(s_in[: y.shape[0]], y_size, guidance_kv_pool), s_in[y.shape[0]:]])
        a = "guide_attn"
        attn_out = attention(queries, context, p[f"{a}.to_q.weight"], p[f"{a}.to_k.weight"], p[f"{a}.to_v.weight"],
                             p[f"{a}.to_out.weight"], p[f"{a}.to_out.bias"], heads)[: y.shape[0]]
        gate_a = p["guide_attn_gate"] if ko == "guide_attn_gate_no_tanh" else torch.tanh(p["guide_attn_gate"])
        d1 = gate_a * attn_out
        if not guidance_feed_forward:
            update = d1
        else:
            ff_in = norm(p, "guide_ff_norm", y if ko == "guide_ff_skips_attention" else y + d1)
            ff = linear(gelu_tanh(linear(ff_in, p["guide_ff.net.0.weight"], p["guide_ff.net.0.bias"])),
                        p["guide_ff.net.2.weight"], p["guide_ff.net.2.bias"])
            gate_f = p["guide_ff_gate"] if ko == "guide_ff_gate_no_tanh" else torch.tanh(p["guide_ff_gate"])
            update = d1 + gate_f * ff
        if guidance_pool > 1:
            update = resize_tokens(update, pooled_size((H, W), guidance_pool), (H, W))
        new = blended + update

        # strength: g + scale * (ROICtrl output - g)
        s = 1.0 if ko == "scale_ignored" else scale
        outs.append(g[b] + s * (new - g[b]))
    return torch.stack(outs), torch.stack(base_weights)
