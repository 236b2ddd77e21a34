"""Where a visual token is: how much of it the frozen toy UNet's features carry, at every transformer block.

    python -m benchmarks.instance_control.position_probe --out benchmarks/instance_control/results/position_probe.json

GLIGEN grounds an object by a gated self-attention over [visual tokens; box tokens]: a visual token can attend
to "its" box only if its features say where it is (the UNet has no positional embedding; position can only come
from the convolutions' zero padding). This probe fits a ridge regression from the input of every
``BasicTransformerBlock`` (where GLIGEN's fuser sits) to the token's (x, y), on 32 training images, and reports
R^2 on 32 others, for the whole map and, on the 16x16 maps, for the tokens at least 3 cells from the border (the
interior, where padding cannot reach through the first convolutions). ROICtrl does not need this: ROI-Align reads the box's
pixels by their coordinates.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from . import evaluate, models, train, world

CKPT = os.path.join(os.path.dirname(__file__), "checkpoints")


def r2(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    return (1 - ((pred - target) ** 2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)).tolist()


@torch.no_grad()
def probe(ckpt: str, timesteps=(999, 500, 100), n: int = 64, ridge: float = 1e-2) -> dict:
    from diffusers import DDPMScheduler

    vae, unet, text_encoder, tokenizer = train.load_model(ckpt)
    images, _, _, _, prompts = world.batch([world.train_layout(i, 0) for i in range(n)])
    latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    text, _ = models.encode_text(text_encoder, tokenizer, prompts)
    scheduler = DDPMScheduler(**models.scheduler_config())
    g = torch.Generator().manual_seed(0)
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0]))
             for name, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    out = {}
    try:
        for t_val in timesteps:
            t = torch.full((n,), t_val)
            unet(scheduler.add_noise(latents, torch.randn(latents.shape, generator=g), t), t, text)
            rows = {}
            for name, h in inputs.items():
                B, T, C = h.shape
                S = int(round(T**0.5))
                yy, xx = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
                cells = torch.stack([xx.flatten(), yy.flatten()], -1)
                target = cells.float() / (S - 1)
                X = torch.cat([h, torch.ones(B, T, 1)], -1)
                half = B // 2
                Xa, Ya = X[:half].reshape(-1, C + 1), target.repeat(half, 1)
                W = torch.linalg.solve(Xa.T @ Xa + ridge * torch.eye(C + 1), Xa.T @ Ya)
                Xb = X[half:]
                inner = ((cells >= 3) & (cells <= S - 4)).all(-1)
                rows[name] = {
                    "map": f"{S}x{S}", "channels": C,
                    "r2_xy_all": [round(v, 3) for v in r2(Xb.reshape(-1, C + 1) @ W, target.repeat(B - half, 1))],
                    "r2_xy_interior": ([round(v, 3) for v in r2(Xb[:, inner].reshape(-1, C + 1) @ W,
                                                                 target[inner].repeat(B - half, 1))]
                                       if S >= 12 else None),  # an 8x8 map has a 2x2 interior
                }
            out[f"t={t_val}"] = rows
    finally:
        for h in hooks:
            h.remove()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=CKPT)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    record = {"probe": probe(args.ckpt), "environment": evaluate.environment(),
              "how": "ridge regression (lambda 1e-2) from block inputs to (x, y) in [0, 1]; fit on 32 images, "
                     "R^2 on 32 others; interior = cells at least 3 from the border"}
    evaluate.write_json(args.out, record)
    for t, rows in record["probe"].items():
        for name, r in rows.items():
            print(f"{t} {name} {r['map']}: R2 x/y {r['r2_xy_all']}, interior {r['r2_xy_interior']}")
    return record


if __name__ == "__main__":
    main()
