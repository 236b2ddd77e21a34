"""The one ROICtrl training loop, on Hugging Face Accelerate: ``roi-ops train``, the toy benchmark's ROICtrl stage
and ``examples/train_roictrl.py`` all run :func:`train_adapter`.

What one optimisation step does (``B`` = batch size per process, ``A`` = gradient-accumulation steps, ``P``
processes, process ``r``):

1. micro-batch ``m = step * A + a`` (``a`` = 0..A-1) seeds a generator
   ``g = torch.Generator().manual_seed(seed * 100_003 + 7 * m + 2)``; from ``g``, in this order, for the global
   batch of ``P * B`` samples: the sample indices (drawn uniformly with replacement from the dataset), the
   ``eps`` of the latent drawn from each image's VAE posterior (``mean + std * eps``), the noise and the timesteps;
   process ``r`` takes samples ``r * B`` to ``(r + 1) * B - 1``. So the data, latents and noise of a step are a
   pure function of (seed, step): a resumed run sees exactly what an uninterrupted one would have seen, and
   ``P`` processes at batch ``B`` see the samples and noise of one process at batch ``P * B``;
2. the frozen text encoder(s) encode the prompts and every instance caption (the same ``encode_prompt`` the
   pipeline uses at sampling time; SDXL: both encoders' penultimate states, the pooled embedding and the size
   time ids), the frozen UNet with the adapter installed predicts the noise (or ``v``), and
   ``L = L_LDM + reg_weight * L_reg`` (``L_reg`` = ``adapter.regularization_loss()``, ``reg_weight`` 0.01);
3. the gradients of the ``A`` micro-batches are averaged (and across processes, by DDP), clipped to norm
   ``max_grad_norm`` and AdamW steps; the learning rate follows a linear warm-up (``lr * min(1, (s + 1) / W)``)
   then ``constant``, ``cosine`` or ``linear`` decay to 0 at ``max_steps``.

Checkpoints (``<out>/checkpoint-<step>/``) hold the adapter, the optimizer, the learning-rate scheduler, the RNG
states of every process and ``trainer_state.json`` (step, data position, settings); each is written to a temporary
folder and renamed into place, so an interrupted write never leaves a folder named ``checkpoint-<step>``.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .host_memory import retain_freed_host_memory

__all__ = ["TrainConfig", "CaptionEncoder", "train_adapter", "step_generator", "lr_factor", "find_checkpoint",
           "latest_checkpoint", "LR_SCHEDULERS"]

LR_SCHEDULERS = ("constant", "cosine", "linear")
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainConfig:
    max_steps: int
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    reg_weight: float = 0.01
    # > 0: the diffusion loss weighs the latent pixels inside the boxes of mask-shaped instances (regions not all
    # ones) by 1 + region_loss_weight (normalised by the mean weight), where the mask decides what goes where
    region_loss_weight: float = 0.0
    seed: int = 0
    checkpoint_every: int = 0  # 0: only at the end
    validation_every: int = 0
    log_every: int = 1
    gradient_checkpointing: bool = False
    # AdamW's fused kernel (one pass per parameter tensor; the same update as the default loop, not bitwise):
    # None: fused wherever torch has it for the adapter's device and dtype. About 5x faster than the for-loop
    # AdamW torch uses on CPU by default (0.6 s against 2.8 s per step for a 164 M-parameter adapter, 1 thread).
    fused_optimizer: bool | None = None
    # glibc malloc keeps freed memory instead of unmapping it and faulting it in again every step
    # (host_memory.retain_freed_host_memory, process-wide). None: on when training on the CPU.
    retain_host_memory: bool | None = None
    extra: dict = field(default_factory=dict)  # recorded in trainer_state.json


def _use_fused_adamw(params: Sequence[torch.Tensor], fused: bool | None) -> bool:
    """``TrainConfig.fused_optimizer`` resolved: ``None`` means fused where torch's fused AdamW runs (floating
    parameters on CPU or CUDA)."""
    if fused is not None:
        return fused
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        for p in params
    )


def step_generator(seed: int, index: int) -> torch.Generator:
    """The generator of micro-batch ``index`` (see the module docstring)."""
    return torch.Generator().manual_seed(seed * 100_003 + index * 7 + 2)


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """Learning-rate multiplier at optimisation ``step`` (0-based)."""
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if kind != "constant" and step >= warmup:
        frac = (step - warmup) / max(1, total - warmup)
        factor *= 0.5 * (1 + math.cos(math.pi * frac)) if kind == "cosine" else max(0.0, 1.0 - frac)
    return factor


class CaptionEncoder:
    """Texts -> (token states ``[n, L, D]``, pooled ``[n, D']`` or ``None``) through the pipeline's own
    ``encode_prompt``. Each call encodes the distinct texts not yet known, sorted, in one batch; with ``cache``
    every result is kept for the whole run, else only for the current step (:meth:`new_step`)."""

    def __init__(self, pipe, device, cache: bool = False, chunk: int = 256):
        self.pipe, self.device, self.cache, self.chunk = pipe, device, cache, chunk
        self.store: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def new_step(self) -> None:
        if not self.cache:
            self.store = {}

    @torch.no_grad()
    def _encode(self, texts: list[str]) -> None:
        for i in range(0, len(texts), self.chunk):
            part = texts[i: i + self.chunk]
            out = self.pipe.encode_prompt(prompt=part, device=self.device, num_images_per_prompt=1,
                                          do_classifier_free_guidance=False)
            states = out[0]
            pooled = out[2] if len(out) > 2 else None
            for k, t in enumerate(part):
                self.store[t] = (states[k], None if pooled is None else pooled[k])

    def precompute(self, texts) -> None:
        todo = sorted({t for t in texts if t not in self.store})
        if todo:
            self._encode(todo)

    def __call__(self, texts: Sequence[str]):
        self.precompute(texts)
        states = torch.stack([self.store[t][0] for t in texts])
        pooled = None if self.store[texts[0]][1] is None else torch.stack([self.store[t][1] for t in texts])
        return states, pooled


class _Denoiser(nn.Module):
    """The frozen UNet with the adapter's hooks, as one module, so DDP sees the adapter's parameters and the
    forward (the UNet's parameters are frozen and not synchronised)."""

    def __init__(self, unet: nn.Module, adapter: nn.Module):
        super().__init__()
        self.unet, self.adapter = unet, adapter

    def forward(self, noisy, timesteps, text, instances, added_cond_kwargs=None):
        kwargs = {} if added_cond_kwargs is None else {"added_cond_kwargs": added_cond_kwargs}
        pred = self.unet(noisy, timesteps, text, cross_attention_kwargs={"roictrl": instances}, **kwargs).sample
        return pred, self.adapter.regularization_loss()


# ---------------------------------------------------------------------------------------------- checkpoints
def _region_weighted_mse(pred, target, boxes, masks, regions, weight: float) -> torch.Tensor:
    """MSE whose latent pixels inside the box of a mask-shaped instance (valid, region not all ones) weigh
    ``1 + weight``, divided by the mean weight (so a batch without such instances gives the plain MSE)."""
    B, _, h, w = pred.shape
    shaped = masks.bool() & (regions.flatten(2).amin(-1) < 1)  # [B, N]
    cy = (torch.arange(h, device=pred.device) + 0.5) / h
    cx = (torch.arange(w, device=pred.device) + 0.5) / w
    x1, y1, x2, y2 = boxes.unbind(-1)  # [B, N] each
    inside = ((cy >= y1[..., None]) & (cy < y2[..., None]))[..., :, None] & (
        (cx >= x1[..., None]) & (cx < x2[..., None]))[..., None, :]  # [B, N, h, w]
    emphasis = (inside & shaped[..., None, None]).any(1).float()  # [B, h, w]
    wmap = (1 + weight * emphasis)[:, None]
    return ((pred - target) ** 2 * wmap).mean() / wmap.mean()


def find_checkpoint(output_dir: str, step: int | None = None) -> str | None:
    """The completed ``checkpoint-<step>`` folder (the newest when ``step`` is None), or ``None``."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        if name.startswith("checkpoint-") and name[len("checkpoint-"):].isdigit():
            path = os.path.join(output_dir, name)
            if os.path.isfile(os.path.join(path, TRAINER_STATE)):
                found.append((int(name[len("checkpoint-"):]), path))
    if step is not None:
        found = [f for f in found if f[0] == step]
    return max(found)[1] if found else None


latest_checkpoint = find_checkpoint


def _rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(accelerator, output_dir: str, step: int, adapter, optimizer, scheduler, config: TrainConfig,
                     data_position: int) -> str | None:
    """Write ``<output_dir>/checkpoint-<step>`` atomically (temporary folder, then one rename)."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    # every process keeps its own RNG state (dropout draws from it)
    torch.save(_rng_state(), os.path.join(tmp, f"rng_state_{accelerator.process_index}.pt"))
    if accelerator.is_main_process:
        adapter.save_pretrained(os.path.join(tmp, "adapter"))
        torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        state = {"step": step, "data_position": data_position, "num_processes": accelerator.num_processes,
                 "config": asdict(config)}
        with open(os.path.join(tmp, TRAINER_STATE), "w") as f:  # written last
            json.dump(state, f, indent=2)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(final):  # e.g. rerun of the same step: replace it as one rename
            old = final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    accelerator.wait_for_everyone()
    return final


def _load_checkpoint(accelerator, path: str, adapter, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file

    from roi_ops.roictrl_adapter.adapter import WEIGHTS_NAME

    with open(os.path.join(path, TRAINER_STATE)) as f:
        state = json.load(f)
    if state["num_processes"] != accelerator.num_processes:
        raise ValueError(
            f"{path} was written by {state['num_processes']} process(es), this run has {accelerator.num_processes}: "
            "the data order depends on the process count, so it cannot continue exactly"
        )
    weights = load_file(os.path.join(path, "adapter", WEIGHTS_NAME))
    adapter.load_state_dict(weights)
    optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=True))
    rng = os.path.join(path, f"rng_state_{accelerator.process_index}.pt")
    _set_rng_state(torch.load(rng, weights_only=False))
    return state


# ---------------------------------------------------------------------------------------------- the loop
class _StepBatches(torch.utils.data.Dataset):
    """Item ``m`` = this process's batch of micro-batch ``m`` (for the DataLoader workers)."""

    def __init__(self, data, seed, batch_size, accum, world, rank):
        self.data, self.seed, self.B, self.A, self.P, self.r = data, seed, batch_size, accum, world, rank

    def indices(self, micro: int) -> torch.Tensor:
        g = step_generator(self.seed, micro)
        return torch.randint(len(self.data), (self.P * self.B,), generator=g)[self.r * self.B: (self.r + 1) * self.B]

    def __len__(self):
        return 1 << 62

    def __getitem__(self, micro: int):
        return self.data.get(self.indices(micro).tolist())


def train_adapter(
    *,
    accelerator,
    unet: nn.Module,
    adapter: nn.Module,
    noise_scheduler,
    encoder: CaptionEncoder,
    data,
    config: TrainConfig,
    vae: nn.Module | None = None,
    scaling_factor: float = 1.0,
    shift_factor: float | None = None,
    sdxl: bool = False,
    output_dir: str | None = None,
    resume_from: str | None = None,
    num_workers: int = 0,
    validate: Callable[[int], None] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
    on_step: Callable[[int, dict], Any] | None = None,
) -> dict:
    """Train ``adapter`` (already built, float32, on ``accelerator.device``) on the frozen ``unet`` for
    ``config.max_steps`` optimisation steps; returns ``{"step", "seconds", "last": {loss...}}``.

    ``data`` has ``__len__``, ``max_instances`` and ``get(indices) -> Batch`` (pixels, or the cached latent
    posterior). With ``output_dir``: checkpoints, ``train_log.jsonl`` and ``adapter/`` at the end. ``resume_from``:
    a checkpoint folder to continue from. ``validate(step)`` runs on the main process every
    ``config.validation_every`` steps (the adapter in eval mode, its hooks on the UNet). ``on_step(step, stats)``
    is called after every optimisation step (``step`` counts from 1).
    """
    from roi_ops.roictrl_adapter.instances import ROICtrlInstances

    device = accelerator.device
    if config.retain_host_memory or (config.retain_host_memory is None and device.type == "cpu"):
        retain_freed_host_memory()
    A, B = config.gradient_accumulation_steps, config.batch_size
    P, r = accelerator.num_processes, accelerator.process_index
    params = [p for p in adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  fused=True if _use_fused_adamw(params, config.fused_optimizer) else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.lr_warmup_steps, config.max_steps, config.lr_scheduler)
    )
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()  # diffusers checkpoints only in training mode; the frozen UNet has no dropout by default
    adapter.install(unet)
    denoiser = _Denoiser(unet, adapter)
    # The adapter's DDP wrapper; the optimizer wrapper handles fp16 loss scaling. The scheduler is stepped by
    # hand (accelerate's wrapper would step it once per process).
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)

    start = 0
    if resume_from is not None:
        state = _load_checkpoint(accelerator, resume_from, adapter, optimizer, scheduler)
        start = state["step"]
        log(f"resumed from {resume_from} at step {start}")
    if start > config.max_steps:
        raise ValueError(f"the checkpoint is at step {start}, past --max-steps {config.max_steps}")

    batches = _StepBatches(data, config.seed, B, A, P, r)
    loader = None
    if num_workers > 0:
        sampler = range(start * A, config.max_steps * A)
        loader = iter(torch.utils.data.DataLoader(batches, batch_size=None, sampler=sampler, num_workers=num_workers))
    log_file = None
    if output_dir is not None and accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        log_file = open(os.path.join(output_dir, "train_log.jsonl"), "a")
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_steps, initial=start, desc="roictrl train", dynamic_ncols=True)

    prediction = noise_scheduler.config.prediction_type
    T = noise_scheduler.config.num_train_timesteps
    N = data.max_instances
    adapter.train()
    t_start = time.time()
    last: dict[str, float] = {}
    step = start
    try:
        for step in range(start, config.max_steps):
            t0 = time.time()
            sums = {"loss": 0.0, "l_ldm": 0.0, "l_reg": 0.0}
            for a in range(A):
                micro = step * A + a
                g = step_generator(config.seed, micro)
                mine = slice(r * B, (r + 1) * B)  # this process's share of the global batch
                idx = torch.randint(len(data), (P * B,), generator=g)[mine]
                batch = next(loader) if loader is not None else data.get(idx)
                encoder.new_step()
                with torch.no_grad():
                    if batch.latent_mean is not None:
                        mean, std = batch.latent_mean, batch.latent_std
                    else:
                        post = vae.encode(batch.images.to(device, vae.dtype)).latent_dist
                        mean, std = post.mean, post.std
                    shape = (P * B, *mean.shape[1:])
                    z = mean + std * torch.randn(shape, generator=g)[mine].to(mean.device, mean.dtype)
                    if shift_factor is not None:
                        z = z - shift_factor
                    z = (z * scaling_factor).to(device)
                    noise = torch.randn(shape, generator=g)[mine].to(device, z.dtype)
                    t = torch.randint(0, T, (P * B,), generator=g)[mine].to(device)
                    noisy = noise_scheduler.add_noise(z, noise, t)
                    target = noise if prediction == "epsilon" else noise_scheduler.get_velocity(z, noise, t)
                    text, pooled = encoder(batch.prompts)
                    flat = [batch.captions[i][k] for i in range(B) for k in range(N)]
                    states, _ = encoder(flat)
                    regions = None if batch.regions is None else batch.regions.to(device)
                    instances = ROICtrlInstances(batch.boxes.to(device), states.view(B, N, *states.shape[1:]),
                                                 batch.masks.to(device), regions=regions)
                    added = None
                    if sdxl:
                        added = {"text_embeds": pooled, "time_ids": batch.time_ids.to(device, pooled.dtype)}
                unet_dtype = next(unet.parameters()).dtype
                sync = a == A - 1
                ctx = accelerator.no_sync(denoiser) if not sync and P > 1 else _nullcontext()
                with ctx, accelerator.autocast():
                    pred, reg = denoiser(noisy.to(unet_dtype), t, text.to(unet_dtype), instances, added)
                    if config.region_loss_weight > 0 and batch.regions is not None:
                        l_ldm = _region_weighted_mse(pred.float(), target.float(), batch.boxes.to(device),
                                                     batch.masks.to(device), batch.regions.to(device),
                                                     config.region_loss_weight)
                    else:
                        l_ldm = F.mse_loss(pred.float(), target.float())
                    loss = l_ldm + config.reg_weight * reg
                    accelerator.backward(loss / A if A > 1 else loss)
                if not math.isfinite(loss.item()):
                    raise FloatingPointError(f"the loss became {loss.item()} at step {step}")
                sums["loss"] += loss.item() / A
                sums["l_ldm"] += l_ldm.item() / A
                sums["l_reg"] += reg.item() / A
            if config.max_grad_norm is not None:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            if P > 1:  # the log shows the whole global batch's losses
                mean = accelerator.reduce(torch.tensor([sums["loss"], sums["l_ldm"], sums["l_reg"]], device=device),
                                          "mean")
                sums = dict(zip(("loss", "l_ldm", "l_reg"), mean.tolist()))
            last = {**sums, "lr": lr}
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sums['l_ldm']:.4f}", reg=f"{sums['l_reg']:.3f}")
            if log_file is not None and (done % config.log_every == 0 or done == config.max_steps):
                log_file.write(json.dumps({"step": done, **{k: round(v, 6) for k, v in sums.items()}, "lr": lr,
                                           "seconds": round(time.time() - t0, 4)}) + "\n")
                log_file.flush()
            if accelerator.trackers:
                accelerator.log({**sums, "lr": lr}, step=done)
            if on_step is not None:
                on_step(done, last)
            if output_dir is not None and (
                (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.max_steps
            ):
                _save_checkpoint(accelerator, output_dir, done, accelerator.unwrap_model(denoiser).adapter,
                                 optimizer, scheduler, config, done * A)
            if validate is not None and config.validation_every and done % config.validation_every == 0:
                if accelerator.is_main_process:
                    adapter.eval()
                    validate(done)
                    adapter.train()
                accelerator.wait_for_everyone()
        step = config.max_steps
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()
        adapter.eval()
        if adapter.is_installed:
            adapter.uninstall(unet)
        if config.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
            unet.eval()
    if output_dir is not None and accelerator.is_main_process:
        final = os.path.join(output_dir, "adapter")
        tmp = os.path.join(output_dir, ".tmp-adapter")
        shutil.rmtree(tmp, ignore_errors=True)
        adapter.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    accelerator.wait_for_everyone()
    return {"step": step, "seconds": time.time() - t_start, "last": last}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
