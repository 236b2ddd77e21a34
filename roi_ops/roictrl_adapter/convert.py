"""The ``roi-ops convert-official`` command: the official ROICtrl release written as a roi-ops adapter folder.

Argument parsing and file I/O only: the work is :meth:`ROICtrlAdapter.from_official` and ``save_pretrained``
(the release's weights, keys and architecture are in :mod:`roi_ops.roictrl_adapter.official`). Errors print one
line ``roi-ops convert-official: error: ...`` and exit with status 2, before any work where they can be known.
"""

from __future__ import annotations

import argparse
import functools
import os
from typing import Any

import torch
from torch import nn

from roi_ops.cli import fail

from .adapter import CONFIG_NAME, WEIGHTS_NAME, ROICtrlAdapter
from .official import is_official_checkpoint, read_official_keys
from .validation import read_safetensors_header

__all__ = ["add_parser", "convert_official"]


def _unet_from_folder(folder: str) -> nn.Module:
    import json

    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--unet {folder!r}: no such folder (a diffusers model or UNet folder)")
    for candidate in (os.path.join(folder, "unet", "config.json"), os.path.join(folder, "config.json")):
        if os.path.isfile(candidate):
            try:
                with open(candidate, encoding="utf-8") as f:
                    config = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                raise ValueError(f"--unet: {candidate!r} is not a JSON file ({e})") from None
            if not isinstance(config, dict):
                raise ValueError(f"--unet: {candidate!r} must hold a JSON object, got {type(config).__name__}")
            from diffusers import UNet2DConditionModel

            try:
                with torch.device("meta"):
                    return UNet2DConditionModel.from_config(config)
            except Exception as e:  # diffusers raises many kinds for a config it cannot build
                raise ValueError(f"--unet: {candidate!r} does not describe a UNet2DConditionModel: "
                                 f"{type(e).__name__}: {e}") from None
    raise FileNotFoundError(f"--unet {folder!r}: no config.json or unet/config.json in it")


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


_convert_fail = functools.partial(fail, "convert-official")


def _same_file(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _check_convert_paths(source: str, out_dir: str, overwrite: bool) -> None:
    """The input is a readable checkpoint file, OUT_DIR is a folder (or can become one) that is not the input and
    would not overwrite it, and holds no config.json unless ``overwrite``; all before any work."""
    if os.path.isdir(source):
        raise ValueError(f"input {source!r} is a directory; the official checkpoint is one file (a roi-ops adapter "
                         "folder needs no conversion)")
    if not os.path.isfile(source):
        raise FileNotFoundError(f"input {source!r}: no such file")
    targets = [out_dir, os.path.join(out_dir, CONFIG_NAME), os.path.join(out_dir, WEIGHTS_NAME)]
    if any(_same_file(source, t) for t in targets):
        raise ValueError(f"OUT_DIR {out_dir!r} would overwrite the input {source!r}; write the conversion to "
                         "another folder")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"OUT_DIR {out_dir!r} is a file; expected a folder (it is created if missing)")
    if os.path.exists(os.path.join(out_dir, CONFIG_NAME)) and not overwrite:
        raise ValueError(f"{out_dir!r} already holds a {CONFIG_NAME} (use --overwrite)")
    if source.endswith(".safetensors"):
        read_safetensors_header(source)  # a truncated or corrupt file: said here, before any work


def convert_official(args: argparse.Namespace) -> int:
    """``roi-ops convert-official IN OUT_DIR``: write the official checkpoint as a roi-ops adapter folder.

    Errors print one line ``roi-ops convert-official: error: ...`` and exit with status 2."""
    out_dir, source = args.out_dir, args.input
    try:
        _check_convert_paths(source, out_dir, args.overwrite)
        unet = _unet_from_folder(args.unet) if args.unet else None
        overrides = {"unpool": args.unpool} if args.unpool else {}
        keys = read_official_keys(source)
        if not is_official_checkpoint(keys):
            raise ValueError(f"input {source!r} is not an official ROICtrl checkpoint: none of its "
                             f"{len(keys)} keys is a roifuser / position_net weight")
        adapter = ROICtrlAdapter.from_official(source, unet, dtype=_DTYPES[args.dtype], **overrides)
    except (ValueError, TypeError, OSError) as e:
        return _convert_fail(str(e))
    try:
        adapter.save_pretrained(out_dir)
    except OSError as e:
        return _convert_fail(f"cannot write {out_dir!r}: {e}")
    count = sum(p.numel() for p in adapter.parameters())
    print(
        f"converted {source} -> {out_dir}: {len(adapter.specs)} blocks, {count:,} parameters, "
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
