"""Where the GLIGEN box tokens' collapse comes from: the scale of what the position net gives, split into the
part all real box tokens share (the mean over the probe's boxes) and their deviation from it, and the same after
one fuser's ``linear``; for the layers as train.py initialises them and for a trained folder.

    PYTHONPATH=. python benchmarks/instance_control/results/gligen_attempts/collapse/token_scale.py --ckpt RUN --folder F --out F.json

``--folder init`` / ``init_distinct``: the untrained layers (seed 0), plain or with ``train.distinct_box_tokens``.
The boxes and phrases are those of ``gligen_attention.py`` (16 training-distribution layouts, seed 123).
"""

import argparse
import json

import torch
import torch.nn.functional as F
from diffusers.models.attention import GatedSelfAttentionDense

from benchmarks.instance_control import evaluate, models, train, world


@torch.no_grad()
def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--folder", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    _, unet, te, tok = train.load_model(args.ckpt)
    if args.folder.startswith("init"):
        torch.manual_seed(0)
        g = models.gligen_unet_from_base(unet)[0]
        if args.folder == "init_distinct":
            train.distinct_box_tokens(g)
    else:
        g = train.load_gligen_unet(args.ckpt, unet, args.folder)
    _, boxes, masks, inst_caps, _ = world.batch([world.train_layout(i, 123) for i in range(16)], models.RESOLUTION)
    _, pooled = models.encode_text(te, tok, [c for caps in inst_caps for c in caps])
    n, N = masks.shape
    m = F.pad(masks.float(), (0, train.GLIGEN_MAX_OBJS - N))
    objs = g.position_net(boxes=F.pad(boxes, (0, 0, 0, train.GLIGEN_MAX_OBJS - N)) * m[..., None], masks=m,
                          positive_embeddings=F.pad(pooled.view(n, N, -1), (0, 0, 0, train.GLIGEN_MAX_OBJS - N)) * m[..., None])
    real = objs[m.bool()]

    def split(t):
        mu = t.mean(0)
        return {"norm": t.norm(dim=-1).mean().item(), "shared_norm": mu.norm().item(),
                "deviation_norm": (t - mu).norm(dim=-1).mean().item()}

    fuser = next(f for f in g.modules() if isinstance(f, GatedSelfAttentionDense))
    record = {"ckpt": args.ckpt, "folder": args.folder, "position_net_output": split(real),
              "first_fuser_linear": {**split(fuser.linear(real)), "bias_norm": fuser.linear.bias.norm().item()},
              "environment": evaluate.environment()}
    evaluate.write_json(args.out, record)
    print(json.dumps(record["position_net_output"]), json.dumps(record["first_fuser_linear"]))


if __name__ == "__main__":
    main()
