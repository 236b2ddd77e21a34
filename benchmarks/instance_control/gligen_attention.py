"""Where GLIGEN's fusers look: does a visual token attend to its own box's token?

    python -m benchmarks.instance_control.gligen_attention --ckpt RUN --folder gligen --out RUN/attention.json

GLIGEN localises only if, in the gated self-attention over [visual tokens; box tokens] of each fuser, a visual
token inside box k puts more of its attention on box token k than on the other boxes' tokens. For one batch of
training-distribution layouts (16, seed 123) noised at t = 500, this measures per fuser (head-averaged
attention probabilities, computed from the fuser's own layers as ``GatedSelfAttentionDense.forward`` does,
including the pixel-position embedding of ``gligen_positions.py`` when the folder has it):

- ``box_mass``: the attention mass of the visual tokens on the 30 box slots (uniform attention: 30 / (HW + 30));
- ``own_share`` against ``chance``: for visual tokens inside exactly one box, the share of their attention on
  the real boxes that goes to their own box, and 1 / (number of real boxes) (what uniform attention gives);
- ``logit_std_visual`` / ``logit_std_boxes``: the spread of the attention logits over the visual keys and over
  the real box keys (box keys that all look alike cannot be told apart by any query);
- ``cos_objs`` / ``cos_keys``: the mean cosine similarity between two real boxes of one layout, of the position
  net's outputs (the fuser's ``objs``) and of the fuser's keys of those box tokens (head-concatenated);
- ``inputs`` (once per run): the same cosine of what the position net gets, the boxes' Fourier embeddings and
  the phrase embeddings.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from . import evaluate, gligen_positions, models, train, world

MAX_OBJS = train.GLIGEN_MAX_OBJS
INIT = "init"  # --folder init: the untrained GLIGEN layers


def _mean_pair_cosine(tokens, masks):
    """Mean cosine similarity over the pairs of real tokens of each sample ([B, N, D], masks [B, N])."""
    sims = []
    for t, m in zip(tokens, masks.bool()):
        t = F.normalize(t[m], dim=-1)
        if len(t) > 1:
            c = t @ t.T
            sims.append(c[~torch.eye(len(t), dtype=torch.bool)].mean())
    return torch.stack(sims).mean().item()


def _inside(hw, boxes, masks):
    """[B, H*W, N]: whether each pixel centre (row-major) lies in each real box."""
    h, w = hw
    ys, xs = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
    y, x = (t.reshape(-1) for t in torch.meshgrid(ys, xs, indexing="ij"))
    b = boxes[:, None]
    return ((x[None, :, None] >= b[..., 0]) & (x[None, :, None] < b[..., 2]) & (y[None, :, None] >= b[..., 1])
            & (y[None, :, None] < b[..., 3]) & masks[:, None, :].bool())


@torch.no_grad()
def input_similarity(ckpt: str, n: int = 16) -> dict:
    """Mean cosine similarity between two real boxes of one layout (the probe's layouts) of what the position
    net gets: the boxes' Fourier embeddings (GLIGEN's, 8 frequencies) and the phrase embeddings (pooled)."""
    from diffusers.models.embeddings import get_fourier_embeds_from_boundingbox

    _, _, text_encoder, tokenizer = train.load_model(ckpt)
    _, boxes, masks, inst_caps, _ = world.batch([world.train_layout(i, 123) for i in range(n)], models.RESOLUTION)
    _, pooled = models.encode_text(text_encoder, tokenizer, [c for caps in inst_caps for c in caps])
    return {"cos_box_fourier": _mean_pair_cosine(get_fourier_embeds_from_boundingbox(8, boxes), masks),
            "cos_phrases": _mean_pair_cosine(pooled.view(n, masks.shape[1], -1), masks)}


@torch.no_grad()
def probe(ckpt: str, folder: str, n: int = 16, t: int = 500) -> list[dict]:
    from diffusers import DDPMScheduler
    from diffusers.models.attention import GatedSelfAttentionDense

    vae, unet, text_encoder, tokenizer = train.load_model(ckpt)
    if folder == INIT:  # GLIGEN's new layers as train.py initialises them (seed 0), before any step
        torch.manual_seed(0)
        gligen = models.gligen_unet_from_base(unet)[0].eval()
    else:
        gligen = train.load_gligen_unet(ckpt, unet, folder)
    images, boxes, masks, inst_caps, captions = world.batch([world.train_layout(i, 123) for i in range(n)],
                                                            models.RESOLUTION)
    z = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    noisy = DDPMScheduler(**models.scheduler_config()).add_noise(
        z, torch.randn(z.shape, generator=torch.Generator().manual_seed(0)), torch.full((n,), t))
    states, _ = models.encode_text(text_encoder, tokenizer, captions)
    N = masks.shape[1]
    _, pooled = models.encode_text(text_encoder, tokenizer, [c for caps in inst_caps for c in caps])
    m = F.pad(masks.float(), (0, MAX_OBJS - N))
    kwargs = {"gligen": {"boxes": F.pad(boxes, (0, 0, 0, MAX_OBJS - N)) * m[..., None], "masks": m,
                         "positive_embeddings": F.pad(pooled.view(n, N, -1), (0, 0, 0, MAX_OBJS - N)) * m[..., None]}}
    rows = []

    def hook(fuser, args, _out):
        x, objs = args
        hw = getattr(fuser, "pixel_grid_hw", None) or (int(x.shape[1] ** 0.5),) * 2  # the toy's maps are square
        visual = x
        if gligen_positions.has_pixel_positions(fuser):
            pos = gligen_positions.pixel_fourier_embedding(*hw, fuser.pixel_position_freqs)
            visual = x + fuser.pixel_position_proj(pos)[None]
        h = fuser.norm1(torch.cat([visual, fuser.linear(objs)], dim=1))
        attn, hv = fuser.attn, x.shape[1]
        q = attn.to_q(h).unflatten(-1, (attn.heads, -1)).transpose(1, 2)[:, :, :hv]
        keys = attn.to_k(h)
        k = keys.unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) * attn.scale  # [B, heads, HW, HW + 30]
        p = logits.softmax(-1).mean(1)
        inside = _inside(hw, boxes, masks)
        one = inside.sum(-1) == 1
        on_real = p[:, :, hv:hv + N] * masks[:, None, :]
        share = on_real / on_real.sum(-1, keepdim=True).clamp_min(1e-12)
        several = masks.sum(-1) > 1
        box_logits = logits[..., hv:hv + N]
        rows.append({
            "map": list(hw), "box_mass": p[:, :, hv:].sum(-1).mean().item(),
            "uniform_box_mass": MAX_OBJS / (hv + MAX_OBJS),
            "own_share": (share * inside.float()).sum(-1)[one].mean().item(),
            "chance": (1.0 / masks.sum(-1))[:, None].expand_as(one)[one].mean().item(),
            "logit_std_visual": logits[..., :hv].std(-1).mean().item(),
            "logit_std_boxes": torch.stack([box_logits[i][..., masks[i].bool()].std(-1).mean()
                                            for i in range(n) if several[i]]).mean().item(),
            "cos_objs": _mean_pair_cosine(objs[:, :N], masks),
            "cos_keys": _mean_pair_cosine(keys[:, hv:hv + N], masks),
        })

    handles = [mod.register_forward_hook(hook) for mod in gligen.modules() if isinstance(mod, GatedSelfAttentionDense)]
    try:
        gligen(noisy, torch.full((n,), t), states, cross_attention_kwargs=kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="a train.py output folder (model/ and the GLIGEN folder)")
    p.add_argument("--folder", default="gligen",
                   help=f"GLIGEN weights folder under --ckpt, or {INIT!r}: the layers as train.py initialises them")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = probe(args.ckpt, args.folder)
    for r in rows:
        print(f"{r['map']}: box mass {r['box_mass']:.3f} (uniform {r['uniform_box_mass']:.3f}); own-box share "
              f"{r['own_share']:.3f} (chance {r['chance']:.3f}); logit std visual {r['logit_std_visual']:.3f}, "
              f"boxes {r['logit_std_boxes']:.4f}; box cosine objs {r['cos_objs']:.3f}, keys {r['cos_keys']:.3f}")
    inputs = input_similarity(args.ckpt)
    print(f"position net inputs, cosine of two boxes: Fourier boxes {inputs['cos_box_fourier']:.3f}, phrases "
          f"{inputs['cos_phrases']:.3f}")
    record = {"ckpt": args.ckpt, "folder": args.folder, "fusers": rows, "inputs": inputs,
              "environment": evaluate.environment()}
    evaluate.write_json(args.out, record)
    return record


if __name__ == "__main__":
    main()
