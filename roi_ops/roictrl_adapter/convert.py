"""The ``roi-ops convert-official`` command: the official ROICtrl release written as a roi-ops adapter folder.

Argument parsing and file I/O only: the work is :meth:`ROICtrlAdapter.from_official` and ``save_pretrained``
(the release's weights, keys and architecture are in :mod:`roi_ops.roictrl_adapter.official`).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from torch import nn

from .adapter import ROICtrlAdapter

__all__ = ["add_parser", "convert_official"]


def _unet_from_folder(folder: str) -> nn.Module:
    import json

    for candidate in (os.path.join(folder, "unet", "config.json"), os.path.join(folder, "config.json")):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                config = json.load(f)
            from diffusers import UNet2DConditionModel

            with torch.device("meta"):
                return UNet2DConditionModel.from_config(config)
    raise FileNotFoundError(f"--unet {folder!r}: no config.json or unet/config.json in it")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def convert_official(args: argparse.Namespace) -> int:
    """``roi-ops convert-official IN OUT_DIR``: write the official checkpoint as a roi-ops adapter folder."""
    out_dir = args.out_dir
    if os.path.exists(os.path.join(out_dir, "config.json")) and not args.overwrite:
        raise SystemExit(f"roi-ops convert-official: {out_dir!r} already holds a config.json (use --overwrite)")
    unet = _unet_from_folder(args.unet) if args.unet else None
    overrides = {"unpool": args.unpool} if args.unpool else {}
    adapter = ROICtrlAdapter.from_official(args.input, unet, dtype=_DTYPES[args.dtype], **overrides)
    adapter.save_pretrained(out_dir)
    count = sum(p.numel() for p in adapter.parameters())
    print(
        f"converted {args.input} -> {out_dir}: {len(adapter.specs)} blocks, {count:,} parameters, "
        f"unpool={adapter.options.unpool}, dtype={args.dtype} (the weights' licence is the authors': cc-by-nc-4.0)"
    )
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``convert-official`` on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "convert-official",
        help="convert the official ROICtrl checkpoint into a roi-ops adapter folder",
        description=(
            "Convert the official ROICtrl release (ROICtrl_sdv14_30K.safetensors; weights licensed cc-by-nc-4.0 by "
            "their authors) into a roi-ops adapter folder (config.json + roictrl_adapter.safetensors) in the "
            "official configuration. Load it with ROICtrlAdapter.from_pretrained(OUT_DIR, unet)."
        ),
    )
    parser.add_argument("input", help="the official checkpoint (.safetensors, or a torch.save'd state dict)")
    parser.add_argument("out_dir", help="output folder")
    parser.add_argument(
        "--unet",
        help="a local diffusers model or UNet folder whose (unet/)config.json gives the block structure "
        "(default: Stable Diffusion 1.4/1.5)",
    )
    parser.add_argument(
        "--unpool",
        choices=("official", "exact"),
        help="ROI-Unpool semantics saved in the config: the release's quantised one (default) or roi-ops' exact one",
    )
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="float32", help="dtype of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that already holds a config")
    parser.set_defaults(func=convert_official)
    return parser
