"""``roi-ops train``: train a ROICtrl adapter on an image folder of boxed captions (docs/training.md).

One process by default; ``accelerate launch -m roi_ops.cli train ...`` runs the same command on several processes
(GPUs, nodes) with no change. Everything the data, the model folder and the flags can get wrong is checked before
the first step and reported as one line with exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Any

from roi_ops.cli import fail

from .data import DatasetError

EPILOG = """\
data: DIR/metadata.jsonl, one line per image:
  {"file_name": "images/0001.png", "prompt": "a red circle and a blue square",
   "instances": [{"box": [0.1, 0.2, 0.5, 0.6], "caption": "a red circle"}, ...],
   "box_format": "xyxy" | "xywh" (optional), "box_units": "normalized" | "pixels" (optional)}
  (instances as in the layout JSON of roi-ops generate, each optionally with a "mask": a PNG path relative to
  DIR, a COCO RLE or a COCO polygon). Images are resized (shorter side to --resolution) and centre-cropped;
  boxes and masks follow. Outputs in --output-dir: checkpoint-<step>/, adapter/ (load_adapter reads it),
  train_log.jsonl, validation/step-<N>.png. Multi-GPU / multi-node: accelerate launch -m roi_ops.cli train ...
"""


class UsageError(ValueError):
    pass


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train a ROICtrl adapter on an image folder with boxes and captions (Accelerate)",
        description="Train a ROICtrl adapter on a frozen diffusers SD1.x/SD2.x/SDXL model: only the adapter "
        "learns, L = L_LDM + 0.01 L_reg. The adapter's architecture defaults come from the model folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="local diffusers folder of the base model (unet/, vae/, ...)")
    p.add_argument("--data", required=True, help="image folder with metadata.jsonl (format below)")
    p.add_argument("--output-dir", required=True, help="checkpoints, adapter/, train_log.jsonl, validation/")
    p.add_argument("--max-steps", type=int, default=1000, help="optimisation steps in all (default 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per process and micro-batch (default 16)")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--lr-scheduler", choices=("constant", "cosine", "linear"), default="constant",
                   help="after the warm-up: constant, or cosine/linear decay to 0 at --max-steps (default constant)")
    p.add_argument("--lr-warmup-steps", type=int, default=50, help="linear warm-up steps (default 50)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm, 0 = off (default 1)")
    p.add_argument("--reg-weight", type=float, default=0.01, help="weight of L_reg (default 0.01, the paper's)")
    p.add_argument("--resolution", type=int, help="training image side in px (default: the model's own size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter's init, data order and noise")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                   help="frozen UNet/text encoders in this dtype under autocast; the adapter stays float32")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations (less memory)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="checkpoint every N steps, 0 = only at the end")
    p.add_argument("--resume", nargs="?", const="latest", metavar="CHECKPOINT",
                   help="continue from the newest checkpoint-<step> in --output-dir (or from CHECKPOINT)")
    p.add_argument("--init-adapter", metavar="PATH", help="start from this adapter (its architecture, its weights)")
    p.add_argument("--adapter-config", metavar="FILE",
                   help="JSON of ROICtrlAdapter.from_unet options overriding the defaults from the model folder")
    p.add_argument("--validation-layout", metavar="FILE", help="layout JSON (as for roi-ops generate)")
    p.add_argument("--validation-every", type=int, default=0, help="validation image every N steps (0 = at the end)")
    p.add_argument("--validation-steps", type=int, default=20, help="denoising steps of validation (default 20)")
    p.add_argument("--validation-guidance-scale", type=float, default=7.5, help="(default 7.5)")
    p.add_argument("--report-to", choices=("none", "tensorboard", "wandb"), default="none",
                   help="experiment tracker (train_log.jsonl is always written)")
    p.add_argument("--dataloader-workers", type=int, default=0, help="image-loading worker processes (default 0)")
    p.add_argument("--cache-embeddings", action="store_true",
                   help="encode every image's latent posterior and every caption once, before training (memory: "
                   "the whole dataset's latents and caption states)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--release-host-memory", action="store_true",
                   help="let glibc malloc give freed memory back to the OS during training (its default; without "
                   "this flag a CPU run keeps it for the next step instead of page-faulting it in again)")
    p.set_defaults(func=run)
    return p


_fail = functools.partial(fail, "train")


def _check_numbers(args) -> None:
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps"):
        v = getattr(args, name)
        if v < (0 if name == "max_steps" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be >= {0 if name == 'max_steps' else 1}, got {v}")
    for name in ("checkpoint_every", "validation_every", "dataloader_workers", "lr_warmup_steps"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not args.learning_rate > 0:
        raise UsageError(f"--learning-rate must be > 0, got {args.learning_rate}")
    if args.validation_every and not args.validation_layout:
        raise UsageError("--validation-every needs --validation-layout")
    if args.report_to != "none":
        import importlib.util

        if importlib.util.find_spec(args.report_to) is None:
            raise UsageError(f"--report-to {args.report_to}: the {args.report_to} package is not installed "
                             f"(pip install {args.report_to})")


def _read_adapter_config(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"--adapter-config {path!r}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--adapter-config {path!r} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"--adapter-config must hold a JSON object, got {type(cfg).__name__}")
    if "grid_sizes" in cfg:
        try:
            cfg["grid_sizes"] = {int(k): int(v) for k, v in dict(cfg["grid_sizes"]).items()}
        except (TypeError, ValueError):
            raise UsageError('--adapter-config grid_sizes must map downsampling factors to grid sides, e.g. '
                             '{"8": 25, "16": 19}') from None
    return cfg


def _validation_layout(path: str, resolution: int):
    from roi_ops.roictrl_adapter.generate import read_layout
    from roi_ops.roictrl_adapter.pipeline import normalize_instances

    layout = read_layout(path)
    prompt = layout.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise UsageError(f"--validation-layout {path!r} needs a non-empty \"prompt\"")
    h, w = layout.get("height") or resolution, layout.get("width") or resolution
    opts = dict(box_format=layout.get("box_format", "xyxy"), box_units=layout.get("box_units", "normalized"))
    instances = normalize_instances(layout.get("instances", []), 1, width=w, height=h, **opts)[0]
    return layout, opts, instances, (h, w)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (UsageError, DatasetError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        from .trainer import find_checkpoint

        last = find_checkpoint(args.output_dir)
        print(f"\nroi-ops train: interrupted; the last complete checkpoint is {last or 'none'} "
              "(continue with --resume)", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from .data import FolderData, check_resolution, read_dataset
    from .models import ModelError, adapter_defaults, model_geometry

    t_setup = time.time()
    _check_numbers(args)
    # --- everything that reads only small files, before any weight is loaded
    try:
        geometry = model_geometry(args.model)
    except ModelError as e:
        raise UsageError(str(e)) from None
    resolution = args.resolution or geometry.default_resolution
    try:
        check_resolution(resolution, geometry.multiple)
    except ValueError as e:
        raise UsageError(str(e)) from None
    records = read_dataset(args.data)
    # masks at the latents' resolution: every adapter layer's map divides it (area averages stay exact), and a
    # batch's regions cost B x N x (resolution / vae factor)^2 floats
    data = FolderData(records, resolution, region_size=resolution // geometry.vae_scale_factor)
    validation = None
    if args.validation_layout:
        try:
            validation = _validation_layout(args.validation_layout, resolution)
        except (ValueError, TypeError) as e:
            raise UsageError(f"--validation-layout: {e}") from None
    if args.init_adapter and not os.path.exists(args.init_adapter):
        raise UsageError(f"--init-adapter {args.init_adapter!r}: no such file or folder")
    overrides = _read_adapter_config(args.adapter_config) if args.adapter_config else {}
    resume_from = None
    if args.resume:
        from .trainer import find_checkpoint

        if args.resume == "latest":
            resume_from = find_checkpoint(args.output_dir)
            if resume_from is None:
                print(f"roi-ops train: no checkpoint in {args.output_dir}; starting from step 0", file=sys.stderr)
        else:
            resume_from = args.resume
            if not os.path.isfile(os.path.join(resume_from, "trainer_state.json")):
                raise UsageError(f"--resume {resume_from!r} is not a complete checkpoint folder")
        if resume_from is not None:
            with open(os.path.join(resume_from, "trainer_state.json")) as f:
                state = json.load(f)
            saved = state["config"]
            if state["step"] > args.max_steps:
                raise UsageError(f"--resume: {resume_from} is at step {state['step']}, past --max-steps "
                                 f"{args.max_steps}")
            for key, flag in (("batch_size", "--batch-size"), ("gradient_accumulation_steps",
                              "--gradient-accumulation-steps"), ("seed", "--seed")):
                if saved[key] != getattr(args, key):
                    raise UsageError(f"--resume: {resume_from} was trained with {flag} {saved[key]}, this run has "
                                     f"{getattr(args, key)}; the run can only continue exactly with the same value")

    # --- the heavy part
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from roi_ops.roictrl_adapter import ROICtrlAdapter
    from roi_ops.roictrl_adapter.adapter import load_adapter

    from .models import load_frozen_model
    from .trainer import CaptionEncoder, TrainConfig, train_adapter

    trackers = None if args.report_to == "none" else args.report_to
    # No GPU: say so, so that Accelerate also takes a torchrun/accelerate launch on CPUs as multi-process (gloo)
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    accelerator = Accelerator(
        cpu=not gpu and not torch.backends.mps.is_available(),
        mixed_precision=args.mixed_precision, log_with=trackers, project_dir=args.output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    device = accelerator.device
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.mixed_precision]
    frozen = load_frozen_model(args.model)
    pipe = frozen.pipe
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            # the VAE stays float32 (SDXL's overflows in float16); it only encodes, without gradients
            dtype = torch.float32 if name == "vae" else weight_dtype
            if any(p.dtype != dtype for p in module.parameters()):
                module.to(device, dtype=dtype)
            else:
                module.to(device)
    unet = pipe.unet

    set_seed(args.seed)  # the adapter's initial weights
    try:
        if resume_from is not None:
            adapter = ROICtrlAdapter.from_pretrained(os.path.join(resume_from, "adapter"), unet=unet, dtype=torch.float32)
        elif args.init_adapter:
            adapter = load_adapter(args.init_adapter, unet, dtype=torch.float32)
        else:
            kwargs = {**adapter_defaults(geometry, resolution), **overrides}
            adapter = ROICtrlAdapter.from_unet(unet, **kwargs).float()
    except (ValueError, TypeError, FileNotFoundError) as e:
        what = "--init-adapter" if args.init_adapter and resume_from is None else (
            "--resume" if resume_from else "--adapter-config")
        raise UsageError(f"{what}: {e}") from None
    adapter.to(device)
    adapter.requires_grad_(True)

    vae = pipe.vae
    encoder = CaptionEncoder(pipe, device, cache=args.cache_embeddings)
    if args.cache_embeddings:
        data = _cache(data, vae, encoder, args.batch_size, device, accelerator)

    config = TrainConfig(
        max_steps=args.max_steps, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, learning_rate=args.learning_rate,
        lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None, reg_weight=args.reg_weight, seed=args.seed,
        checkpoint_every=args.checkpoint_every, validation_every=args.validation_every,
        gradient_checkpointing=args.gradient_checkpointing,
        retain_host_memory=False if args.release_host_memory else None,
        extra={"model": args.model, "data": args.data, "resolution": resolution,
               "mixed_precision": args.mixed_precision, "cache_embeddings": args.cache_embeddings,
               "adapter": adapter.config},
    )
    if trackers:
        try:
            accelerator.init_trackers("roictrl", config={k: v for k, v in vars(args).items()
                                                         if isinstance(v, (int, float, str, bool))})
        except Exception as e:  # a tracker that is not installed or not logged in
            raise UsageError(f"--report-to {args.report_to}: {e}") from None
    validate = None
    if validation is not None:
        validate = _make_validate(pipe, adapter, validation, args, resolution)
    os.makedirs(args.output_dir, exist_ok=True)
    if accelerator.is_main_process:
        print(f"roi-ops train: {len(data)} images, resolution {resolution}, {accelerator.num_processes} "
              f"process(es), adapter {sum(p.numel() for p in adapter.parameters()):,} parameters, grids "
              f"{sorted({(s.downsample, s.grid) for s in adapter.specs})} (setup {time.time() - t_setup:.0f}s)",
              file=sys.stderr)
    result = train_adapter(
        accelerator=accelerator, unet=unet, adapter=adapter, noise_scheduler=frozen.noise_scheduler, encoder=encoder,
        data=data, config=config, vae=vae, scaling_factor=vae.config.scaling_factor,
        shift_factor=getattr(vae.config, "shift_factor", None), sdxl=geometry.sdxl, output_dir=args.output_dir,
        resume_from=resume_from, num_workers=args.dataloader_workers, validate=validate,
        progress=not args.no_progress, log=lambda m: print(f"roi-ops train: {m}", file=sys.stderr),
    )
    if validate is not None and not args.validation_every and accelerator.is_main_process:
        validate(result["step"])
    if trackers:
        accelerator.end_training()
    if accelerator.is_main_process:
        print(f"roi-ops train: {result['step']} steps in {result['seconds']:.0f}s; adapter in "
              f"{os.path.join(args.output_dir, 'adapter')}")
    return 0


def _cache(data, vae, encoder, chunk: int, device, accelerator):
    """The folder's images as latent posteriors (encoded in batches of ``chunk``) and every caption encoded."""
    import torch

    from .data import TensorData

    means, stds = [], []
    n = len(data)
    with torch.no_grad():
        for i in range(0, n, chunk):
            idx = list(range(i, min(n, i + chunk)))
            post = vae.encode(data.get(idx).images.to(device, vae.dtype)).latent_dist
            means.append(post.mean)
            stds.append(post.std)
    meta = data.meta(list(range(n)))
    encoder.precompute(meta.prompts + [c for row in meta.captions for c in row])
    return TensorData(torch.cat(means), torch.cat(stds), meta.prompts, meta.captions, meta.boxes, meta.masks,
                      meta.time_ids, regions=data.regions)  # masks: decoded per batch, not cached


def _make_validate(pipe, adapter, validation, args, resolution):
    import copy

    import torch

    from roi_ops.roictrl_adapter.generate import draw_boxes
    from roi_ops.roictrl_adapter.pipeline import ROICtrlPipeline

    layout, opts, instances, (h, w) = validation
    folder = os.path.join(args.output_dir, "validation")

    def validate(step: int) -> None:
        unet = pipe.unet
        was_installed = adapter.is_installed
        if was_installed:
            adapter.uninstall(unet)
        was_training = unet.training
        unet.eval()
        try:
            # a copy: the pipeline puts its adapter in the UNet's dtype, the trained one stays float32
            roictrl = ROICtrlPipeline.from_pipe(pipe, copy.deepcopy(adapter).eval())
            image = roictrl(
                layout["prompt"], instances=layout.get("instances", []), negative_prompt=layout.get("negative_prompt"),
                height=h, width=w, num_inference_steps=args.validation_steps,
                guidance_scale=args.validation_guidance_scale,
                generator=torch.Generator(pipe.device).manual_seed(args.seed), **opts,
            ).images[0]
        finally:
            unet.train(was_training)
            if was_installed:
                adapter.install(unet)
        os.makedirs(folder, exist_ok=True)
        side = max(256, image.width)
        if image.width < side:  # small images: drawn boxes and captions readable
            from PIL import Image

            image = image.resize((side, round(image.height * side / image.width)), Image.NEAREST)
        draw_boxes(image, instances).save(os.path.join(folder, f"step-{step}.png"))

    return validate
