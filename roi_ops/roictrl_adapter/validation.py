"""Validation of an adapter folder before anything is allocated from it.

An adapter folder is untrusted input: ``config.json`` decides the size of every parameter and the safetensors
header decides what is read into them. :func:`validate_config` checks the config against one table per level
(:data:`CONFIG_SCHEMA` for the top-level keys, :data:`BLOCK_SCHEMA` for each entry of ``blocks``): a new
constructor option is one new row. :func:`read_safetensors_header` parses the header by hand (it is a length and
a JSON object) and checks its dtypes, shapes, offsets and total size against the file, so that
:meth:`ROICtrlAdapter.from_pretrained` can compare it with the shapes the config implies (computed on the
``meta`` device) before loading a single tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .options import ArchitectureOptions

__all__ = [
    "check_finite",
    "BLOCK_SCHEMA",
    "CONFIG_SCHEMA",
    "FLOAT_DTYPES",
    "Field",
    "read_safetensors_header",
    "validate_config",
]


@dataclass(frozen=True)
class Field:
    """One config key: its JSON type (``bool`` is never an ``int`` here), inclusive range, and whether it may be
    left out (then the constructor's default applies)."""

    type: type
    low: float | None = None
    high: float | None = None
    required: bool = False
    max_len: int | None = None  # strings
    #: part of the architecture the weights were trained with (False: a runtime option that may be edited)
    architecture: bool = True

    def check(self, where: str, value: Any) -> None:
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif self.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, self.type)
        if not ok:
            raise TypeError(f"{where} must be {self.type.__name__}, got {type(value).__name__} {value!r:.80}")
        if self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise ValueError(f"{where} must lie in [{self.low}, {self.high}], got {value!r}")
        if self.max_len is not None and not 0 < len(value) <= self.max_len:
            raise ValueError(f"{where} must be a non-empty string of at most {self.max_len} characters")


#: Keys of each entry of ``blocks`` (fields of :class:`BlockSpec`). The ranges are far beyond every released
#: UNet (widths up to 1280, 8-20 heads, grids 7-25) and small enough that a config cannot ask for absurd memory.
BLOCK_SCHEMA: dict[str, Field] = {
    "name": Field(str, required=True, max_len=512),
    "dim": Field(int, 1, 16384, required=True),
    "heads": Field(int, 1, 256, required=True),
    "cross_attention_dim": Field(int, 1, 16384, required=True),
    "downsample": Field(int, 1, 4096, required=True),
    "grid": Field(int, 1, 256, required=True),
}

#: Top-level keys of ``config.json`` (constructor arguments of :class:`ROICtrlAdapter`, plus the two bookkeeping
#: keys :meth:`~ROICtrlAdapter.save_pretrained` writes).
CONFIG_SCHEMA: dict[str, Field] = {
    "_class_name": Field(str, required=True, max_len=128),
    "format_version": Field(int, 1, 1),
    "blocks": Field(list, required=True),
    "position_dim": Field(int, 1, 16384),
    "fourier_freqs": Field(int, 1, 64),
    "position_hidden_dim": Field(int, 1, 16384),
    "ff_mult": Field(int, 1, 16),
    "fused_blend": Field(bool, architecture=False),
}
#: The architecture options (options.py): their types and values are checked by ``ArchitectureOptions`` itself
#: (one rule table), here only whether each is part of what the weights were trained with. The rest change
#: what a forward computes without changing a weight, and may be edited like ``fused_blend``.
_RUNTIME_OPTIONS = {"slot_order", "slot_seed", "sampling_ratio", "guide_empty_samples", "dropout", "unpool", "grid_policy",
                    "guidance_pool", "guidance_kv_pool", "guidance_kv_pool_scope"}
CONFIG_SCHEMA.update(
    {name: Field(object, architecture=name not in _RUNTIME_OPTIONS) for name in ArchitectureOptions.names()}
)

MAX_BLOCKS = 1024
#: Fixed slot counts (``max_instances``) beyond this are refused: the channel gate is an S x S MLP.
MAX_SLOTS = 1024


def _check_keys(where: str, obj: Any, schema: Mapping[str, Field]) -> None:
    if not isinstance(obj, dict):
        raise TypeError(f"{where} must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(schema))
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown[:5]}; known keys: {sorted(schema)}")
    missing = [k for k, f in schema.items() if f.required and k not in obj]
    if missing:
        raise ValueError(f"{where} is missing required keys {missing}")
    for key, value in obj.items():
        schema[key].check(f"{where}[{key!r}]", value)


def validate_config(config: Any, source: str = "config.json") -> None:
    """Raise ``TypeError``/``ValueError`` naming the key unless ``config`` is a valid adapter config.

    Checks the types and ranges of :data:`CONFIG_SCHEMA` and :data:`BLOCK_SCHEMA`, the architecture options
    (``ArchitectureOptions``, at most :data:`MAX_SLOTS` slots), and the relations between keys: each block's
    ``dim`` divisible by its ``heads``, block names unique.
    """
    _check_keys(source, config, CONFIG_SCHEMA)
    options = {k: config[k] for k in ArchitectureOptions.names() if k in config}
    try:
        ArchitectureOptions(**options)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{source}: {exc}") from None
    if options.get("max_instances") is not None and options["max_instances"] > MAX_SLOTS:
        raise ValueError(f"{source}['max_instances'] must be None or at most {MAX_SLOTS}, got {options['max_instances']}")
    blocks = config["blocks"]
    if not 1 <= len(blocks) <= MAX_BLOCKS:
        raise ValueError(f"{source}['blocks'] must list 1 to {MAX_BLOCKS} blocks, got {len(blocks)}")
    names = set()
    for i, block in enumerate(blocks):
        where = f"{source}['blocks'][{i}]"
        _check_keys(where, block, BLOCK_SCHEMA)
        if block["dim"] % block["heads"]:
            raise ValueError(
                f"{where}: dim ({block['dim']}) must be divisible by heads ({block['heads']})"
            )
        if block["name"] in names:
            raise ValueError(f"{where}: block name {block['name']!r} appears twice")
        names.add(block["name"])


def architecture_mismatch(config: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    """The architecture keys (``Field.architecture``) on which a validated ``config`` differs from the ``saved``
    one that :meth:`~ROICtrlAdapter.save_pretrained` stored beside the weights, as readable strings."""
    diffs = []
    for key, field in CONFIG_SCHEMA.items():
        if not field.architecture or key in ("_class_name", "format_version"):
            continue
        if key == "blocks":
            mine, theirs = config.get("blocks", []), saved.get("blocks", [])
            if not isinstance(theirs, list) or len(mine) != len(theirs):
                diffs.append(f"blocks: {len(mine)} in config.json, saved with {len(theirs) if isinstance(theirs, list) else theirs!r}")
                continue
            for i, (a, b) in enumerate(zip(mine, theirs)):
                for k in BLOCK_SCHEMA:
                    if isinstance(b, dict) and BLOCK_SCHEMA[k].architecture and a.get(k) != b.get(k):
                        diffs.append(f"blocks[{i}][{k!r}]: {a.get(k)!r} in config.json, saved with {b.get(k)!r}")
        elif config.get(key) != saved.get(key):
            diffs.append(f"{key}: {config.get(key)!r} in config.json, saved with {saved.get(key)!r}")
    return diffs


#: safetensors dtype tag -> bytes per element; only floating tensors make adapter weights.
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Parse and check the header of a safetensors file without reading its data.

    Returns ``({name: {"dtype", "shape", "data_offsets"}}, metadata)``. Raises ``ValueError`` naming the file
    and the tensor unless: the header is a JSON object of at most 100 MiB; every dtype is a float
    (:data:`FLOAT_DTYPES`); every shape is a list of non-negative ints; every tensor's byte range has exactly
    ``numel * itemsize`` bytes; the ranges tile the data section without gaps or overlaps; and the data section
    ends exactly at the end of the file.
    """
    name = os.fspath(path)
    size = os.path.getsize(name)
    with open(name, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{name!r} is not a safetensors file: {size} bytes, shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES:
            raise ValueError(f"{name!r}: the header claims {n} bytes; a safetensors header has at most "
                             f"{_MAX_HEADER_BYTES} (not a safetensors file?)")
        if n > size - 8:
            raise ValueError(f"{name!r} is truncated (or not a safetensors file): the header claims {n} bytes; the "
                             f"file has {size - 8} after the length")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{name!r}: the safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name!r}: the safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{name!r}: __metadata__ must map strings to strings")
    data_size = size - 8 - n
    spans = []
    for key, info in header.items():
        where = f"{name!r}: tensor {key!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{where} must be an object with dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"{where} has dtype {dtype!r}; adapter weights are one of {sorted(FLOAT_DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ValueError(f"{where} has shape {shape!r:.80}; expected a list of non-negative ints")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ValueError(f"{where} has data_offsets {offsets!r:.80}; expected [begin, end]")
        nbytes = math.prod(shape) * FLOAT_DTYPES[dtype]
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != nbytes:
            raise ValueError(f"{where}: data_offsets {offsets} must hold exactly {nbytes} bytes ({dtype} {shape})")
        spans.append((begin, end, key))
    needed = max((end for _, end, _ in spans), default=0)
    if needed > data_size:
        raise ValueError(
            f"{name!r} is truncated: its header describes {needed} bytes of tensor data, the file holds "
            f"{data_size} ({size} bytes in all)"
        )
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            raise ValueError(f"{name!r}: tensor {key!r} starts at byte {begin}, expected {position} (gap or overlap)")
        position = end
    if position != data_size:
        raise ValueError(f"{name!r}: the tensors end at byte {position} but the data section has {data_size}")
    return header, metadata


def check_finite(tensors: Mapping[str, Any], source: str) -> None:
    """Raise ``ValueError`` naming the tensors of ``tensors`` (name -> tensor) that hold a NaN or an infinity.

    Loaders call it on weights they read: a NaN weight does not fail a forward, it turns the image black. The
    cost is one summation per tensor (docs/official.md has the measured cost: about 0.1 s per GB on one core)."""
    import torch

    bad = []
    for key, value in tensors.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        # one reduction, no temporary: a NaN or an inf makes the sum non-finite; a finite sum proves the tensor
        # finite. Only a non-finite sum (a bad tensor, or finite values whose sum overflows) takes the exact test.
        if bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all()):
            continue
        nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
        bad.append(f"{key} ({nan} NaN, {inf} inf of {value.numel()})")
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad)} tensors)" if len(bad) > 5 else "")
        raise ValueError(f"{source} holds non-finite weights (NaN or inf): {shown}")
