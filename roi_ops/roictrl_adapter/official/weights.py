"""The official ROICtrl release's weights: its file, its key names, and loading them into an adapter.

The release (``ROICtrl_sdv14_30K.safetensors``, hub repo ``guyuchao/ROICtrl``, licence cc-by-nc-4.0: the weights
are the authors', under their licence) stores one ``roifuser`` per cross-attention transformer block of an SD1.x
UNet, under that block's module path, plus a shared ``position_net``. Every official key maps to one parameter
of an adapter built with ``preset="official"`` (:data:`~roi_ops.roictrl_adapter.official.OFFICIAL_CONFIG`)::

    <block path>.roifuser.<official name>   ->  blocks.<i>.<ours>       (i = the block's rank in the UNet)
    position_net.<official name>            ->  box_encoder.<ours>

The block path (``down_blocks.0.attentions.0.transformer_blocks.0``, ...) is matched by name, never by position
in the file. See docs/official.md. Nothing here imports the adapter: the functions take an adapter built by
:meth:`ROICtrlAdapter.from_official <roi_ops.roictrl_adapter.ROICtrlAdapter.from_official>` (which reads the file
with :func:`read_official`, builds the adapter and calls :func:`load_official_weights`) or by ``from_unet``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..validation import check_finite

__all__ = [
    "SD14_UNET_CONFIG",
    "is_official_checkpoint",
    "load_official_weights",
    "official_key_map",
    "read_official",
    "read_official_keys",
    "sd14_unet_structure",
    "to_official_state_dict",
]

#: Our parameter path inside a block -> the official one inside ``roifuser`` (prefix rules, longest first).
_BLOCK_RULES = (
    ("roi_gate", "alpha_roi_self_attn"),
    ("guide_attn_gate", "alpha_coord_self_attn"),
    ("guide_ff_gate", "alpha_dense"),
    ("roi_norm.", "norm1."),
    ("roi_attn.to_out.", "roi_self_attn.to_out.0."),
    ("roi_attn.", "roi_self_attn."),
    ("blend_proj.weight", "roiattn_fuser.channel_reduction.weight"),
    ("blend_gate.", "roiattn_fuser.channel_gate.mlp."),
    ("guide_norm.", "norm2."),
    ("position_proj.", "context_proj."),
    ("guide_attn.to_out.", "coord_self_attn.to_out.0."),
    ("guide_attn.", "coord_self_attn."),
    ("guide_ff_norm.", "norm3."),
    ("guide_ff.", "ff."),
)
_SHARED_RULES = (
    ("box_encoder.null_feature", "position_net.null_position_feature"),
    ("box_encoder.mlp.", "position_net.linears."),
)
#: Leading prefixes a saved state dict may carry (training wrappers); stripped in any combination.
_PREFIXES = ("module.", "unet.")
_MARKERS = (".roifuser.alpha_roi_self_attn", "position_net.null_position_feature")

#: The UNet of Stable Diffusion 1.4 / 1.5 (``unet/config.json`` of those models); the structure the release fits.
SD14_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "center_input_sample": False,
    "mid_block_scale_factor": 1,
}


def _rename(key: str, rules) -> str | None:
    for ours, theirs in rules:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    return None


def official_key_map(adapter: nn.Module) -> dict[str, str]:
    """``{our state_dict key: official key}`` for every parameter of ``adapter``.

    Raises ``ValueError`` naming the parameters without an official counterpart (an adapter that is not in the
    official configuration, e.g. ``ff_activation="gelu"`` or ``position_padding="drop"``).
    """
    mapping, orphans = {}, []
    for key in adapter.state_dict():
        if key.startswith("blocks."):
            _, index, rest = key.split(".", 2)
            theirs = _rename(rest, _BLOCK_RULES)
            official = None if theirs is None else f"{adapter.specs[int(index)].name}.roifuser.{theirs}"
        else:
            official = _rename(key, _SHARED_RULES)
        if official is None:
            orphans.append(key)
        else:
            mapping[key] = official
    missing_here = [
        name
        for name, present in (
            ("box_encoder.null_feature (position_padding='null_token')", adapter.box_encoder.null_feature is not None),
            ("blocks.*.blend_gate (channel_gate=True)", adapter.options.channel_gate),
            ("GEGLU feed-forward (ff_activation='geglu')", adapter.options.ff_activation == "geglu"),
        )
        if not present
    ]
    if orphans or missing_here:
        raise ValueError(
            "this ROICtrlAdapter is not in the official configuration: parameters without an official counterpart "
            f"{orphans[:5]}{' ...' if len(orphans) > 5 else ''}; official parameter groups it lacks {missing_here}; "
            "build it with from_unet(unet, preset='official')"
        )
    return mapping


def _official_shape(ours: str, shape: torch.Size) -> tuple[int, ...]:
    # The official blend logit is a 1x1 Conv2d(C, 1); ours the equivalent Linear(C, 1).
    return (*shape, 1, 1) if ours.endswith("blend_proj.weight") else tuple(shape)


def to_official_state_dict(adapter: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under the official names and shapes (the inverse of :func:`from_official`)."""
    state = adapter.state_dict()
    return {
        theirs: state[ours].detach().reshape(_official_shape(ours, state[ours].shape))
        for ours, theirs in official_key_map(adapter).items()
    }


def _strip(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _read(path_or_state_dict: Any, keys_only: bool = False) -> Mapping[str, Any]:
    """The raw state dict (or, with ``keys_only``, a dict of its keys to ``None`` where that is cheaper)."""
    if isinstance(path_or_state_dict, Mapping):
        return path_or_state_dict
    if not isinstance(path_or_state_dict, (str, os.PathLike)):
        raise TypeError(
            "expected a path to the official checkpoint or a state dict (Mapping[str, Tensor]), got "
            f"{type(path_or_state_dict).__name__}"
        )
    path = os.fspath(path_or_state_dict)
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{path!r} is a directory; the official checkpoint is one file (a roi-ops adapter folder loads with "
            "ROICtrlAdapter.from_pretrained)"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no official ROICtrl checkpoint at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            if keys_only:
                with safe_open(path, framework="pt") as f:
                    return dict.fromkeys(f.keys())
            return load_file(path)
        except Exception as e:  # safetensors' own error types (SafetensorError, ...)
            raise ValueError(f"{path!r} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle, zip and weights_only errors of many kinds
        raise ValueError(
            f"{path!r} is neither a safetensors file (.safetensors) nor a torch.save'd state dict that loads with "
            f"weights_only=True ({type(e).__name__}: {e})"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and set(state) == {wrapper}:
            state = state[wrapper]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path!r} does not hold a state dict (got {type(state).__name__})")
    return state


def _normalise(state: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"official checkpoint keys must be strings, got {key!r}")
        bare = _strip(key)
        if bare in out:
            raise ValueError(f"official checkpoint holds {bare!r} twice (with and without a module./unet. prefix)")
        out[bare] = value
    return out


def is_official_checkpoint(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> bool:
    """Whether ``path_or_state_dict`` is in the official ROICtrl format (a ``roifuser`` / ``position_net`` state
    dict, bare or ``unet.``/``module.``-prefixed). A directory (a roi-ops adapter save) is not; a safetensors
    file is recognised from its header alone. Raises ``FileNotFoundError`` for a path that does not exist."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = os.fspath(path_or_state_dict)
        if os.path.isdir(path):
            return False
        if not os.path.exists(path):
            raise FileNotFoundError(f"no file at {path!r}")
        try:
            keys = _read(path, keys_only=True)
        except Exception:  # safetensors / torch.load / pickle errors of many kinds: not a checkpoint we can read
            return False
    else:
        keys = _read(path_or_state_dict)
    return any(isinstance(k, str) and _strip(k).endswith(_MARKERS) for k in keys)


def sd14_unet_structure(config: Mapping[str, Any] | None = None) -> nn.Module:
    """A ``UNet2DConditionModel`` of ``config`` (default :data:`SD14_UNET_CONFIG`) on the meta device: its block
    structure (paths, widths, heads) without allocating its weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**dict(SD14_UNET_CONFIG if config is None else config))


def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)})"


def read_official_keys(path: str | os.PathLike) -> Mapping[str, Any]:
    """The keys of the official checkpoint file at ``path`` (a dict of keys to ``None`` where only the header needs
    reading), not stripped: enough for :func:`is_official_checkpoint` without loading the weights."""
    return _read(path, keys_only=True)


def read_official(path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The official state dict of ``path_or_state_dict`` (the release file, ``.safetensors`` or a ``torch.save``d
    state dict, or the state dict itself), its keys stripped of ``unet.`` / ``module.`` prefixes."""
    return _normalise(_read(path_or_state_dict))


def load_official_weights(
    adapter: nn.Module, state: Mapping[str, Any], source: str = "the official ROICtrl state dict"
) -> nn.Module:
    """Copy the official weights ``state`` (from :func:`read_official`) into ``adapter``, an adapter in the official
    configuration (``from_unet(unet, preset="official")``, option overrides that keep the parameters allowed).

    Every official key must map to one adapter parameter with the same shape, every adapter parameter must get
    one: otherwise ``ValueError`` with the missing keys, the unexpected keys and the shape / dtype mismatches
    (each named). A tensor holding a NaN or an infinity is refused (``ValueError`` naming it, and ``source`` says
    where the weights came from). Values are copied exactly. Returns ``adapter``.
    """
    key_map = official_key_map(adapter)
    own = adapter.state_dict()
    expected = {theirs: ours for ours, theirs in key_map.items()}
    missing = sorted(k for k in expected if k not in state)
    unexpected = sorted(k for k in state if k not in expected)
    problems = []
    for theirs, ours in expected.items():
        if theirs not in state:
            continue
        value = state[theirs]
        want = _official_shape(ours, own[ours].shape)
        if not isinstance(value, torch.Tensor):
            problems.append(f"{theirs}: expected a tensor, got {type(value).__name__}")
        elif not value.is_floating_point():
            problems.append(f"{theirs}: expected a floating-point tensor, got {value.dtype}")
        elif tuple(value.shape) != want:
            problems.append(f"{theirs}: expected shape {list(want)}, got {list(value.shape)}")
    if missing or unexpected or problems:
        raise ValueError(
            "the official ROICtrl checkpoint does not fit this UNet's official-configuration adapter: "
            f"missing keys {_format_keys(missing)}; unexpected keys {_format_keys(unexpected)}; "
            f"wrong tensors {_format_keys(problems)}"
        )
    check_finite({theirs: state[theirs] for theirs in expected}, source)
    with torch.no_grad():
        for theirs, ours in expected.items():
            own[ours].copy_(state[theirs].reshape(own[ours].shape))
    return adapter
