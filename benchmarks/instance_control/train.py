"""Train the toy SD model of the synthetic world from scratch, then ROICtrl and GLIGEN on its frozen UNet.

    python -m benchmarks.instance_control.train --out runs/quality            # every stage, the committed sizes
    python -m benchmarks.instance_control.train --out /tmp/smoke --smoke      # a few steps of each, for tests

Stages, in order (``--stages`` picks some; each later stage loads what the earlier ones saved):

``vae``     AutoencoderKL on the world's images (L1 + 1e-6 KL); sets ``scaling_factor`` to 1/std of the latents.
``base``    UNet + CLIP text encoder on the *global captions only* (10% of captions dropped for classifier-free
            guidance); saved with the VAE, tokenizer and a DDIM scheduler as a ``StableDiffusionPipeline`` folder
            ``<out>/model``.
``decoder`` fine-tunes the VAE *decoder only* (encoder, latents and scaling factor unchanged, so the base UNet
            and both controls stay valid; Stable Diffusion's ft-MSE VAE did the same), for sharper images.
``roictrl`` the ROICtrl adapter (``roi_ops.roictrl_adapter``) on the frozen base: ``L = L_LDM + 0.01 L_reg``
            (the box stage), then, for ``--region-steps``, the region stage: only the adapter's region vectors
            (option ``region_embedding``) train, on the same layouts all given with masks, some drawn as
            free forms (docs/masks.md); saved with ``save_pretrained`` to ``<out>/roictrl``.
``gligen``  GLIGEN as diffusers implements it: a ``UNet2DConditionModel(attention_type="gated")`` holding the
            base weights, only its ``fuser`` (gated self-attention) and ``position_net`` trained, with the same
            data, steps, batch, learning rate and seed as ROICtrl; the new weights go to
            ``<out>/gligen/gligen.safetensors`` (the rest is the base UNet).

The data of every stage is a pure function of ``--seed``; so are the initial weights and the noise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from . import ablations, gligen_oracle, gligen_positions, models, world

STAGES = ("vae", "base", "decoder", "roictrl", "gligen")
GLIGEN_MAX_OBJS = 30  # max_objs of diffusers' StableDiffusionGLIGENPipeline


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dataset(n: int, seed: int, mask_rate: float = 0.0, free_form_rate: float = 0.0,
            free_forms: tuple[str, ...] = world.FREE_FORMS, free_form_word: str | None = None):
    """(images [n, 3, R, R] in [-1, 1], boxes [n, 6, 4], masks [n, 6], instance captions, global captions,
    regions [n, 6, R, R] or None). With ``mask_rate`` > 0 that fraction of layouts gives its instances' masks
    (``world.with_masks``; some drawn as free forms); the others, and every layout without it, are unchanged."""
    layouts = [world.train_layout(i, seed) for i in range(n)]
    if mask_rate <= 0:
        return (*world.batch(layouts, models.RESOLUTION), None)
    pairs = [world.with_masks(layout, mask_rate, free_form_rate, free_forms, free_form_word) for layout in layouts]
    layouts, given = [p[0] for p in pairs], [p[1] for p in pairs]
    return (*world.batch(layouts, models.RESOLUTION), world.regions(layouts, given, models.RESOLUTION))


def lr_at(step: int, lr: float, warmup: int = 50, total: int | None = None) -> float:
    """Linear warm-up over ``warmup`` steps, then constant (``total`` None) or cosine decay to 0 at ``total``."""
    lr = lr * min(1.0, (step + 1) / warmup)
    if total is not None and step >= warmup:
        lr *= 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return lr


def optimiser_step(opt, loss, step: int, lr: float, clip_params=None, total: int | None = None) -> None:
    """One update of every stage: warm-up learning rate (then cosine decay over ``total`` steps when given),
    backward, optional gradient clipping (norm 1), step."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, lr, total=total) * group.get("lr_scale", 1.0)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_params is not None:
        torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
    opt.step()


def train_vae(args, data):
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**models.vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr)
    images = data[0]
    g = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.time()
    for step in range(args.vae_steps):
        idx = torch.randint(len(images), (args.batch_size,), generator=g)
        x = images[idx]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = F.l1_loss(rec, x) + 1e-6 * kl
        optimiser_step(opt, loss, step, args.vae_lr)
        if step % 50 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step}/{args.vae_steps} l1 {F.l1_loss(rec, x).item():.4f} kl {kl.item():.1f} "
                f"({time.time() - t0:.0f}s)")
    vae.eval()
    with torch.no_grad():
        std = torch.cat([vae.encode(images[i: i + 256]).latent_dist.mean for i in range(0, len(images), 256)]).std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    log(f"vae latent std {std.item():.3f} -> scaling_factor {1 / std.item():.4f}")
    return vae


def finetune_decoder(args, vae, images, latents):
    """Train ``vae``'s decoder (and post-quant conv) on latents sampled from the frozen encoder's posteriors."""
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    vae.decoder.train()
    opt = torch.optim.AdamW(params, lr=args.vae_lr)
    g = torch.Generator().manual_seed(args.seed + 3)
    mean, std = latents
    t0 = time.time()
    for step in range(args.decoder_steps):
        idx = torch.randint(len(images), (args.batch_size,), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, images[idx])
        optimiser_step(opt, loss, step, args.vae_lr)
        if step % 50 == 0 or step == args.decoder_steps - 1:
            log(f"decoder step {step}/{args.decoder_steps} l1 {loss.item():.4f} ({time.time() - t0:.0f}s)")
    vae.requires_grad_(False)
    return vae.eval()


@torch.no_grad()
def encode_latents(vae, images, seed: int):
    """Posterior mean and std of every image (the noise of each step samples from them)."""
    vae.eval()
    means, stds = [], []
    for i in range(0, len(images), 256):
        post = vae.encode(images[i: i + 256]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def noisy_batch(step, args, latents, scheduler, scale, n_data, salt):
    """Indices, noisy latents, noise and timesteps of ``step``: a pure function of (seed, step, salt)."""
    g = torch.Generator().manual_seed(args.seed * 100_003 + step * 7 + salt)
    idx = torch.randint(n_data, (args.batch_size,), generator=g)
    mean, std = latents
    z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=g)
    return idx, scheduler.add_noise(z, noise, t), noise, t, g


def train_base(args, data, vae, latents):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = models.build_tokenizer(os.path.join(args.out, "model", "tokenizer"))
    torch.manual_seed(args.seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**models.text_encoder_config(tokenizer)))
    unet = UNet2DConditionModel(**models.unet_config())
    scheduler = DDPMScheduler(**models.scheduler_config())
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    captions = data[4]
    scale = vae.config.scaling_factor
    t0 = time.time()
    for step in range(args.base_steps):
        idx, noisy, noise, t, g = noisy_batch(step, args, latents, scheduler, scale, len(captions), 1)
        drop = torch.rand(args.batch_size, generator=g) < 0.1  # unconditional samples for CFG
        texts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        pred = unet(noisy, t, text_encoder(ids).last_hidden_state).sample
        loss = F.mse_loss(pred, noise)
        optimiser_step(opt, loss, step, args.lr, clip_params=params,
                       total=args.base_steps if args.base_schedule == "cosine" else None)
        if step % 50 == 0 or step == args.base_steps - 1:
            log(f"base step {step}/{args.base_steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    save_model(args.out, vae, unet, text_encoder, tokenizer)
    return unet.eval(), text_encoder.eval(), tokenizer


def save_model(out, vae, unet, text_encoder, tokenizer):
    from diffusers import DDIMScheduler

    root = os.path.join(out, "model")
    unet.save_pretrained(os.path.join(root, "unet"))
    vae.save_pretrained(os.path.join(root, "vae"))
    text_encoder.save_pretrained(os.path.join(root, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(root, "tokenizer"))
    DDIMScheduler(**models.scheduler_config(), set_alpha_to_one=False, steps_offset=1).save_pretrained(os.path.join(root, "scheduler"))
    models.write_model_index(root)
    log(f"saved the toy SD model to {root}")


def load_model(out):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = os.path.join(out, "model")
    unet = UNet2DConditionModel.from_pretrained(os.path.join(root, "unet")).eval()
    vae = AutoencoderKL.from_pretrained(os.path.join(root, "vae")).eval()
    text_encoder = CLIPTextModel.from_pretrained(os.path.join(root, "text_encoder")).eval()
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(root, "tokenizer"))
    return vae, unet, text_encoder, tokenizer


class _CaptionCache:
    """Frozen text-encoder outputs per caption (there are few distinct instance captions)."""

    def __init__(self, text_encoder, tokenizer):
        self.te, self.tok, self.cache = text_encoder, tokenizer, {}

    def __call__(self, texts):
        todo = sorted({t for t in texts if t not in self.cache})
        if todo:
            states, pooled = models.encode_text(self.te, self.tok, todo)
            for t, s, p in zip(todo, states, pooled):
                self.cache[t] = (s, p)
        return torch.stack([self.cache[t][0] for t in texts]), torch.stack([self.cache[t][1] for t in texts])


def make_roictrl_adapter(unet, seed: int, grid_policy: str = "fixed", region_embedding: bool = False):
    """The toy ROICtrl adapter. ``grid_policy="fixed"`` (the committed adapter's recipe, from before footprint
    grids became the default of new adapters) keeps ``make quality`` reproducing it bit for bit; ``"footprint"``
    is today's default of ``ROICtrlAdapter.from_unet`` (docs/performance.md measures its toy ISR).
    ``region_embedding`` adds the zero-initialised mask vectors (no random numbers drawn: the rest is the same)."""
    from roi_ops.roictrl_adapter import ROICtrlAdapter

    torch.manual_seed(seed)
    # the fixed recipe is the committed adapter's: GLIGEN's full-resolution self-attention guidance and the 4x
    # feed-forward too (issue 19's later defaults changed those parts of new adapters)
    recipe = {"guidance_kv_pool": 1, "guidance_keys": "visual", "ff_mult": 4} if grid_policy == "fixed" else {}
    return ROICtrlAdapter.from_unet(unet, grid_sizes=models.GRID_SIZES, vae_scale_factor=models.VAE_SCALE_FACTOR,
                                    position_dim=models.TEXT_WIDTH, position_hidden_dim=128, grid_policy=grid_policy,
                                    region_embedding=region_embedding, **recipe)


REGION_PARAMETERS = ("region_outside", "region_outside_gate")


def region_parameters(adapter) -> list:
    """The region vectors of ``options.region_embedding`` (what the region stage trains)."""
    return [p for n, p in adapter.named_parameters() if n.rsplit(".", 1)[-1] in REGION_PARAMETERS]


def load_box_adapter(adapter, folder: str) -> None:
    """Copy a saved adapter's weights (``folder``, e.g. the committed box-only toy adapter) into ``adapter``; only
    the region vectors may be missing from it (they stay zero)."""
    from roi_ops.roictrl_adapter import ROICtrlAdapter

    state = ROICtrlAdapter.from_pretrained(folder).state_dict()
    result = adapter.load_state_dict(state, strict=False)
    own = {n for n, _ in adapter.named_parameters() if n.rsplit(".", 1)[-1] in REGION_PARAMETERS}
    if result.unexpected_keys or set(result.missing_keys) - own:
        raise ValueError(f"--init-adapter {folder} does not fit the toy adapter: missing "
                         f"{sorted(set(result.missing_keys) - own)[:3]}, unexpected {result.unexpected_keys[:3]}")


def train_roictrl(args, data, latents):
    """The ROICtrl stage through the one adapter trainer (``roi_ops.training.trainer.train_adapter``, what
    ``roi-ops train`` runs), on the in-memory data and latent posteriors of the other stages: micro-batch ``step``
    draws its samples, latents, noise and timesteps from the generator ``seed * 100_003 + 7 * step + 2`` (the
    salt 2 of this stage before the trainer existed), so the committed adapter is reproduced."""
    from accelerate import Accelerator

    from roi_ops.training.data import TensorData
    from roi_ops.training.models import load_frozen_model
    from roi_ops.training.trainer import CaptionEncoder, TrainConfig, train_adapter

    frozen = load_frozen_model(os.path.join(args.out, "model"))
    regions_stage = args.region_steps > 0 and not args.ablation
    adapter = make_roictrl_adapter(frozen.unet, args.seed, args.grid_policy, region_embedding=regions_stage)
    for p in region_parameters(adapter):  # trained by the region stage only
        p.requires_grad_(False)
    name = "roictrl"
    reg_weight = args.reg_weight
    if args.ablation:  # the same adapter, data and noise with one part removed (benchmarks/.../ablations.py)
        ablations.apply(adapter, args.ablation)
        reg_weight = ablations.reg_weight(args.ablation, args.reg_weight)
        name = f"roictrl ablation {args.ablation}"
    _, boxes, masks, inst_caps, captions, regions = data
    log(f"{name}: {sum(p.numel() for p in adapter.parameters() if p.requires_grad):,} trainable parameters, "
        f"reg weight {reg_weight:g}")
    config = TrainConfig(
        max_steps=args.control_steps, batch_size=args.batch_size, learning_rate=args.control_lr,
        lr_scheduler=args.control_schedule, lr_warmup_steps=50, weight_decay=0.0, max_grad_norm=1.0,
        reg_weight=reg_weight, seed=args.seed, region_loss_weight=args.region_loss_weight,
        fused_optimizer=False,  # the committed adapter's recipe (AdamW's for-loop), bit for bit
    )
    accelerator = Accelerator(cpu=True)
    encoder = CaptionEncoder(frozen.pipe, accelerator.device, cache=True)
    t0 = time.time()

    def fit(data, config, label):
        return train_adapter(
            accelerator=accelerator, unet=frozen.unet, adapter=adapter, noise_scheduler=frozen.noise_scheduler,
            encoder=encoder, data=data, config=config, scaling_factor=frozen.vae.config.scaling_factor,
            progress=False, log=log,
            on_step=lambda step, stats: (step % 50 == 0 or step == config.max_steps) and log(
                f"{label} step {step}/{config.max_steps} ldm {stats['l_ldm']:.4f} reg {stats['l_reg']:.3f} "
                f"({time.time() - t0:.0f}s)"),
        )

    if args.init_adapter:  # the box stage's result, saved before (e.g. the committed box-only adapter)
        load_box_adapter(adapter, args.init_adapter)
        log(f"{name}: box stage loaded from {args.init_adapter}")
        result = {"seconds": 0.0}
    else:
        result = fit(TensorData(latents[0], latents[1], captions, inst_caps, boxes, masks, regions=regions),
                     config, name)
    if regions_stage:
        result = train_region_stage(args, adapter, frozen.vae, fit, TrainConfig)
    if args.ablation:
        folder = os.path.join(args.out, "ablations", args.ablation)
        ablations.save(adapter, folder, args.ablation, {
            "steps": args.control_steps, "reg_weight": reg_weight, "seconds": round(result["seconds"], 1),
            "seconds_per_step": round(result["seconds"] / max(1, args.control_steps), 4), "command": args.command})
    else:
        folder = os.path.join(args.out, "roictrl")
        adapter.save_pretrained(folder)
    log(f"saved {name} to {folder} ({result['seconds']:.0f}s)")
    return adapter


def train_region_stage(args, adapter, vae, fit, TrainConfig):
    """The region stage: only the region vectors (``region_outside``, ``region_outside_gate``) train (every other
    weight frozen, so the adapter without masks stays bitwise the box stage's), for ``--region-steps`` on the same
    layouts, every one of them with masks, a ``--region-free-form-rate`` of the instances drawn as free forms
    under a random shape word (so the mask, not the word, says where the colour goes)."""
    from roi_ops.training.data import TensorData

    adapter.requires_grad_(False)
    params = region_parameters(adapter)
    for p in params:
        p.requires_grad_(True)
    images, boxes, masks, inst_caps, captions, regions = dataset(
        args.num_samples, args.seed, 1.0, args.region_free_form_rate, tuple(args.free_forms.split(",")),
        args.free_form_word)
    mean, std = encode_latents(vae, images, args.seed)
    log(f"region stage: {sum(p.numel() for p in params):,} trainable parameters, {args.region_steps} steps, "
        f"lr {args.region_lr:g}, free forms {args.region_free_form_rate:g}")
    config = TrainConfig(
        max_steps=args.region_steps, batch_size=args.batch_size, learning_rate=args.region_lr,
        lr_scheduler="constant", lr_warmup_steps=20, weight_decay=0.0, max_grad_norm=1.0,
        reg_weight=args.reg_weight, seed=args.seed + 1, region_loss_weight=args.region_loss_weight,
        fused_optimizer=False,  # the committed adapter's recipe (AdamW's for-loop), bit for bit
    )
    return fit(TensorData(mean, std, captions, inst_caps, boxes, masks, regions=regions), config, "roictrl regions")


GLIGEN_GATES = ("alpha_attn", "alpha_dense")


def is_box_token_path(name: str) -> bool:
    """The layers that make the box tokens before the fuser's LayerNorm: the position net and each fuser's
    ``linear`` (what ``--gligen-token-lr-scale`` slows down)."""
    return name.startswith("position_net.") or ".fuser.linear." in name


def gligen_param_groups(model, new: set, lr_scale_gates: float, lr_scale_unet: float | None,
                        lr_scale_tokens: float = 1.0):
    """AdamW groups of the GLIGEN UNet: the gates (``alpha_attn``, ``alpha_dense`` of every
    ``GatedSelfAttentionDense``, scalars starting at 0) with their own learning-rate multiplier, the box-token
    path (:func:`is_box_token_path`) with ``lr_scale_tokens``, the other new layers (the fuser's attention and
    feed-forward, pixel positions) at the stage's learning rate and, unless ``lr_scale_unet`` is None (the
    GLIGEN paper's frozen base), the base UNet's own weights at that multiplier."""
    gates, tokens, rest, base = [], [], [], []
    for n, p in model.named_parameters():
        if n not in new:
            base.append(p)
        elif n.rsplit(".", 1)[-1] in GLIGEN_GATES:
            gates.append(p)
        else:
            (tokens if is_box_token_path(n) else rest).append(p)
    groups = [{"params": rest, "lr_scale": 1.0}, {"params": gates, "lr_scale": lr_scale_gates}]
    if tokens:
        groups.append({"params": tokens, "lr_scale": lr_scale_tokens})
    if lr_scale_unet is not None:
        groups.append({"params": base, "lr_scale": lr_scale_unet})
    return groups


def gligen_diagnostics(model) -> dict:
    """Gate values tanh(alpha) and gradient norms (of the last backward) of the gates, the fuser layers and the
    position net: what shows whether GLIGEN's grounding path is opening."""
    gates, grads = {}, {"gates": 0.0, "fuser": 0.0, "position_net": 0.0, "unet": 0.0}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = n.rsplit(".", 1)[-1]
        part = ("gates" if leaf in GLIGEN_GATES else "position_net" if n.startswith("position_net.")
                else "fuser" if ".fuser." in n else "unet")
        if leaf in GLIGEN_GATES:
            gates[n] = math.tanh(p.item())
        if p.grad is not None:
            grads[part] += p.grad.detach().pow(2).sum().item()
    return {"gates": gates, "max_abs_gate": max(abs(v) for v in gates.values()),
            "grad_norm": {k: math.sqrt(v) for k, v in grads.items()}}


def distinct_box_tokens(model) -> None:
    """Zero the two biases that every box token of a GLIGEN UNet shares: the position net's last layer and each
    fuser's ``linear``. With PyTorch's default init the position net's output is small (norm ~0.4) next to the
    fuser's ``linear`` bias (norm 0.4-0.6), so after the fuser's LayerNorm the box tokens of one layout start
    almost identical (cosine 0.95; docs/gligen_toy.md), the attention cannot tell them apart and nothing in the
    gradient separates them again. An initialisation choice only: the architecture is diffusers' unchanged."""
    from diffusers.models.attention import GatedSelfAttentionDense

    with torch.no_grad():
        model.position_net.linears[-1].bias.zero_()
        for m in model.modules():
            if isinstance(m, GatedSelfAttentionDense):
                m.linear.bias.zero_()


def gligen_curriculum(text: str) -> tuple[int, int] | None:
    """``--gligen-box-mask-curriculum FULL,END`` as (FULL, END), or None."""
    if not text:
        return None
    try:
        full, end = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--gligen-box-mask-curriculum takes FULL,END (two step counts), got {text!r}") from None
    if not 0 <= full <= end:
        raise ValueError(f"--gligen-box-mask-curriculum needs 0 <= FULL <= END, got {full},{end}")
    return full, end


def gligen_snapshot_steps(text: str) -> list[int]:
    return sorted({int(s) for s in text.split(",") if s.strip()})


def train_gligen(args, data, latents, vae, unet, text_encoder, tokenizer):
    """GLIGEN on the frozen base with the same data, batches, noise and seed as ROICtrl; steps, learning rate,
    schedule and the gates' learning-rate multiplier are its own options (``--gligen-*``, by default ROICtrl's
    budget). Writes ``<out>/gligen/gligen.safetensors``, ``<out>/gligen/train_log.json`` (loss, gate values and
    gradient norms every ``--log-every`` steps) and, for ``--gligen-snapshots``, ``<out>/gligen_step<N>/``."""
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    scheduler = DDPMScheduler(**models.scheduler_config())
    _, boxes, masks, inst_caps, captions, _ = data
    encode = _CaptionCache(text_encoder, tokenizer)
    # The new fuser/position-net layers take their initial weights from the global RNG: seed it, as
    # make_roictrl_adapter does, so the stage is reproducible whatever ran before it in the process.
    torch.manual_seed(args.seed)
    model, new = models.gligen_unet_from_base(unet)
    if args.gligen_distinct_tokens:
        distinct_box_tokens(model)
    if args.gligen_pixel_positions:  # toy remedy, not in the paper (gligen_positions.py); zero-init: no RNG used
        new |= gligen_positions.install(model, init=args.gligen_pixel_position_init)
    masked_fusers, curriculum = None, gligen_curriculum(args.gligen_box_mask_curriculum)
    if args.gligen_oracle_box_mask:  # diagnostic, not GLIGEN: the fusers' attention told each box (gligen_oracle.py)
        masked_fusers = gligen_oracle.install(model)
    elif curriculum:  # a training curriculum: the box mask fades out, the saved fuser is GLIGEN's (+ positions)
        masked_fusers = gligen_oracle.install(model, args.gligen_box_mask_start)
    if args.gligen_gate_init:  # diffusers starts every gate at alpha = 0 (the fuser adds nothing at first)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in new and n.rsplit(".", 1)[-1] in GLIGEN_GATES:
                    p.fill_(args.gligen_gate_init)
    if args.gligen_init_from:  # continue from a GLIGEN weights folder of the same variant (new layers only)
        from safetensors.torch import load_file

        state = load_file(os.path.join(args.gligen_init_from, "gligen.safetensors"))
        if set(state) != new:
            raise ValueError(f"--gligen-init-from {args.gligen_init_from}: its {len(state)} tensors are not this "
                             f"variant's {len(new)} new layers (same --gligen-pixel-positions?)")
        model.load_state_dict(state, strict=False)
    model.requires_grad_(False)
    train_unet = args.gligen_unet_lr_scale > 0
    params = [p for n, p in model.named_parameters() if train_unet or n in new]
    for p in params:
        p.requires_grad_(True)
    model.train()
    steps = args.gligen_steps or args.control_steps
    lr = args.gligen_lr or args.control_lr
    schedule = args.gligen_schedule or args.control_schedule
    log(f"gligen: {sum(p.numel() for p in params):,} trainable parameters; {steps} steps, lr {lr:g} ({schedule}), "
        f"box-token path x{args.gligen_token_lr_scale:g}, gates x{args.gligen_gate_lr_scale:g} from alpha {args.gligen_gate_init:g}, base UNet " + (f"x{args.gligen_unet_lr_scale:g}" if train_unet else "frozen"))
    opt = torch.optim.AdamW(gligen_param_groups(model, new, args.gligen_gate_lr_scale,
                                                args.gligen_unet_lr_scale if train_unet else None,
                                                args.gligen_token_lr_scale),
                            lr=lr, weight_decay=0.0)
    scale = vae.config.scaling_factor
    N = masks.shape[1]
    snapshots = gligen_snapshot_steps(args.gligen_snapshots)
    history = []

    def save(folder):
        os.makedirs(folder, exist_ok=True)
        # the new layers only, or the whole UNet when its base weights were trained too
        state = {n: p.detach().contiguous() for n, p in model.named_parameters() if train_unet or n in new}
        save_file(state, os.path.join(folder, "gligen.safetensors"), metadata={"format": "pt"})
        if args.gligen_pixel_positions:
            gligen_positions.save_config(folder)
        if masked_fusers and masked_fusers[0].oracle_strength > 0:  # a snapshot inside the curriculum, or the oracle
            gligen_oracle.save_config(folder, masked_fusers[0].oracle_strength)

    t0 = time.time()
    for step in range(steps):
        if curriculum:
            gligen_oracle.set_strength(masked_fusers, gligen_oracle.strength_at(step, *curriculum,
                                                                                args.gligen_box_mask_start))
        idx, noisy, noise, t, _ = noisy_batch(step, args, latents, scheduler, scale, len(captions), 2)
        text, _ = encode([captions[i] for i in idx.tolist()])
        flat = [inst_caps[i][k] for i in idx.tolist() for k in range(N)]
        _, pooled = encode(flat)
        B = len(idx)
        # padded to GLIGEN_MAX_OBJS slots, as StableDiffusionGLIGENPipeline pads at sampling time
        m = F.pad(masks[idx].float(), (0, GLIGEN_MAX_OBJS - N))
        b = F.pad(boxes[idx], (0, 0, 0, GLIGEN_MAX_OBJS - N)) * m[..., None]
        e = F.pad(pooled.view(B, N, -1), (0, 0, 0, GLIGEN_MAX_OBJS - N)) * m[..., None]
        kwargs = {"gligen": {"boxes": b, "masks": m, "positive_embeddings": e}}
        pred = model(noisy, t, text, cross_attention_kwargs=kwargs).sample
        loss = F.mse_loss(pred, noise)
        optimiser_step(opt, loss, step, lr, clip_params=params, total=steps if schedule == "cosine" else None)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"gligen loss became {loss.item()} at step {step}")
        if step % args.log_every == 0 or step == steps - 1:
            diag = gligen_diagnostics(model)
            history.append({"step": step + 1, "loss": loss.item(), **diag})
            log(f"gligen step {step}/{steps} ldm {loss.item():.4f} max|gate| {diag['max_abs_gate']:.4f} grad "
                + " ".join(f"{k} {v:.2e}" for k, v in diag["grad_norm"].items()) + f" ({time.time() - t0:.0f}s)")
        if step + 1 in snapshots and step + 1 < steps:
            save(os.path.join(args.out, f"gligen_step{step + 1}"))
            log(f"saved the step-{step + 1} snapshot")
    if curriculum:  # the strength after the last step: 0 once the curriculum is over (the model is unmasked)
        gligen_oracle.set_strength(masked_fusers, gligen_oracle.strength_at(steps, *curriculum, args.gligen_box_mask_start))
    save(os.path.join(args.out, args.gligen_name))
    with open(os.path.join(args.out, args.gligen_name, "train_log.json"), "w") as f:
        json.dump({"steps": steps, "lr": lr, "schedule": schedule, "gate_lr_scale": args.gligen_gate_lr_scale,
                   "gate_init": args.gligen_gate_init, "token_lr_scale": args.gligen_token_lr_scale,
                   "pixel_positions": args.gligen_pixel_positions,
                   "pixel_position_init": args.gligen_pixel_position_init,
                   "oracle_box_mask": args.gligen_oracle_box_mask,
                   "box_mask_curriculum": args.gligen_box_mask_curriculum,
                   "box_mask_start": args.gligen_box_mask_start,
                   "distinct_tokens": args.gligen_distinct_tokens,
                   "unet_lr_scale": args.gligen_unet_lr_scale if train_unet else None,
                   "seconds": round(time.time() - t0, 1), "log": history}, f, indent=1)
    log(f"saved gligen to {os.path.join(args.out, args.gligen_name)} ({time.time() - t0:.0f}s)")


def load_gligen_unet(out, unet, folder: str = "gligen"):
    """The GLIGEN UNet: the base ``unet``'s weights plus the trained GLIGEN parts from ``<out>/<folder>`` (the
    new layers only, or every weight of the GLIGEN UNet when the stage trained the base weights too)."""
    from safetensors.torch import load_file

    gligen, new = models.gligen_unet_from_base(unet)
    new |= gligen_positions.install_from_folder(gligen, os.path.join(out, folder))  # when trained with them
    gligen_oracle.install_from_folder(gligen, os.path.join(out, folder))  # the diagnostic variant, no weights
    path = os.path.join(out, folder, "gligen.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GLIGEN weights at {path} (train.py --stages gligen writes them)")
    state = load_file(path)
    every = {n for n, _ in gligen.named_parameters()}
    if set(state) != new and set(state) != every:
        raise ValueError(f"{out}/gligen holds {len(state)} tensors; expected the GLIGEN UNet's {len(new)} new ones "
                         f"or all its {len(every)}")
    gligen.load_state_dict(state, strict=False)
    return gligen.eval()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (model/, roictrl/, gligen/, train_config.json)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {STAGES}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=2000, help="training layouts (1-6 objects each)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--vae-steps", type=int, default=150)
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--decoder-steps", type=int, default=2000, help="VAE decoder fine-tuning after the base")
    p.add_argument("--base-steps", type=int, default=4000)
    p.add_argument("--lr", type=float, default=1e-3, help="base UNet + text encoder")
    p.add_argument("--base-schedule", choices=("constant", "cosine"), default="cosine",
                   help="base learning rate after the warm-up: constant, or cosine decay to 0 at --base-steps")
    p.add_argument("--control-steps", type=int, default=1200, help="ROICtrl and GLIGEN, each")
    p.add_argument("--control-schedule", choices=("constant", "cosine"), default="constant",
                   help="ROICtrl and GLIGEN learning rate after the warm-up (as --base-schedule)")
    p.add_argument("--control-lr", type=float, default=1e-3, help="ROICtrl and GLIGEN, each")
    p.add_argument("--reg-weight", type=float, default=0.01, help="weight of ROICtrl's L_reg")
    p.add_argument("--grid-policy", choices=("fixed", "footprint"), default="fixed",
                   help="ROICtrl: ROI grid policy (fixed: the committed adapter's recipe; footprint: the default of "
                        "new adapters, docs/performance.md)")
    p.add_argument("--mask-rate", type=float, default=0.0,
                   help="ROICtrl: fraction of training layouts that give their instances' masks (regions)")
    p.add_argument("--free-form-rate", type=float, default=0.0,
                   help="ROICtrl: fraction of masked instances drawn as an L or a ring (only the mask tells)")
    p.add_argument("--free-forms", default=",".join(world.FREE_FORMS),
                   help=f"ROICtrl: the free forms drawn (some of {world.FREE_FORMS})")
    p.add_argument("--free-form-word", default=None, choices=world.SHAPES,
                   help="ROICtrl: caption word of free forms (default: a random shape word)")
    p.add_argument("--region-loss-weight", type=float, default=0.0,
                   help="ROICtrl: extra weight of the diffusion loss inside the boxes of mask-shaped instances")
    p.add_argument("--region-steps", type=int, default=800,
                   help="ROICtrl: steps of the region stage after the box stage (0: none): only the adapter's "
                        "region vectors (option region_embedding) train, on layouts that all give their masks")
    p.add_argument("--region-lr", type=float, default=1e-2, help="ROICtrl: learning rate of the region stage")
    p.add_argument("--region-free-form-rate", type=float, default=0.3,
                   help="ROICtrl region stage: fraction of instances drawn as free forms (random shape word)")
    p.add_argument("--init-adapter", default="",
                   help="ROICtrl: skip the box stage, starting the region stage from this saved adapter")
    p.add_argument("--ablation", default="", help=f"roictrl stage only: train the ablation of this name instead "
                   f"({', '.join(ablations.ABLATIONS)}), saved to <out>/ablations/<name>")
    p.add_argument("--gligen-steps", type=int, default=0, help="GLIGEN steps (0: --control-steps)")
    p.add_argument("--gligen-lr", type=float, default=0.0, help="GLIGEN learning rate (0: --control-lr)")
    p.add_argument("--gligen-schedule", choices=("constant", "cosine"), default=None,
                   help="GLIGEN learning rate after the warm-up (default: --control-schedule)")
    p.add_argument("--gligen-gate-lr-scale", type=float, default=1.0,
                   help="multiplier of the learning rate of GLIGEN's gates (alpha_attn, alpha_dense)")
    p.add_argument("--gligen-gate-init", type=float, default=0.0,
                   help="initial alpha of GLIGEN's gates (diffusers and the paper: 0, so tanh(alpha) = 0)")
    p.add_argument("--gligen-token-lr-scale", type=float, default=1.0,
                   help="multiplier of the learning rate of the box-token path (position net, fusers' linear)")
    p.add_argument("--gligen-unet-lr-scale", type=float, default=0.0,
                   help="train the base UNet's weights too, at this multiple of the GLIGEN learning rate (0: frozen)")
    p.add_argument("--gligen-pixel-positions", action="store_true",
                   help="toy remedy, not in GLIGEN: a zero-initialised projection of each visual token's 2D Fourier "
                        "pixel position added to the fusers' visual tokens (gligen_positions.py)")
    p.add_argument("--gligen-pixel-position-init", choices=("zero", "random"), default="zero",
                   help="initial pixel_position_proj: zero (the fuser starts as diffusers') or PyTorch's default")
    p.add_argument("--gligen-distinct-tokens", action="store_true",
                   help="initialise the biases all box tokens share (position net's last, fusers' linear) to zero, "
                        "so the box tokens start distinct (train.distinct_box_tokens)")
    p.add_argument("--gligen-oracle-box-mask", action="store_true",
                   help="diagnostic, not GLIGEN: each visual token's fuser attention sees only its own boxes' tokens "
                        "(gligen_oracle.py)")
    p.add_argument("--gligen-box-mask-curriculum", default="", metavar="FULL,END",
                   help="training curriculum: each visual token's fuser attention to the box tokens outside its box "
                        "gets -S (--gligen-box-mask-start) for the first FULL steps, fading linearly to 0 at step END; "
                        "after END (and in the saved model) the fuser is GLIGEN's (gligen_oracle.py)")
    p.add_argument("--gligen-box-mask-start", type=float, default=8.0, help="S of --gligen-box-mask-curriculum")
    p.add_argument("--gligen-init-from", default="", help="start GLIGEN's new layers from this weights folder")
    p.add_argument("--gligen-name", default="gligen", help="GLIGEN's output folder under --out")
    p.add_argument("--gligen-snapshots", default="", help="GLIGEN steps to also save as <out>/gligen_step<N>, e.g. 1200,3000")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines (GLIGEN: diagnostics too)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a few steps per stage and a small dataset (tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.num_samples, args.batch_size = 64, 4
        args.vae_steps, args.base_steps, args.decoder_steps, args.control_steps = 3, 3, 3, 3
        args.region_steps = min(args.region_steps, 3)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    bad = [s for s in args.stages if s not in STAGES]
    if bad:
        p.error(f"--stages takes some of {STAGES}, got {bad}")
    if args.ablation and (args.ablation not in ablations.ABLATIONS or args.stages != ["roictrl"]):
        p.error(f"--ablation takes one of {sorted(ablations.ABLATIONS)} with --stages roictrl alone, got "
                f"--ablation {args.ablation!r} with --stages {','.join(args.stages)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    args.command = "python -m benchmarks.instance_control.train " + " ".join(sys.argv[1:] if argv is None else argv)
    record = {k: v for k, v in vars(args).items()}
    record.update(torch=torch.__version__, python=platform.python_version(), machine=platform.machine())
    tag = "_".join(args.stages) + (f"_{args.ablation}" if args.ablation else "")
    if "gligen" in args.stages and args.gligen_name != "gligen":
        tag += f"_{args.gligen_name}"
    with open(os.path.join(args.out, f"train_config_{tag}.json"), "w") as f:
        json.dump(record, f, indent=2)
    t0 = time.time()
    data = dataset(args.num_samples, args.seed, args.mask_rate, args.free_form_rate,
                   tuple(args.free_forms.split(",")), args.free_form_word)
    log(f"dataset: {args.num_samples} layouts ({time.time() - t0:.0f}s)")
    if "vae" in args.stages:
        vae = train_vae(args, data)
        os.makedirs(os.path.join(args.out, "model"), exist_ok=True)
        vae.save_pretrained(os.path.join(args.out, "model", "vae"))
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(os.path.join(args.out, "model", "vae")).eval()
    vae.requires_grad_(False)
    latents = encode_latents(vae, data[0], args.seed)
    if "base" in args.stages:
        unet, text_encoder, tokenizer = train_base(args, data, vae, latents)
    if "decoder" in args.stages:
        vae = finetune_decoder(args, vae, data[0], latents)
        vae.save_pretrained(os.path.join(args.out, "model", "vae"))
        log("saved the fine-tuned decoder with the VAE")
    if "roictrl" in args.stages:
        train_roictrl(args, data, latents)
    if "gligen" in args.stages:
        train_gligen(args, data, latents, *load_model(args.out))
    log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
