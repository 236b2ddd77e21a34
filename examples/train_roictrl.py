"""Train a ROICtrl adapter on a frozen diffusers UNet, on a synthetic "coloured shapes in boxes" dataset.

Only the adapter learns; the UNet, VAE and text encoder stay frozen. The loss is the usual noise-prediction
loss plus the adapter's fusion-weight regulariser: ``L = L_LDM + 0.01 * L_reg``.

    # tiny random-weight models built from configs (no download), a few seconds per step on a laptop CPU
    python examples/train_roictrl.py --output-dir runs/roictrl --steps 200

    # the same script under DDP (gloo on CPU, nccl on GPUs)
    torchrun --nproc-per-node 2 examples/train_roictrl.py --output-dir runs/roictrl-ddp --steps 200

    # continue from the newest checkpoint-*/ in --output-dir
    python examples/train_roictrl.py --output-dir runs/roictrl --steps 400 --resume

    # a real Stable Diffusion 1.5-style folder on disk (unet/, vae/, text_encoder/, tokenizer/, scheduler/)
    python examples/train_roictrl.py --pretrained /path/to/sd15 --resolution 512 --output-dir runs/sd15

Every sample holds 1 to --max-instances shapes, each with a box and a caption such as "a red circle"; the
global caption lists them all. Batches are a pure function of (step, rank), so a resumed run sees exactly
the batches and noise an uninterrupted run would have seen.

Outputs: ``<output-dir>/checkpoint-<step>/`` (adapter weights + optimizer state) every --checkpoint-every
steps, and ``<output-dir>/adapter/`` (``ROICtrlAdapter.from_pretrained`` loads it) at the end.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import re
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from roi_ops.roictrl_adapter import ROICtrlAdapter

COLORS = {
    "red": (0.9, 0.1, 0.1),
    "green": (0.1, 0.8, 0.2),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.1),
    "purple": (0.6, 0.2, 0.8),
    "white": (0.95, 0.95, 0.95),
}
SHAPES = ("square", "circle", "diamond")
WORDS = ("a", "photo", "of", "and", *COLORS, *SHAPES)


# ----------------------------------------------------------------------------------------------- data
def make_sample(index: int, resolution: int, max_instances: int, seed: int):
    """Sample ``index`` of the synthetic dataset (deterministic): image [3, R, R] in [-1, 1], boxes [M, 4]
    normalised, mask [M], instance captions (M strings, "" for padding) and the global caption."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    R = resolution
    image = torch.rand(3, 1, 1, generator=g) * 0.3 + 0.35 + torch.zeros(3, R, R)  # flat grey-ish background
    n = int(torch.randint(1, max_instances + 1, (1,), generator=g))
    boxes = torch.zeros(max_instances, 4)
    mask = torch.zeros(max_instances, dtype=torch.bool)
    captions = [""] * max_instances
    ys = (torch.arange(R) + 0.5).view(R, 1) / R
    xs = (torch.arange(R) + 0.5).view(1, R) / R
    for k in range(n):
        w, h = (torch.rand(2, generator=g) * 0.35 + 0.2).tolist()
        x1 = float(torch.rand(1, generator=g)) * (1 - w)
        y1 = float(torch.rand(1, generator=g)) * (1 - h)
        color = list(COLORS)[int(torch.randint(len(COLORS), (1,), generator=g))]
        shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))]
        cx, cy = x1 + w / 2, y1 + h / 2
        u, v = (xs - cx) / (w / 2), (ys - cy) / (h / 2)  # box-normalised coordinates in [-1, 1]
        if shape == "square":
            inside = (u.abs() <= 1) & (v.abs() <= 1)
        elif shape == "circle":
            inside = u**2 + v**2 <= 1
        else:
            inside = u.abs() + v.abs() <= 1
        image = torch.where(inside, torch.tensor(COLORS[color]).view(3, 1, 1), image)
        boxes[k] = torch.tensor([x1, y1, x1 + w, y1 + h])
        mask[k] = True
        captions[k] = f"a {color} {shape}"
    caption = "a photo of " + " and ".join(c for c in captions if c)
    return image * 2 - 1, boxes, mask, captions, caption


def make_batch(step: int, rank: int, world: int, args):
    """The batch of ``step`` on ``rank``: disjoint across ranks, cycling over --num-samples samples."""
    first = (step * world + rank) * args.batch_size
    samples = [
        make_sample((first + i) % args.num_samples, args.resolution, args.max_instances, args.seed)
        for i in range(args.batch_size)
    ]
    images, boxes, masks, captions, global_captions = zip(*samples)
    return torch.stack(images), torch.stack(boxes), torch.stack(masks), list(captions), list(global_captions)


# ----------------------------------------------------------------------------------------------- models
class ToyTokenizer:
    """Word-level tokenizer for the tiny text encoder (the synthetic captions use a dozen words)."""

    def __init__(self, max_length: int = 16):
        self.vocab = {w: i + 3 for i, w in enumerate(WORDS)}  # 0 pad, 1 bos, 2 eos
        self.vocab_size, self.max_length = len(self.vocab) + 3, max_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        ids = torch.zeros(len(texts), self.max_length, dtype=torch.long)
        for i, text in enumerate(texts):
            row = [1] + [self.vocab[w] for w in text.split()][: self.max_length - 2] + [2]
            ids[i, : len(row)] = torch.tensor(row)
        return ids


def build_models(args):
    """(unet, vae, text_encoder, tokenize, scheduler): a local pretrained folder or tiny random models."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if args.pretrained:
        from transformers import CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(args.pretrained, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(args.pretrained, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(args.pretrained, subfolder="text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(args.pretrained, subfolder="tokenizer")
        scheduler = DDPMScheduler.from_pretrained(args.pretrained, subfolder="scheduler")

        def tokenize(texts):
            return tokenizer(
                texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids

        return unet, vae, text_encoder, tokenize, scheduler

    torch.manual_seed(args.seed)  # every rank builds the same "pretrained" weights
    tokenizer = ToyTokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=tokenizer.max_length, pad_token_id=0, bos_token_id=1,
            eos_token_id=2,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, layers_per_block=1,
    )
    unet = UNet2DConditionModel(
        sample_size=args.resolution // 8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet, vae, text_encoder, tokenizer, DDPMScheduler(num_train_timesteps=1000)


class ROICtrlTrainer(nn.Module):
    """Frozen UNet + trainable adapter in one module, so DDP sees the adapter's parameters and the forward."""

    def __init__(self, unet: nn.Module, adapter: ROICtrlAdapter):
        super().__init__()
        self.unet, self.adapter = unet, adapter

    def forward(self, noisy, timesteps, text, instances):
        pred = self.unet(noisy, timesteps, text, cross_attention_kwargs={"roictrl": instances}).sample
        return pred, self.adapter.regularization_loss()


# ----------------------------------------------------------------------------------------------- checkpoints
def latest_checkpoint(output_dir: str) -> str | None:
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*"))
             if (m := re.search(r"checkpoint-(\d+)$", p)) and os.path.isfile(os.path.join(p, "trainer_state.pt"))]
    return max(found)[1] if found else None


def save_checkpoint(output_dir: str, step: int, adapter: ROICtrlAdapter, optimizer) -> str:
    path = os.path.join(output_dir, f"checkpoint-{step:06d}")
    adapter.save_pretrained(os.path.join(path, "adapter"))
    # trainer_state.pt is written last: its presence marks the checkpoint complete.
    torch.save({"step": step, "optimizer": optimizer.state_dict()}, os.path.join(path, "trainer_state.pt"))
    return path


# ----------------------------------------------------------------------------------------------- training
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--pretrained", default=None, help="local diffusers SD1.5-style folder (default: tiny models)")
    p.add_argument("--steps", type=int, default=100, help="total optimisation steps")
    p.add_argument("--batch-size", type=int, default=4, help="per process")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--reg-weight", type=float, default=0.01, help="weight of the fusion-weight regulariser")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (latents are 1/8 of it)")
    p.add_argument("--max-instances", type=int, default=3)
    p.add_argument("--num-samples", type=int, default=512, help="size of the synthetic dataset")
    p.add_argument("--grid-sizes", default=None, help='ROI grid by downsampling, e.g. "8:25,16:19,32:13,64:7"')
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> ROICtrlAdapter:
    """Run training; returns the trained adapter (what rank 0 also saves to ``<output-dir>/adapter``)."""
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    unet, vae, text_encoder, tokenize, scheduler = build_models(args)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False).eval().to(device)
    if args.grid_sizes:
        grid_sizes = {int(k): int(v) for k, v in (kv.split(":") for kv in args.grid_sizes.split(","))}
    elif args.pretrained:
        grid_sizes = None  # the paper's {8: 25, 16: 19, 32: 13, 64: 7}
    else:
        grid_sizes = {8: 9, 16: 7}  # the tiny model's 8x8 and 4x4 latents need no bigger crops
    torch.manual_seed(args.seed)
    adapter = ROICtrlAdapter.from_unet(
        unet, grid_sizes=grid_sizes, position_dim=text_encoder.config.hidden_size,
        position_hidden_dim=max(64, text_encoder.config.hidden_size),
    ).to(device)
    adapter.install(unet)
    adapter.train()
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=args.lr)

    start = 0
    if args.resume and (ckpt := latest_checkpoint(args.output_dir)):
        saved = ROICtrlAdapter.from_pretrained(os.path.join(ckpt, "adapter"), unet=unet)
        adapter.load_state_dict(saved.state_dict())
        state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location=device, weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        if rank == 0:
            print(f"resumed from {ckpt} at step {start}")

    trainer = ROICtrlTrainer(unet, adapter)
    model = nn.parallel.DistributedDataParallel(trainer) if distributed else trainer
    vae_scale = getattr(vae.config, "scaling_factor", 0.18215)

    @torch.no_grad()
    def encode_text(texts: list[str]) -> torch.Tensor:
        return text_encoder(tokenize(texts).to(device))[0]

    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=args.steps, initial=start, desc="roictrl", dynamic_ncols=True)
    for step in range(start, args.steps):
        images, boxes, masks, captions, global_captions = make_batch(step, rank, world, args)
        g = torch.Generator().manual_seed(args.seed * 7919 + step * 131 + rank)  # same noise after a resume
        with torch.no_grad():
            posterior = vae.encode(images.to(device)).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=g).to(device)
            latents = (posterior.mean + posterior.std * eps) * vae_scale
            text = encode_text(global_captions)
            B, N = masks.shape
            flat = [c for row in captions for c in row]
            inst = torch.zeros(B * N, *text.shape[1:], device=device)
            valid = [i for i, c in enumerate(flat) if c]
            inst[valid] = encode_text([flat[i] for i in valid])
        noise = torch.randn(latents.shape, generator=g).to(device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (B,), generator=g).to(device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        instances = {
            "boxes": boxes.to(device), "masks": masks.to(device), "embeddings": inst.view(B, N, *text.shape[1:])
        }

        pred, reg = model(noisy, timesteps, text, instances)
        loss_ldm = F.mse_loss(pred.float(), noise.float())
        loss = loss_ldm + args.reg_weight * reg
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}")

        done = step + 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss_ldm.item():.4f}", reg=f"{reg.item():.3f}")
        if done % args.checkpoint_every == 0 or done == args.steps:
            if rank == 0:
                save_checkpoint(args.output_dir, done, adapter, optimizer)
            if distributed:
                dist.barrier()
    if progress is not None:
        progress.close()
    if rank == 0:
        adapter.save_pretrained(os.path.join(args.output_dir, "adapter"))
    adapter.uninstall(unet)
    if distributed:
        dist.barrier()
    return adapter


if __name__ == "__main__":
    main(sys.argv[1:])
    if dist.is_initialized():
        dist.destroy_process_group()
