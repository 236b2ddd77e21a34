"""ROICtrlAdapter: one :class:`ROICtrlBlock` per cross-attention transformer block of a diffusers UNet.

The module (its blocks, box encoder, options and config), install/uninstall, its training signals and its
persistence (``save_pretrained`` / ``from_pretrained`` / :func:`load_adapter`). The hooks that run it inside a
UNet are in ``hooks.py``; one layer's computation is ``block.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .block import ROICtrlBlock
from .layers import BoxEncoder
from .hooks import (
    SUPPORTED_NORMS,
    AdapterHooks,
    BlendMapRecorder,
    installed_adapter,
    top_level,
    transformer_blocks,
    unet_levels,
    unwrap_unet,
)
from .official import (
    OFFICIAL_CONFIG,
    is_official_checkpoint,
    load_official_weights,
    read_official,
    sd14_unet_structure,
)
from .options import ArchitectureOptions
from .paste import PasteRule, paste_rule, resolve_fused_blend
from .validation import architecture_mismatch, check_finite, read_safetensors_header, validate_config

__all__ = ["DEFAULT_GRID_SIZES", "NEW_ADAPTER_FF_MULT", "NEW_ADAPTER_OPTIONS", "ROICtrlAdapter", "installed_adapter",
           "unwrap_unet"]

#: ROI grid side by the layer's downsampling factor relative to the image (the paper's setting).
DEFAULT_GRID_SIZES = {8: 25, 16: 19, 32: 13, 64: 7}
#: The options :meth:`ROICtrlAdapter.from_unet` gives a new adapter unless told otherwise (the issue-19 cost
#: work, docs/performance.md; the toy benchmark's ISR held with each, retrained): footprint grids, and box guidance
#: whose pixels attend to the position tokens (and a null token) with their own coordinates instead of to each
#: other. A saved config without these keys means the ``ArchitectureOptions`` defaults (``"fixed"`` grids, GLIGEN's
#: self-attention guidance), which compute exactly as before. Not among them, because the retrained toy's ISR fell
#: outside its seed spread: ``guidance_pool=2``, ``guidance_kv_pool=2`` at every level, no guidance feed-forward,
#: a feed-forward of half the width (``ff_mult=2``).
NEW_ADAPTER_OPTIONS = {"grid_policy": "footprint", "guidance_keys": "positions"}
#: The guidance feed-forward's width (times the channels) that :meth:`ROICtrlAdapter.from_unet` gives a new adapter:
#: 3, not the official 4 (issue 19's fourth pass: a quarter less of the adapter's largest part, and about 0.05 of a
#: plain training step, with the retrained toy's ISR inside its seed spread). Saved configs record their own.
NEW_ADAPTER_FF_MULT = 3
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "roictrl_adapter.safetensors"


@dataclass
class BlockSpec:
    """What the adapter knows about one cross-attention block of the UNet it was built for."""

    name: str  # module path in the UNet, e.g. "down_blocks.0.attentions.1.transformer_blocks.0"
    dim: int  # channels of the layer
    heads: int  # heads of the layer's cross-attention (reused for the new self-attentions)
    cross_attention_dim: int  # width of the caption embeddings the layer takes
    downsample: int  # image pixels per feature pixel at this layer (VAE factor x UNet downsampling)
    grid: int  # ROI grid side


def _device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype] | tuple[None, None]:
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return None, None


class ROICtrlAdapter(nn.Module):
    """The ROICtrl instance-control adapter for a diffusers ``UNet2DConditionModel``.

    Build it with :meth:`from_unet`, attach it with :meth:`install`, pass instances per call as
    ``cross_attention_kwargs={"roictrl": {"boxes": ..., "masks": ..., "embeddings": ...}}`` (or a
    :class:`ROICtrlInstances`), read :meth:`regularization_loss` after a forward when training, and detach it with
    :meth:`uninstall`. Its weights live here, not in the UNet: move it with ``adapter.to(...)`` and save it with
    :meth:`save_pretrained`.

    Args:
        blocks: one :class:`BlockSpec` (or dict of its fields) per cross-attention block, in UNet order.
        position_dim: width of the box encoder's position tokens. fourier_freqs: frequencies per coordinate.
        position_hidden_dim: hidden width of the box encoder's MLP. ff_mult: expansion of the guidance FF.
        fused_blend: blend with the fused ``roi_ops.roi_unpool_blend`` op, whose memory does not grow with the
            instance count; ``False`` uses the unfused :func:`blend` (same function, materialises ``[K, C, H, W]``
            per layer). ``None`` (default): fused wherever the paste rule has a fused form, i.e. with
            ``unpool="exact"``; ``True`` with ``unpool="official"`` (no fused form) warns and blends unfused.
            Also settable later: ``adapter.fused_blend = False``.
        options: the architecture options of :class:`~roi_ops.roictrl_adapter.options.ArchitectureOptions`
            (``ff_activation``, ``fourier_embedding``, ``position_padding``, ``channel_gate``, ``max_instances``,
            ``slot_order``, ``slot_seed``, ``sampling_ratio``, ``guide_empty_samples``, ``dropout``, ``unpool``);
            the defaults are roi-ops' design, ``OFFICIAL_CONFIG`` the official release's (docs/official.md).
    """

    def __init__(
        self,
        blocks: list[BlockSpec | Mapping[str, Any]],
        position_dim: int = 768,
        fourier_freqs: int = 8,
        position_hidden_dim: int = 512,
        ff_mult: int = 4,
        fused_blend: bool | None = None,
        **options: Any,
    ):
        super().__init__()
        specs = [b if isinstance(b, BlockSpec) else BlockSpec(**b) for b in blocks]
        if not specs:
            raise ValueError("ROICtrlAdapter blocks must list at least one cross-attention block, got none")
        unknown = sorted(set(options) - set(ArchitectureOptions.names()))
        if unknown:
            raise TypeError(
                f"ROICtrlAdapter got unknown arguments {unknown}; architecture options are "
                f"{list(ArchitectureOptions.names())}"
            )
        self.options = ArchitectureOptions(**options)
        self.specs = specs
        self.position_dim, self.fourier_freqs = position_dim, fourier_freqs
        self.position_hidden_dim, self.ff_mult = position_hidden_dim, ff_mult
        self.box_encoder = BoxEncoder(
            position_dim,
            fourier_freqs,
            position_hidden_dim,
            fourier=self.options.fourier_embedding,
            null_token=self.options.position_padding == "null_token",
        )
        fused_blend = resolve_fused_blend(fused_blend, paste_rule(self.options.unpool))  # warns once, not per block
        self.blocks = nn.ModuleList(
            ROICtrlBlock(s.dim, s.heads, position_dim, s.grid, ff_mult, fused_blend, self.block_options(s),
                         fourier_freqs=fourier_freqs)
            for s in specs
        )
        #: False makes every hook pass the UNet's own computation through untouched.
        self.enabled = True
        self._hooks: AdapterHooks | None = None
        self._blend_recorder: BlendMapRecorder | None = None

    def block_options(self, spec: BlockSpec) -> ArchitectureOptions:
        """The options of the block of ``spec``: the adapter's, with ``guidance_kv_pool`` off outside the finest
        level under ``guidance_kv_pool_scope="finest"``."""
        options = self.options
        if options.guidance_kv_pool_scope == "finest" and spec.downsample > min(s.downsample for s in self.specs):
            return dataclasses.replace(options, guidance_kv_pool=1)
        return options

    # ------------------------------------------------------------------ construction and config
    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        grid_sizes: Mapping[int, int] | None = None,
        vae_scale_factor: int = 8,
        preset: str | None = None,
        **kwargs: Any,
    ) -> "ROICtrlAdapter":
        """One block per cross-attention ``BasicTransformerBlock`` of ``unet``, with its width and downsampling.

        The adapter is created on the UNet's device and in its dtype (a ``torch.compile``d UNet is unwrapped; a
        UNet on the ``meta`` device, a structure without weights, gets a CPU float32 adapter to load weights into).
        For training a float16 UNet under autocast, keep the adapter in float32 with ``adapter.float()``.

        Args:
            grid_sizes: ROI grid side by downsampling factor (image pixels per feature pixel); defaults to
                :data:`DEFAULT_GRID_SIZES` ``{8: 25, 16: 19, 32: 13, 64: 7}``.
            vae_scale_factor: image pixels per latent pixel (8 for SD1.5 and SDXL).
            preset: ``None``/``"default"`` (roi-ops' design, with :data:`NEW_ADAPTER_OPTIONS`: footprint grids,
                guidance over the position tokens only; and a guidance feed-forward of
                :data:`NEW_ADAPTER_FF_MULT` times the channels) or
                ``"official"`` (``OFFICIAL_CONFIG``: the official
                release's architecture, whose weights :meth:`from_official` loads); ``kwargs`` override it.
            kwargs: the remaining constructor arguments (``position_dim``, options such as ``unpool``, ...).
        """
        if preset == "official":
            kwargs = {**OFFICIAL_CONFIG, **kwargs}
        elif preset in (None, "default"):
            defaults = dict(NEW_ADAPTER_OPTIONS, ff_mult=NEW_ADAPTER_FF_MULT)
            if kwargs.get("unpool", "exact") != "exact":  # the footprint grids need the exact paste
                defaults.pop("grid_policy")
            kwargs = {**defaults, **kwargs}
        else:
            raise ValueError(f"ROICtrlAdapter.from_unet preset must be None, 'default' or 'official', got {preset!r}")
        grid_sizes = dict(DEFAULT_GRID_SIZES if grid_sizes is None else grid_sizes)
        unet = unwrap_unet(unet)
        levels = unet_levels(unet)
        specs = []
        for name, block in transformer_blocks(unet):
            top = top_level(name)
            if top not in levels:
                raise ValueError(
                    f"cannot tell the downsampling of cross-attention block {name!r}: expected it under "
                    "down_blocks.<i>, mid_block or up_blocks.<i> of a UNet2DConditionModel"
                )
            factor = vae_scale_factor * 2 ** levels[top]
            if factor not in grid_sizes:
                raise ValueError(
                    f"grid_sizes has no entry for downsampling factor {factor} (block {name!r}); got {grid_sizes}"
                )
            attn = block.attn2
            specs.append(
                BlockSpec(name, attn.query_dim, attn.heads, attn.cross_attention_dim, factor, int(grid_sizes[factor]))
            )
        if not specs:
            raise ValueError(f"{type(unet).__name__} has no cross-attention transformer block to attach ROICtrl to")
        device, dtype = _device_and_dtype(unet)
        if device is not None and device.type == "meta":  # a structure-only UNet: the weights get loaded into it
            device, dtype = None, None
        return cls(specs, **kwargs).to(device=device, dtype=dtype)

    @property
    def config(self) -> dict[str, Any]:
        return {
            "blocks": [asdict(s) for s in self.specs],
            "position_dim": self.position_dim,
            "fourier_freqs": self.fourier_freqs,
            "position_hidden_dim": self.position_hidden_dim,
            "ff_mult": self.ff_mult,
            "fused_blend": self.fused_blend,
            **self.options.to_dict(),
        }

    @property
    def fused_blend(self) -> bool:
        """Whether every layer blends with the fused ``roi_ops.roi_unpool_blend`` (assigning sets all layers)."""
        return all(block.fused_blend for block in self.blocks)

    @fused_blend.setter
    def fused_blend(self, value: bool | None) -> None:
        value = resolve_fused_blend(value, self.paste_rule)
        for block in self.blocks:
            block.fused_blend = value

    @property
    def paste_rule(self) -> PasteRule:
        """How every layer pastes its ROI grids back (``options.unpool``): :data:`~.paste.EXACT` or
        :data:`~.paste.OFFICIAL`; its ``coverage`` says which feature pixels a box reaches."""
        return paste_rule(self.options.unpool)

    def extra_repr(self) -> str:
        return f"num_blocks={len(self.specs)}, installed={self.is_installed}, enabled={self.enabled}"

    # ------------------------------------------------------------------ install / uninstall
    @property
    def is_installed(self) -> bool:
        return self._hooks is not None

    def check_compatible(self, unet: nn.Module) -> None:
        """Raise ``ValueError`` saying what differs if ``unet`` is not the kind of UNet this adapter was built for."""
        unet = unwrap_unet(unet)
        found = dict(transformer_blocks(unet))
        names = [s.name for s in self.specs]
        missing = [n for n in names if n not in found]
        extra = [n for n in found if n not in set(names)]
        if missing or extra:
            raise ValueError(
                f"ROICtrlAdapter does not fit this {type(unet).__name__}: the adapter has {len(names)} "
                f"cross-attention blocks, the UNet {len(found)}; missing in the UNet: {missing[:3]}, "
                f"not covered by the adapter: {extra[:3]}"
            )
        for spec in self.specs:
            attn = found[spec.name].attn2
            if (attn.query_dim, attn.cross_attention_dim) != (spec.dim, spec.cross_attention_dim):
                raise ValueError(
                    f"ROICtrlAdapter does not fit block {spec.name!r}: adapter expects width {spec.dim} and "
                    f"caption width {spec.cross_attention_dim}, the UNet has width {attn.query_dim} and caption "
                    f"width {attn.cross_attention_dim}"
                )
            if attn.heads != spec.heads:  # same shapes, different attention: refuse rather than run another model
                raise ValueError(
                    f"ROICtrlAdapter does not fit block {spec.name!r}: adapter expects {spec.heads} attention heads, "
                    f"the UNet has {attn.heads}"
                )
            norm_type = getattr(found[spec.name], "norm_type", None)
            if norm_type not in SUPPORTED_NORMS:
                raise ValueError(f"block {spec.name!r} has norm_type {norm_type!r}; supported: {SUPPORTED_NORMS}")

    def install(self, unet: nn.Module) -> "ROICtrlAdapter":
        """Attach to ``unet`` (hooks only). Returns ``self``.

        A ``torch.compile``d UNet is unwrapped: the hooks go on its original module. Raises ``RuntimeError`` if
        this adapter is already installed, or if ``unet`` already carries another adapter (two would each see
        the instance entry removed by the other, so the second would silently do nothing); ``ValueError`` if
        the shapes differ.
        """
        if self._hooks is not None:
            raise RuntimeError("ROICtrlAdapter is already installed; call uninstall() first")
        unet = unwrap_unet(unet)
        other = installed_adapter(unet)
        if other is not None:
            raise RuntimeError(
                f"this {type(unet).__name__} already has a ROICtrlAdapter installed ({other.extra_repr()}); "
                "call uninstall() on that one first"
            )
        self.check_compatible(unet)
        self._hooks = AdapterHooks(self, unet)
        return self

    def uninstall(self, unet: nn.Module | None = None) -> None:
        """Remove every hook; the UNet is then exactly what it was before :meth:`install`."""
        if self._hooks is None:
            raise RuntimeError("ROICtrlAdapter is not installed")
        if unet is not None and not self._hooks.is_on(unet):
            raise ValueError("ROICtrlAdapter.uninstall got a different UNet from the one it is installed on")
        self._hooks.remove()
        self._hooks = None

    # ------------------------------------------------------------------ training signals
    def regularization_loss(self) -> torch.Tensor:
        """The fusion-weight regulariser of the last UNet call: mean over layers of ``|M * W_global|_1 / |M|_1``.

        ``M`` marks the pixels covered by any instance and ``W_global`` is the global output's blending weight.
        Layers that saw no instance are left out; with none at all the result is a zero scalar. A training loop
        adds ``0.01 * adapter.regularization_loss()`` to the diffusion loss.
        """
        terms = []
        for state in self._layer_states():
            if state.stats is not None:
                w, m = state.stats["base_weight"], state.stats["covered"]
                terms.append((w.float() * m).sum() / m.sum().clamp(min=1))
        if not terms:
            return torch.zeros((), device=self.blocks[0].blend_proj.weight.device)
        return torch.stack(terms).mean()

    def fusion_weights(self) -> dict[str, torch.Tensor]:
        """The global output's blending weight ``[B, H, W]`` per layer name, from the last UNet call."""
        return {
            s.name: st.stats["base_weight"] for s, st in zip(self.specs, self._layer_states()) if st.stats is not None
        }

    def _layer_states(self) -> list:
        return [] if self._hooks is None else self._hooks.states

    @contextlib.contextmanager
    def record_blend_maps(self) -> Iterator[BlendMapRecorder]:
        """Record the blend of every layer in every UNet call made inside the ``with`` block.

        Yields a :class:`~roi_ops.roictrl_adapter.hooks.BlendMapRecorder`: one
        :class:`~roi_ops.roictrl_adapter.hooks.BlendRecord` (layer, ROIs, the global output's weight, each
        instance's weight ``Tensor[K, H, W]``, detached) per layer that blended instances, in call order;
        ``recorder.take()`` returns (in block order) and forgets the ones made since the last ``take``. Recording
        pastes each layer's logits once more (by the layer's paste rule, as its blend did)::

            with adapter.record_blend_maps() as recorder:
                unet(latents, t, text_emb, cross_attention_kwargs={"roictrl": instances})
            for record in recorder.take():
                print(record.layer, record.instance_weights.shape)   # [K, H, W]
        """
        recorder, previous = BlendMapRecorder(), self._blend_recorder
        self._blend_recorder = recorder
        try:
            yield recorder
        finally:
            self._blend_recorder = previous

    @property
    def blend_recorder(self) -> BlendMapRecorder | None:
        """The recorder of the innermost :meth:`record_blend_maps` block, or ``None`` (not recording)."""
        return self._blend_recorder

    # ------------------------------------------------------------------ weights
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``roictrl_adapter.safetensors`` (the adapter's weights only)."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        config = self.config
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump({"_class_name": type(self).__name__, "format_version": 1, **config}, f, indent=2)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        # the config also rides in the weights' header: from_pretrained refuses a config.json whose
        # architecture was edited while every shape still fits (e.g. another head count)
        metadata = {"format": "pt", "roictrl_config": json.dumps(config, sort_keys=True)}
        save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata=metadata)

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        unet: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> "ROICtrlAdapter":
        """Load what :meth:`save_pretrained` wrote, in eval mode. With ``unet``, also check that it fits (clear
        ``ValueError``).

        ``device`` and ``dtype`` default to the ``unet``'s when one is given (else the adapter stays on the CPU in
        the file's dtype).

        The folder is untrusted input: ``config.json`` is checked key by key (types, ranges, relations; see
        :mod:`roi_ops.roictrl_adapter.validation`), the safetensors header is read and checked (float dtypes,
        shapes, offsets, total size against the file) and compared with the shapes the config implies and with
        the config saved beside the weights, all before any parameter is allocated. Weights holding a NaN or an
        infinity are refused (``ValueError`` naming the tensors).
        """
        from safetensors.torch import load_file

        config_path = os.path.join(directory, CONFIG_NAME)
        config = _read_config(directory, cls.__name__)
        kwargs = {k: v for k, v in config.items() if k not in ("_class_name", "format_version")}
        weights_path = os.path.join(directory, WEIGHTS_NAME)
        header, metadata = read_safetensors_header(weights_path)
        if "roictrl_config" in metadata:
            try:
                saved = json.loads(metadata["roictrl_config"])
            except json.JSONDecodeError:
                saved = None
            diffs = architecture_mismatch(kwargs, saved) if isinstance(saved, dict) else ["unreadable"]
            if diffs:
                raise ValueError(
                    f"{config_path} does not describe the model its weights were saved with: {diffs[:3]}"
                )
        with torch.device("meta"):  # the shapes the config implies, without allocating them
            own = {k: tuple(v.shape) for k, v in cls(**kwargs).state_dict().items()}
        missing = sorted(set(own) - set(header))
        unexpected = sorted(set(header) - set(own))
        wrong = [(k, tuple(header[k]["shape"]), v) for k, v in own.items() if k in header and tuple(header[k]["shape"]) != v]
        if missing or unexpected or wrong:
            raise ValueError(
                f"weights in {os.fspath(directory)!r} do not match its config: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}, wrong shapes (name, file, expected) {wrong[:3]}"
            )
        adapter = cls(**kwargs)
        weights = load_file(weights_path)
        check_finite(weights, weights_path)
        adapter.load_state_dict(weights)
        if unet is not None:
            adapter.check_compatible(unet)
            unet_device, unet_dtype = _device_and_dtype(unwrap_unet(unet))
            device = unet_device if device is None else device
            dtype = unet_dtype if dtype is None else dtype
        # Eval mode, as diffusers' from_pretrained: dropout (the official configuration has some) off until train().
        return adapter.to(device=device, dtype=dtype).eval()

    @classmethod
    def from_official(
        cls,
        path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor],
        unet: nn.Module | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **overrides: Any,
    ) -> "ROICtrlAdapter":
        """Build an adapter in the official configuration for ``unet`` and load the official ROICtrl release
        (``ROICtrl_sdv14_30K.safetensors``) into it (:mod:`roi_ops.roictrl_adapter.official`).

        Args:
            path_or_state_dict: the release file (``.safetensors``, or a ``torch.save``d state dict) or the state
                dict itself; keys bare or prefixed by ``unet.`` and/or ``module.``.
            unet: the UNet it will run on (any ``UNet2DConditionModel`` with the SD1.x block structure: SD1.4, 1.5
                and their fine-tunes); ``None`` uses :func:`~roi_ops.roictrl_adapter.official.sd14_unet_structure`.
            device, dtype: where the adapter goes (default CPU, float32; the release is float32).
            overrides: architecture options that keep the parameters, e.g. ``unpool="exact"`` or ``slot_order``.

        Every official key must map to one adapter parameter with the same shape, every adapter parameter must get
        one: otherwise ``ValueError`` with the missing keys, the unexpected keys and the shape / dtype mismatches
        (each named). Values are copied exactly (cast to ``dtype`` if given). The adapter comes back in eval mode.
        """
        state = read_official(path_or_state_dict)
        if unet is None:
            unet = sd14_unet_structure()
        adapter = cls.from_unet(unet, preset="official", **overrides)
        source = (f"the official ROICtrl checkpoint {os.fspath(path_or_state_dict)!r}"
                  if isinstance(path_or_state_dict, (str, os.PathLike)) else "the official ROICtrl state dict")
        load_official_weights(adapter, state, source)
        # Eval mode, as a loaded diffusers model: the official dropout (0.2) acts only after adapter.train().
        return adapter.to(device=device, dtype=dtype).eval()


def _read_config(directory: str | os.PathLike, class_name: str = "ROICtrlAdapter") -> dict[str, Any]:
    """``directory/config.json``, read (at most 16 MiB) and checked by :func:`validate_config`."""
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}; expected a ROICtrlAdapter save")
    with open(config_path, "rb") as f:
        raw = f.read(16 * 1024 * 1024 + 1)
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{config_path} is not a JSON file of at most 16 MiB ({exc})") from None
    validate_config(config, config_path)
    if config["_class_name"] != class_name:
        raise ValueError(f"{config_path} does not describe a {class_name}, got {config['_class_name']!r}")
    return config


def check_adapter_path(path: str | os.PathLike) -> str:
    """What :func:`load_adapter` will read at ``path``, checked without building or loading anything: ``"folder"``
    (a :meth:`ROICtrlAdapter.save_pretrained` folder, or its weights file: config validated, weights header
    checked) or ``"official"`` (the official release file: a safetensors header checked, the keys recognised).
    Raises ``FileNotFoundError``/``ValueError`` naming the problem (a cut-off safetensors file: "truncated")."""
    path = os.fspath(path)
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)) and (
        not os.path.isfile(path) or os.path.basename(path) == WEIGHTS_NAME
    ):
        _read_config(folder)
        weights = os.path.join(folder, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"adapter folder {folder!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        read_safetensors_header(weights)
        return "folder"
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter path {path!r}: no such file or folder")
    not_adapter = (
        f"adapter path {path!r} is not a ROICtrlAdapter folder (expected {CONFIG_NAME} and {WEIGHTS_NAME}, as "
        "ROICtrlAdapter.save_pretrained writes), the path of that weights file, or an official ROICtrl checkpoint"
    )
    if os.path.isdir(path):
        raise ValueError(not_adapter)
    if path.endswith(".safetensors"):
        read_safetensors_header(path)  # a truncated or corrupt file says so here, not "not an adapter"
    if is_official_checkpoint(path):
        return "official"
    raise ValueError(not_adapter)


def load_adapter(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ROICtrlAdapter:
    """Load a ROICtrl adapter from ``path``, whatever form it is in; the one entry point the CLI uses.

    Accepted: a folder written by :meth:`ROICtrlAdapter.save_pretrained` (``config.json`` +
    ``roictrl_adapter.safetensors``), the path of that weights file, or the official ROICtrl release file
    (detected by :func:`~roi_ops.roictrl_adapter.official.is_official_checkpoint`, loaded by :meth:`~ROICtrlAdapter.from_official`). With ``unet`` the adapter is checked
    against it and put on its device and dtype (``device``/``dtype`` override). Not installed. The path and format
    are checked first (:func:`check_adapter_path`).
    """
    path = os.fspath(path)
    if check_adapter_path(path) == "folder":
        folder = os.path.dirname(path) if os.path.isfile(path) else path
        return ROICtrlAdapter.from_pretrained(folder, unet=unet, device=device, dtype=dtype)
    return ROICtrlAdapter.from_official(path, unet, device=device, dtype=dtype)
