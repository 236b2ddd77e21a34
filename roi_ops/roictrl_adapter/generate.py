"""``roi-ops generate``: prompt + layout (boxes + captions) -> image, with a ROICtrl adapter on a diffusers model.

Writes ``--out`` and, beside it, the same image with every box and caption drawn (``<out>.boxes.png``).
The layout JSON format is documented in docs/pipeline.md and in ``roi-ops generate --help``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from roi_ops.cli import fail

LAYOUT_HELP = """\
layout JSON: {"prompt": "a living room", "negative_prompt": "blurry" (optional),
  "width": 512, "height": 512 (optional, default: the model's size),
  "box_format": "xyxy" | "xywh" (optional, default "xyxy"),
  "box_units": "normalized" | "pixels" (optional, default "normalized"),
  "instances": [{"box": [0.1, 0.2, 0.5, 0.9], "caption": "a red sofa"}, ...]}
--prompt / --negative-prompt override the layout's. Limits: prompts and captions of at most 4096 characters, at
most 256 instances, width and height at most 8192 and multiples of the model's VAE factor; a key written twice
is an error. All of it, --out and --adapter are checked before the model loads.

Local files only: --model, --controlnet and --adapter are read from disk and nothing is downloaded. Only when
--model or --controlnet is not an existing path and has the form of a Hugging Face Hub id ("owner/name") is it
downloaded from the Hub (or taken from its cache).
"""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = ("float32", "float16", "bfloat16")
#: The largest layout file read (256 instances with 4096-character captions are about 1 MiB).
MAX_LAYOUT_BYTES = 16 * 1024 * 1024
#: ``--seed`` range: what ``torch.Generator.manual_seed`` takes as an unsigned 64-bit seed.
MAX_SEED = 2**64 - 1


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate an image from a prompt and a layout of boxes with captions (ROICtrl)",
        description="Generate an image with a ROICtrl adapter: every caption of the layout lands in its box. "
        "Writes OUT and OUT's stem + '.boxes.png' (the image with the boxes and captions drawn).",
        epilog=LAYOUT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="diffusers folder of an SD1.x/SD2.x/SDXL checkpoint")
    p.add_argument("--adapter", required=True, help="ROICtrl adapter: a folder as ROICtrlAdapter.save_pretrained writes it, or the official release file (ROICtrl_sdv14_30K.safetensors, detected by its keys)")
    p.add_argument("--layout", required=True, help="layout JSON file (format below)")
    p.add_argument("--out", required=True, help="output image path (.png, .jpg, ...); the boxes overlay goes beside it as <stem>.boxes.png")
    p.add_argument("--prompt", help="global prompt (overrides the layout's)")
    p.add_argument("--negative-prompt", help="negative prompt (overrides the layout's)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--seed", type=int, default=0, help="random seed, 0 to 2**64 - 1 (default 0)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance scale, 0 to 100 (default 7.5)")
    p.add_argument("--beta", type=float, default=1.0,
                   help="scheduled sampling: the adapter acts on the first int(beta * steps) steps (default 1.0)")
    p.add_argument("--scale", type=float, default=1.0, help="adapter strength, 0 (off) to 10 (default 1.0)")
    p.add_argument("--clip-boxes", action="store_true", help="clamp boxes that overshoot the image (with a warning)")
    p.add_argument("--controlnet", help="diffusers ControlNet folder (needs --control-image)")
    p.add_argument("--control-image", help="condition image for --controlnet")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: float16 on cuda, float32 on cpu")
    p.add_argument("--overwrite", action="store_true", help="replace OUT and its .boxes.png if they exist")
    p.set_defaults(func=run)
    return p


_fail = functools.partial(fail, "generate")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dup = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if dup is not None:
        raise ValueError(f"duplicate key {dup!r} in one object (JSON keeps only the last; write it once)")
    return dict(pairs)


def read_layout(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a layout JSON file: :func:`~roi_ops.roictrl_adapter.pipeline.validate_layout` (the one
    validator of layouts) on what the file holds, which must be UTF-8 JSON without duplicate keys. Returns the
    checked layout with its defaults filled in (``instances`` as ``Instance`` objects). Raises ``ValueError`` whose
    message names the file and the key."""
    name = f"--layout {os.fspath(path)!r}"
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_LAYOUT_BYTES + 1)
    except FileNotFoundError:
        raise ValueError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{name} is a directory; expected a layout JSON file") from None
    except OSError as e:
        raise ValueError(f"{name}: cannot read it ({e.strerror or e})") from None
    if len(raw) > MAX_LAYOUT_BYTES:
        raise ValueError(f"{name} is larger than {MAX_LAYOUT_BYTES // 2**20} MiB; a layout is a small JSON file")
    return parse_layout(raw, name, base_dir=os.path.dirname(os.path.abspath(path)))


def parse_layout(raw: bytes | str, name: str = "layout", base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """:func:`read_layout` on a file's content (``roi-ops ui`` reads uploaded layouts and API calls with it):
    UTF-8 JSON without duplicate keys, checked by ``validate_layout``; messages start with ``name``. Mask PNG
    paths are read relative to ``base_dir`` (the layout file's folder); ``None`` (content from no file, such as
    a browser's) refuses them."""
    from .pipeline import validate_layout

    if len(raw) > MAX_LAYOUT_BYTES:  # a str counts characters (its UTF-8 form is at least as long)
        raise ValueError(f"{name} is larger than {MAX_LAYOUT_BYTES // 2**20} MiB; a layout is a small JSON file")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); save it as "
                         "UTF-8 JSON") from None
    try:
        layout = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"{name} is nested too deeply to be a layout") from None
    except ValueError as e:  # a duplicate key
        raise ValueError(f"{name}: {e}") from None
    return validate_layout(layout, require_prompt=False, where=f"{name}: ", base_dir=base_dir)


def _source(name: str, value: str) -> dict[str, Any]:
    """from_pretrained keywords for a local folder (never downloads) or a hub id (may download)."""
    if os.path.exists(value):
        return {"local_files_only": True}
    if _HUB_ID.match(value):
        print(f"roi-ops generate: {name} {value!r} is not a local path; loading it from the Hugging Face Hub",
              file=sys.stderr)
        return {}
    raise ValueError(f"{name} {value!r}: no such file or folder (and not a Hub id of the form owner/name)")


def load_pipeline(model: str, controlnet: str | None, device: str, dtype):
    """The diffusers text-to-image pipeline of ``model`` (its ControlNet variant with ``controlnet``)."""
    from diffusers import AutoPipelineForText2Image, ControlNetModel

    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if controlnet is not None:
        kwargs["controlnet"] = ControlNetModel.from_pretrained(
            controlnet, **_source("--controlnet", controlnet), torch_dtype=dtype
        )
    pipe = AutoPipelineForText2Image.from_pretrained(model, **_source("--model", model), **kwargs)
    return pipe.to(device)


#: The colour of instance ``k``'s box is ``BOX_COLORS[k % len(BOX_COLORS)]`` (here and in ``roi-ops ui``'s canvas).
BOX_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
              (70, 240, 240), (240, 50, 230), (210, 245, 60), (255, 225, 25), (0, 128, 128)]


def draw_boxes(image, instances: list, colors=None):
    """A copy of ``image`` (PIL) with each instance's box (normalised xyxy) and caption drawn on it."""
    from PIL import ImageDraw, ImageFont

    palette = colors or BOX_COLORS
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    W, H = out.size
    width = max(1, round(min(W, H) / 128))
    font = ImageFont.load_default()
    for k, inst in enumerate(instances):
        x1, y1, x2, y2 = inst.box
        color = palette[k % len(palette)]
        box = (round(x1 * (W - 1)), round(y1 * (H - 1)), round(x2 * (W - 1)), round(y2 * (H - 1)))
        draw.rectangle(box, outline=color, width=width)
        left, top, right, bottom = draw.textbbox((0, 0), inst.caption, font=font)
        tw, th = right - left, bottom - top
        tx = min(max(box[0], 0), max(W - tw - 2, 0))
        ty = box[1] - th - 3 if box[1] - th - 3 >= 0 else box[1] + width  # above the box, or inside at the top
        draw.rectangle((tx, ty, tx + tw + 2, ty + th + 2), fill=color)
        draw.text((tx + 1 - left, ty + 1 - top), inst.caption, fill=(255, 255, 255), font=font)
    return out


def _expected_size(model: str, layout: dict, control_image) -> tuple[int, int] | None:
    """``(height, width)`` the pipeline will use, known before loading it: the layout's, the control image's, or a
    local model's default (its UNet's sample size x the VAE factor, from their config files); else ``None``."""
    height, width = layout.get("height"), layout.get("width")
    if (height is None or width is None) and control_image is not None:
        width, height = width or control_image.size[0], height or control_image.size[1]
    if height is None or width is None:
        try:
            with open(os.path.join(model, "unet", "config.json")) as f:
                sample = json.load(f)["sample_size"]
            with open(os.path.join(model, "vae", "config.json")) as f:
                factor = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
        except (OSError, KeyError, TypeError, ValueError):
            return None
        if not isinstance(sample, int):
            return None
        height, width = height or sample * factor, width or sample * factor
    return int(height), int(width)


def boxes_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".boxes.png")


def _vae_factor(model: str) -> int | None:
    """A local model's VAE factor (``2 ** (len(block_out_channels) - 1)`` of ``vae/config.json``), else ``None``."""
    try:
        with open(os.path.join(model, "vae", "config.json")) as f:
            channels = json.load(f)["block_out_channels"]
        return 2 ** (len(channels) - 1)
    except (OSError, KeyError, TypeError, ValueError, RecursionError):
        return None


def check_out(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise ``ValueError`` unless ``out`` can be written as an image: not a folder, an image extension Pillow
    writes, a folder (existing or creatable) we may write in, and (unless ``overwrite``) neither ``out`` nor its
    ``.boxes.png`` already there. Creates nothing."""
    import tempfile

    from PIL import Image

    path = Path(out)
    name = f"--out {os.fspath(out)!r}"
    if path.is_dir():
        raise ValueError(f"{name} is a directory; give the image's file name, e.g. {os.fspath(path / 'image.png')!r}")
    Image.init()
    ext = path.suffix.lower()
    if Image.registered_extensions().get(ext) not in Image.SAVE:
        raise ValueError(f"{name} needs an image extension Pillow can write (.png, .jpg, .webp, ...), got "
                         f"{ext or 'none'!r}")
    if not overwrite:
        for target in (path, boxes_path(path)):
            if os.path.lexists(target):
                raise ValueError(f"{os.fspath(target)!r} already exists; pass --overwrite to replace it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{name}: {os.fspath(parent)!r} is not a folder")
    try:  # the true test of writability (os.access says yes to root on a read-only file system)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".roi-ops-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{name}: cannot write in {os.fspath(parent)!r} ({e.strerror or e})") from None


def run(args: argparse.Namespace) -> int:
    import torch

    from .adapter import check_adapter_path, load_adapter
    from .pipeline import ROICtrlPipeline, _check_texts, check_image_size, check_scales, normalize_instances

    # Everything the arguments alone decide is checked here, before the (slow) model load.
    try:
        layout = read_layout(args.layout)
        prompt = args.prompt if args.prompt is not None else layout.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("no prompt: give --prompt or a non-empty \"prompt\" in the layout")
        negative = args.negative_prompt if args.negative_prompt is not None else layout.get("negative_prompt")
        _check_texts("--prompt", args.prompt)
        _check_texts("--negative-prompt", args.negative_prompt)
        if (args.controlnet is None) != (args.control_image is None):
            raise ValueError("--controlnet and --control-image go together")
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        if not 0 <= args.seed <= MAX_SEED:
            raise ValueError(f"--seed must be an integer in [0, 2**64 - 1], got {args.seed}")
        check_scales(args.guidance_scale, args.scale, args.beta, names=("--guidance-scale", "--scale", "--beta"))
        check_out(args.out, args.overwrite)
        if not os.path.exists(args.adapter):
            raise ValueError(f"--adapter {args.adapter!r}: no such file or folder")
        try:
            check_adapter_path(args.adapter)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--adapter: {e}") from None
    except ValueError as e:
        return _fail(str(e))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda but no CUDA device is available")
    dtype = getattr(torch, args.dtype or ("float16" if device == "cuda" else "float32"))

    call: dict[str, Any] = {
        "negative_prompt": negative, "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale,
        "generator": torch.Generator(device).manual_seed(args.seed),
    }
    if layout.get("height") is not None:
        call["height"] = layout["height"]
    if layout.get("width") is not None:
        call["width"] = layout["width"]
    if args.control_image is not None:
        from PIL import Image

        try:
            call["image"] = Image.open(args.control_image).convert("RGB")
        except (FileNotFoundError, OSError) as e:
            return _fail(f"--control-image {args.control_image!r}: {e}")
    opts = dict(box_format=layout["box_format"], box_units=layout["box_units"], clip_boxes=args.clip_boxes)
    size = _expected_size(args.model, layout, call.get("image"))
    try:
        if size is not None:  # check the layout before the (slow) model load; the pipeline checks it again
            check_image_size(*size, _vae_factor(args.model) or 1)
            normalize_instances(layout["instances"], 1, width=size[1], height=size[0], **opts)
        pipe = load_pipeline(args.model, args.controlnet, device, dtype)
        adapter = load_adapter(args.adapter, pipe.unet)
        roictrl = ROICtrlPipeline.from_pipe(pipe, adapter)
        pipe.set_progress_bar_config(desc="denoising", disable=False)
        image = roictrl(
            prompt, instances=layout["instances"], roictrl_scheduled_sampling_beta=args.beta,
            roictrl_scale=args.scale, **opts, **call,
        ).images[0]
    except (ValueError, TypeError, FileNotFoundError) as e:
        return _fail(str(e))
    height, width = image.height, image.width
    drawn = normalize_instances(layout["instances"], 1, width=width, height=height, **opts)[0]
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
        draw_boxes(image, drawn).save(boxes_path(out))
    except OSError as e:
        return _fail(f"--out {args.out!r}: cannot write the image ({e})")
    print(f"wrote {out} and {boxes_path(out)}")
    return 0
