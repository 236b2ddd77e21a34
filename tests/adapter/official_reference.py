"""The "official semantics" reference: the official ROICtrl block's forward re-implemented in plain PyTorch from
its description (../shared/design/OFFICIAL_ROICTRL.md, checked against showlab/ROICtrl), independent of
roi_ops.roictrl_adapter. It reads the weights by their OFFICIAL names, so a comparison against the converted
adapter also checks the converter's key mapping.

Also: the official key list as a formula of the block widths (checked against the released key list in
data/official_roictrl_sd14_keys.json) and a synthetic official-format state dict.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F

from roi_ops import reference

GRIDS = {8: 25, 16: 19, 32: 13, 64: 7}
SLOTS = 30


# ------------------------------------------------------------------------------------------- key list / weights
def transformer_block_paths(unet) -> list[str]:
    """Module paths of the cross-attention BasicTransformerBlocks, in module (file) order: down, mid, up."""
    return [n for n, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]


def official_shapes(blocks: list[tuple[str, int]]) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for blocks ``(path, width C)`` (written from the module tree of the release)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path, C in blocks:
        p = f"{path}.roifuser."
        for gate in ("alpha_roi_self_attn", "alpha_coord_self_attn", "alpha_dense"):
            shapes[p + gate] = ()
        for norm in ("norm1", "norm2", "norm3"):
            shapes[f"{p}{norm}.weight"] = (C,)
            shapes[f"{p}{norm}.bias"] = (C,)
        for attn in ("roi_self_attn", "coord_self_attn"):
            for proj in ("to_q", "to_k", "to_v"):
                shapes[f"{p}{attn}.{proj}.weight"] = (C, C)
            shapes[f"{p}{attn}.to_out.0.weight"] = (C, C)
            shapes[f"{p}{attn}.to_out.0.bias"] = (C,)
        shapes[p + "roiattn_fuser.channel_reduction.weight"] = (1, C, 1, 1)
        for i in (0, 2):
            shapes[f"{p}roiattn_fuser.channel_gate.mlp.{i}.weight"] = (SLOTS + 1, SLOTS + 1)
            shapes[f"{p}roiattn_fuser.channel_gate.mlp.{i}.bias"] = (SLOTS + 1,)
        shapes[p + "context_proj.weight"] = (C, 64)
        shapes[p + "context_proj.bias"] = (C,)
        shapes[p + "ff.net.0.proj.weight"] = (8 * C, C)
        shapes[p + "ff.net.0.proj.bias"] = (8 * C,)
        shapes[p + "ff.net.2.weight"] = (C, 4 * C)
        shapes[p + "ff.net.2.bias"] = (C,)
    shapes["position_net.null_position_feature"] = (64,)
    for i, (o, n) in enumerate(((512, 64), (512, 512), (64, 512))):
        shapes[f"position_net.linears.{2 * i}.weight"] = (o, n)
        shapes[f"position_net.linears.{2 * i}.bias"] = (o,)
    return shapes


def unet_official_shapes(unet) -> dict[str, tuple[int, ...]]:
    return official_shapes([(p, unet.get_submodule(p).norm2.normalized_shape[0]) for p in transformer_block_paths(unet)])


def synthetic_state_dict(shapes: dict, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random official-format weights with every gate well away from 0 (so every path matters)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if key.endswith(("alpha_roi_self_attn", "alpha_coord_self_attn", "alpha_dense")):
            sign = 1.0 if torch.rand((), generator=g) > 0.5 else -1.0
            t = torch.tensor(sign * (0.5 + float(torch.rand((), generator=g))))
        elif ".norm" in key and key.endswith(".weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("null_position_feature"):
            t = torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) * (1.5 if "channel_reduction" in key else 1.0) / math.sqrt(fan_in)
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        out[key] = t.to(dtype)
    return out


# ------------------------------------------------------------------------------------------- the official block
def _ln(x, w, p):
    return F.layer_norm(x, x.shape[-1:], w[p + ".weight"], w[p + ".bias"], 1e-5)


def _linear(x, w, p, bias=True):
    return F.linear(x, w[p + ".weight"], w[p + ".bias"] if bias else None)


def _attention(x, w, p, heads):
    """diffusers Attention(query_dim=C, heads, dim_head=C/heads), self-attention, no mask; eval mode."""
    B, T, C = x.shape
    q, k, v = (_linear(x, w, f"{p}.to_{n}", bias=False).view(B, T, heads, -1).transpose(1, 2) for n in "qkv")
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // heads)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
    return _linear(out, w, f"{p}.to_out.0")


def fourier(boxes):
    """[..., 4] -> [..., 64]: 100 ** (k / 8), k = 0..7, features ordered [frequency, sin/cos, coordinate]."""
    freqs = (100 ** (torch.arange(8) / 8)).to(boxes.dtype)  # float32 values, as the release computes them
    angle = boxes.unsqueeze(-2) * freqs.view(8, 1)  # [..., 8 (freq), 4 (coord)]
    return torch.stack([angle.sin(), angle.cos()], dim=-2).flatten(-3)  # [..., 8, 2, 4]


def position_net(w, boxes, masks):
    """[B, 30, 4], [B, 30] -> [B, 30, 64]; padded slots take the learned null feature before the MLP."""
    feat = fourier(boxes)
    m = masks.unsqueeze(-1).to(feat.dtype)
    feat = feat * m + (1 - m) * w["position_net.null_position_feature"]
    h = F.silu(_linear(feat, w, "position_net.linears.0"))
    h = F.silu(_linear(h, w, "position_net.linears.2"))
    return _linear(h, w, "position_net.linears.4")


def unpool_one(grid, box, scale, H, W):
    """The release's CUDA unpool for one ROI, pixel by pixel (vectorised over pixels): ``grid`` [C, P, P]."""
    C, P, _ = grid.shape
    x1, y1, x2, y2 = (float(v) * scale for v in box)
    sw, sh, ew, eh = (math.ceil(v - 0.5) for v in (x1, y1, x2, y2))
    out = grid.new_zeros(C, H, W)
    if ew <= sw or eh <= sh:
        return out
    h = torch.arange(H, dtype=grid.dtype).view(H, 1).expand(H, W)
    w_ = torch.arange(W, dtype=grid.dtype).view(1, W).expand(H, W)
    inside = (h >= sh) & (h < eh) & (w_ >= sw) & (w_ < ew)
    y = (h - sh) / (eh - sh) * P
    x = (w_ - sw) / (ew - sw) * P
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.where(inside, x, torch.zeros_like(x))
    yl, xl = y.long(), x.long()  # truncation == floor for y >= 0
    yh, xh = torch.ceil(y).long(), torch.ceil(x).long()
    ly, lx = y - yl, x - xl
    hy, hx = 1 - ly, 1 - lx
    total = torch.zeros_like(y)
    val = grid.new_zeros(C, H, W)
    for yi, xi, wt in ((yl, xl, hy * hx), (yl, xh, hy * lx), (yh, xl, ly * hx), (yh, xh, ly * lx)):
        legal = (yi >= 0) & (yi < P) & (xi >= 0) & (xi < P)
        wt = torch.where(legal, wt, torch.zeros_like(wt))
        total = total + wt
        val = val + wt * grid[:, yi.clamp(0, P - 1), xi.clamp(0, P - 1)]
    keep = inside & ((1 - total) < 1e-5)
    return torch.where(keep, val, torch.zeros_like(val))


def roifuser(w, prefix, heads, normed, hidden, attn_out, attn2, boxes, masks, emb, image_size, objs, perm=None):
    """One official ROIFuser: returns the new residual stream [B, T, C]."""
    B, T, C = normed.shape
    ds = int(math.sqrt(image_size[0] * image_size[1] / T))
    H, W = image_size[0] // ds, image_size[1] // ds
    P = GRIDS[ds]
    px = torch.tensor([image_size[1], image_size[0]] * 2, dtype=normed.dtype)
    boxes_px = boxes.to(normed.dtype) * px  # [B, 30, 4] image pixels
    index = torch.arange(B, dtype=normed.dtype).repeat_interleave(SLOTS).unsqueeze(1)
    rois = torch.cat([index, boxes_px.flatten(0, 1)], 1)
    fmap = normed.transpose(1, 2).reshape(B, C, H, W)
    crops = reference.roi_align(fmap, rois, (P, P), spatial_scale=1.0 / ds, sampling_ratio=2, aligned=True)
    tokens = crops.flatten(2).transpose(1, 2)  # [B*30, P*P, C]
    valid = masks.flatten().bool()
    inst = torch.zeros_like(tokens)
    if valid.any():
        inst[valid] = attn2(tokens[valid], encoder_hidden_states=emb.flatten(0, 1)[valid].to(tokens.dtype))
        sa = torch.zeros_like(tokens)
        sa[valid] = _attention(_ln(inst[valid], w, prefix + "norm1"), w, prefix + "roi_self_attn", heads)
        inst = inst + torch.tanh(w[prefix + "alpha_roi_self_attn"]) * sa
    grids = inst.transpose(1, 2).reshape(B * SLOTS, C, P, P)
    pasted = grids.new_zeros(B * SLOTS, C, H, W)
    for k in valid.nonzero().flatten().tolist():
        pasted[k] = unpool_one(grids[k], boxes_px.flatten(0, 1)[k], 1.0 / ds, H, W)
    x = torch.cat([attn_out.transpose(1, 2).reshape(B, 1, C, H, W), pasted.view(B, SLOTS, C, H, W)], dim=1)
    fg = x.sum(2) != 0
    logits = torch.einsum("bnchw,c->bnhw", x, w[prefix + "roiattn_fuser.channel_reduction.weight"].flatten())
    pooled = logits.amax(dim=(2, 3))  # [B, 31]
    order = torch.arange(SLOTS) if perm is None else perm
    shuffled = torch.cat([pooled[:, :1], pooled[:, 1:][:, order]], dim=1)
    g = F.relu(_linear(shuffled, w, prefix + "roiattn_fuser.channel_gate.mlp.0"))
    g = torch.sigmoid(_linear(g, w, prefix + "roiattn_fuser.channel_gate.mlp.2"))
    gate = torch.cat([g[:, :1], g[:, 1:][:, torch.argsort(order)]], dim=1)
    logits = logits * gate[:, :, None, None]
    logits = logits.masked_fill(~fg, torch.finfo(logits.dtype).min)
    fused = (x * logits.softmax(dim=1).unsqueeze(2)).sum(1)  # [B, C, H, W]
    hidden = hidden + fused.flatten(2).transpose(1, 2)
    pos = _linear(objs.to(hidden.dtype), w, prefix + "context_proj")
    ctx = _ln(torch.cat([hidden, pos], dim=1), w, prefix + "norm2")
    coord = _attention(ctx, w, prefix + "coord_self_attn", heads)[:, :T]
    hidden = hidden + torch.tanh(w[prefix + "alpha_coord_self_attn"]) * coord
    hp, gate_ff = _linear(_ln(hidden, w, prefix + "norm3"), w, prefix + "ff.net.0.proj").chunk(2, dim=-1)
    ff = _linear(hp * F.gelu(gate_ff), w, prefix + "ff.net.2")
    return hidden + torch.tanh(w[prefix + "alpha_dense"]) * ff


class OfficialUNet:
    """Context manager: the UNet's BasicTransformerBlocks compute the official block (weights ``w`` by official
    names) for the instance data set with :meth:`set`; ``perm_source`` draws the slot permutation per block call
    (``None``: identity order)."""

    def __init__(self, unet, w, perm_source=None):
        self.unet, self.w, self.perm_source = unet, w, perm_source
        self.data = None

    def set(self, boxes, masks, embeddings, latent_size):
        objs = position_net(self.w, boxes, masks)
        image_size = [latent_size[0] * 8, latent_size[1] * 8]
        self.data = dict(boxes=boxes, masks=masks, emb=embeddings, image_size=image_size, objs=objs)

    def __enter__(self):
        ref = self

        def forward(block, hidden_states, attention_mask=None, encoder_hidden_states=None, **_):
            n = block.norm1(hidden_states)
            hidden_states = block.attn1(n) + hidden_states
            n = block.norm2(hidden_states)
            a = block.attn2(n, encoder_hidden_states=encoder_hidden_states)
            d = ref.data
            perm = None if ref.perm_source is None else ref.perm_source()
            hidden_states = roifuser(
                ref.w, block._ref_prefix, block.attn2.heads, n, hidden_states, a, block.attn2, d["boxes"], d["masks"],
                d["emb"], d["image_size"], d["objs"], perm,
            )
            return block.ff(block.norm3(hidden_states)) + hidden_states

        for path in transformer_block_paths(self.unet):
            block = self.unet.get_submodule(path)
            block._ref_prefix = f"{path}.roifuser."
            block.forward = types.MethodType(forward, block)
        return self

    def __exit__(self, *exc):
        for path in transformer_block_paths(self.unet):
            block = self.unet.get_submodule(path)
            del block.forward, block._ref_prefix
