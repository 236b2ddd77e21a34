"""ROICtrlAdapter: one :class:`ROICtrlBlock` per cross-attention transformer block of a diffusers UNet.

Installation only registers PyTorch hooks (``uninstall`` removes them); no diffusers module, processor or
parameter is replaced, so the UNet's ``state_dict``, its attention processors (default, SDPA, IP-Adapter,
LoRA layers...) and anything attached to it later keep working. Per block:

* a forward pre-hook on the ``BasicTransformerBlock`` takes the ``"roictrl"`` entry out of
  ``cross_attention_kwargs`` before the block forwards them to ``attn1``/``attn2`` (so no processor ever sees
  an unexpected keyword), and keeps the instances for this call;
* a forward pre-hook on ``norm2`` keeps the residual stream that enters the cross-attention sub-layer;
* a forward hook on ``attn2`` replaces the global cross-attention output with the ROICtrl result, which the
  block then adds to the residual stream as usual;
* a forward pre-hook on the parent ``Transformer2DModel`` records the feature map's ``H x W`` (exact for any
  aspect ratio and any latent size).

The hooks ride on the modules' own calls, so gradient checkpointing recomputes them too.
"""

from __future__ import annotations

import inspect
import json
import os
import weakref
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .block import ROICtrlBlock
from .layers import BoxEncoder
from .checkpoint import architecture_mismatch, read_safetensors_header, validate_config
from .instances import ROICtrlInstances
from .options import OFFICIAL_CONFIG, ArchitectureOptions
from .paste import PasteRule, paste_rule, resolve_fused_blend

__all__ = ["DEFAULT_GRID_SIZES", "ROICtrlAdapter", "installed_adapter", "unwrap_unet"]

#: ROI grid side by the layer's downsampling factor relative to the image (the paper's setting).
DEFAULT_GRID_SIZES = {8: 25, 16: 19, 32: 13, 64: 7}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "roictrl_adapter.safetensors"
KWARG = "roictrl"
# Norm types whose norm2 takes the residual stream right before attn2 (see BasicTransformerBlock.forward).
_SUPPORTED_NORMS = ("layer_norm", "ada_norm", "ada_norm_zero", "layer_norm_i2vgen", "ada_norm_continuous")


@dataclass
class BlockSpec:
    """What the adapter knows about one cross-attention block of the UNet it was built for."""

    name: str  # module path in the UNet, e.g. "down_blocks.0.attentions.1.transformer_blocks.0"
    dim: int  # channels of the layer
    heads: int  # heads of the layer's cross-attention (reused for the new self-attentions)
    cross_attention_dim: int  # width of the caption embeddings the layer takes
    downsample: int  # image pixels per feature pixel at this layer (VAE factor x UNet downsampling)
    grid: int  # ROI grid side


class _LayerState:
    """Per-call scratch of one block; lives outside the modules so that nothing is added to the UNet."""

    __slots__ = ("instances", "residual", "sizes", "stats")

    def __init__(self, sizes: dict):
        self.instances: ROICtrlInstances | None = None
        self.residual: torch.Tensor | None = None
        self.sizes = sizes  # token count -> (H, W), shared by the blocks of one Transformer2DModel
        self.stats: dict[str, torch.Tensor] | None = None


_SIGNATURES: dict[type, list[str]] = {}


def _param_names(module: nn.Module) -> list[str]:
    cls = type(module)
    if cls not in _SIGNATURES:
        params = list(inspect.signature(cls.forward).parameters)
        _SIGNATURES[cls] = params[1:]  # drop self
    return _SIGNATURES[cls]


def _get_arg(module: nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    names = _param_names(module)
    pos = names.index(name) if name in names else len(args)
    return args[pos] if pos < len(args) else None


def _set_arg(module: nn.Module, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
    names = _param_names(module)
    pos = names.index(name) if name in names else len(args)
    if name not in kwargs and pos < len(args):
        args = args[:pos] + (value,) + args[pos + 1 :]
    else:
        kwargs = {**kwargs, name: value}
    return args, kwargs


def _transformer_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention import BasicTransformerBlock

    found = []
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock) and getattr(module, "attn2", None) is not None:
            if module.attn2.is_cross_attention:
                found.append((name, module))
    return found


def _levels(unet: nn.Module) -> dict[str, int]:
    """Number of 2x downsamplings before each top-level UNet block ("down_blocks.1", "mid_block", ...)."""
    levels, level = {}, 0
    for i, block in enumerate(getattr(unet, "down_blocks", [])):
        levels[f"down_blocks.{i}"] = level
        if getattr(block, "downsamplers", None):
            level += 1
    levels["mid_block"] = level
    for i, block in enumerate(getattr(unet, "up_blocks", [])):
        levels[f"up_blocks.{i}"] = level
        if getattr(block, "upsamplers", None):
            level -= 1
    return levels


def unwrap_unet(unet: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), or ``unet`` itself.

    Hooks go on the original module: the compiled wrapper calls its ``forward``, so they run (and are traced)
    either way, and they are removed from the same module by ``uninstall``.
    """
    while isinstance(getattr(unet, "_orig_mod", None), nn.Module):
        unet = unet._orig_mod
    return unet


def _device_and_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype] | tuple[None, None]:
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return None, None


def installed_adapter(unet: nn.Module) -> "ROICtrlAdapter | None":
    """The :class:`ROICtrlAdapter` whose hooks are on ``unet`` (a compiled UNet is unwrapped), or ``None``."""
    for hook in unwrap_unet(unet)._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, ROICtrlAdapter):
            return owner
    return None


def _top_level(name: str) -> str:
    parts = name.split(".")
    return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


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
            ROICtrlBlock(s.dim, s.heads, position_dim, s.grid, ff_mult, fused_blend, self.options) for s in specs
        )
        #: False makes every hook pass the UNet's own computation through untouched.
        self.enabled = True
        self._handles: list[Any] = []
        self._states: list[_LayerState] = []
        self._unet_ref: weakref.ref | None = None

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
            preset: ``None``/``"default"`` (roi-ops' design) or ``"official"`` (``OFFICIAL_CONFIG``: the official
                release's architecture, whose weights :meth:`from_official` loads); ``kwargs`` override it.
            kwargs: the remaining constructor arguments (``position_dim``, options such as ``unpool``, ...).
        """
        if preset == "official":
            kwargs = {**OFFICIAL_CONFIG, **kwargs}
        elif preset not in (None, "default"):
            raise ValueError(f"ROICtrlAdapter.from_unet preset must be None, 'default' or 'official', got {preset!r}")
        grid_sizes = dict(DEFAULT_GRID_SIZES if grid_sizes is None else grid_sizes)
        unet = unwrap_unet(unet)
        levels = _levels(unet)
        specs = []
        for name, block in _transformer_blocks(unet):
            top = _top_level(name)
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
        return bool(self._handles)

    def check_compatible(self, unet: nn.Module) -> None:
        """Raise ``ValueError`` saying what differs if ``unet`` is not the kind of UNet this adapter was built for."""
        unet = unwrap_unet(unet)
        found = dict(_transformer_blocks(unet))
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
            if norm_type not in _SUPPORTED_NORMS:
                raise ValueError(f"block {spec.name!r} has norm_type {norm_type!r}; supported: {_SUPPORTED_NORMS}")

    def install(self, unet: nn.Module) -> "ROICtrlAdapter":
        """Attach to ``unet`` (hooks only). Returns ``self``.

        A ``torch.compile``d UNet is unwrapped: the hooks go on its original module. Raises ``RuntimeError`` if
        this adapter is already installed, or if ``unet`` already carries another adapter (two would each see
        the instance entry removed by the other, so the second would silently do nothing); ``ValueError`` if
        the shapes differ.
        """
        if self._handles:
            raise RuntimeError("ROICtrlAdapter is already installed; call uninstall() first")
        unet = unwrap_unet(unet)
        other = installed_adapter(unet)
        if other is not None:
            raise RuntimeError(
                f"this {type(unet).__name__} already has a ROICtrlAdapter installed ({other.extra_repr()}); "
                "call uninstall() on that one first"
            )
        self.check_compatible(unet)
        handles, states, sizes_by_parent = [], [], {}
        try:
            handles.append(unet.register_forward_pre_hook(self._unet_pre_hook, with_kwargs=True))
            for i, spec in enumerate(self.specs):
                block = unet.get_submodule(spec.name)
                parent_name = spec.name.rsplit(".transformer_blocks.", 1)[0]
                if parent_name not in sizes_by_parent:
                    sizes_by_parent[parent_name] = {}
                    parent = unet.get_submodule(parent_name)
                    handles.append(
                        parent.register_forward_pre_hook(
                            partial(_record_size, sizes_by_parent[parent_name]), with_kwargs=True
                        )
                    )
                states.append(_LayerState(sizes_by_parent[parent_name]))
                handles.append(block.register_forward_pre_hook(partial(self._block_pre_hook, i), with_kwargs=True))
                handles.append(block.norm2.register_forward_pre_hook(partial(self._norm2_pre_hook, i)))
                handles.append(block.attn2.register_forward_hook(partial(self._attn2_hook, i), with_kwargs=True))
                handles.append(block.register_forward_hook(partial(self._block_post_hook, i)))
        except Exception:
            for h in handles:
                h.remove()
            raise
        self._handles, self._states, self._unet_ref = handles, states, weakref.ref(unet)
        return self

    def uninstall(self, unet: nn.Module | None = None) -> None:
        """Remove every hook; the UNet is then exactly what it was before :meth:`install`."""
        if not self._handles:
            raise RuntimeError("ROICtrlAdapter is not installed")
        if unet is not None and (self._unet_ref is None or self._unet_ref() is not unwrap_unet(unet)):
            raise ValueError("ROICtrlAdapter.uninstall got a different UNet from the one it is installed on")
        for h in self._handles:
            h.remove()
        self._handles, self._states, self._unet_ref = [], [], None

    # ------------------------------------------------------------------ hooks
    def _unet_pre_hook(self, module, args, kwargs):
        # Every call starts from empty size records, so a torch.compile'd UNet sees the same state at each call
        # (otherwise the first call, with nothing recorded yet, is compiled again at the second).
        for state in self._states:
            state.sizes.clear()
        # Validate the instance data once per UNet call rather than once per block.
        if not self.enabled:
            return None
        cak = _get_arg(module, args, kwargs, "cross_attention_kwargs")
        if isinstance(cak, Mapping) and cak.get(KWARG) is not None:
            instances = ROICtrlInstances.coerce(cak[KWARG])
            for spec in self.specs:  # fail before the first layer runs, naming the width the UNet expects
                instances.check_embedding_width(spec.cross_attention_dim, f"block {spec.name!r}")
            if instances is not cak[KWARG]:
                cak = {**cak, KWARG: instances}
                return _set_arg(module, args, kwargs, "cross_attention_kwargs", cak)
        return None

    def _block_pre_hook(self, i, module, args, kwargs):
        state = self._states[i]
        state.instances, state.residual, state.stats = None, None, None
        cak = _get_arg(module, args, kwargs, "cross_attention_kwargs")
        if not isinstance(cak, Mapping) or KWARG not in cak:
            return None
        cak = dict(cak)
        data = cak.pop(KWARG)  # never reaches attn1/attn2, so no processor warns about it
        if self.enabled and data is not None:
            instances = ROICtrlInstances.coerce(data)
            active = instances.num_instances > 0 or self.options.guide_empty_samples
            if active and instances.scale != 0.0:
                state.instances = instances
        return _set_arg(module, args, kwargs, "cross_attention_kwargs", cak)

    def _norm2_pre_hook(self, i, module, args):
        state = self._states[i]
        if state.instances is not None:
            state.residual = args[0]

    def _attn2_hook(self, i, module, args, kwargs, output):
        state = self._states[i]
        instances = state.instances
        if instances is None:
            return None
        kwargs = dict(kwargs)
        hidden_states = args[0] if args else kwargs.pop("hidden_states")
        encoder_hidden_states = args[1] if len(args) > 1 else kwargs.pop("encoder_hidden_states", None)
        kwargs.pop("attention_mask", None)
        spec = self.specs[i]
        instances.check_embedding_width(spec.cross_attention_dim, f"block {spec.name!r}")
        size = state.sizes.get(hidden_states.shape[1])
        if size is None or state.residual is None:
            raise RuntimeError(
                f"ROICtrl block {spec.name!r} could not see its feature-map size or residual stream; the adapter "
                "supports BasicTransformerBlocks called by a Transformer2DModel with 4-D input"
            )
        param = self.blocks[i].blend_proj.weight
        mixed = torch.is_autocast_enabled(hidden_states.device.type)  # autocast mixes dtypes on purpose
        if param.device != hidden_states.device or (param.dtype != hidden_states.dtype and not mixed):
            raise RuntimeError(
                f"ROICtrlAdapter is on {param.device}/{param.dtype} but the UNet runs on "
                f"{hidden_states.device}/{hidden_states.dtype} at {spec.name!r}; move it with adapter.to(...)"
            )
        position_tokens = self.box_encoder(instances.instance_boxes.to(hidden_states.device))
        null_position = self.box_encoder.null_token() if self.box_encoder.null_feature is not None else None
        out, stats = self.blocks[i](
            hidden_states,
            state.residual,
            output,
            module,
            instances,
            size,
            position_tokens,
            encoder_hidden_states=encoder_hidden_states,
            attn_kwargs=kwargs,
            null_position=null_position,
        )
        state.stats = stats
        return out

    def _block_post_hook(self, i, module, args, output):
        state = self._states[i]
        state.instances, state.residual = None, None

    # ------------------------------------------------------------------ training signals
    def regularization_loss(self) -> torch.Tensor:
        """The fusion-weight regulariser of the last UNet call: mean over layers of ``|M * W_global|_1 / |M|_1``.

        ``M`` marks the pixels covered by any instance and ``W_global`` is the global output's blending weight.
        Layers that saw no instance are left out; with none at all the result is a zero scalar. A training loop
        adds ``0.01 * adapter.regularization_loss()`` to the diffusion loss.
        """
        terms = []
        for state in self._states:
            if state.stats is not None:
                w, m = state.stats["base_weight"], state.stats["covered"]
                terms.append((w.float() * m).sum() / m.sum().clamp(min=1))
        if not terms:
            return torch.zeros((), device=self.blocks[0].blend_proj.weight.device)
        return torch.stack(terms).mean()

    def fusion_weights(self) -> dict[str, torch.Tensor]:
        """The global output's blending weight ``[B, H, W]`` per layer name, from the last UNet call."""
        return {s.name: st.stats["base_weight"] for s, st in zip(self.specs, self._states) if st.stats is not None}

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
        :mod:`roi_ops.roictrl_adapter.checkpoint`), the safetensors header is read and checked (float dtypes,
        shapes, offsets, total size against the file) and compared with the shapes the config implies and with
        the config saved beside the weights, all before any parameter is allocated.
        """
        from safetensors.torch import load_file

        config_path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no {CONFIG_NAME} in {os.fspath(directory)!r}; expected a ROICtrlAdapter save")
        with open(config_path, "rb") as f:
            raw = f.read(16 * 1024 * 1024 + 1)
        try:
            config = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{config_path} is not a JSON file of at most 16 MiB ({exc})") from None
        validate_config(config, config_path)
        if config["_class_name"] != cls.__name__:
            raise ValueError(f"{config_path} does not describe a {cls.__name__}, got {config['_class_name']!r}")
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
        adapter.load_state_dict(load_file(weights_path))
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
        **kwargs: Any,
    ) -> "ROICtrlAdapter":
        """Load the official ROICtrl release (``ROICtrl_sdv14_30K.safetensors``) into an adapter in the official
        configuration; see :func:`roi_ops.roictrl_adapter.official.from_official` (``unet=None``: the SD1.x
        block structure; ``kwargs``: ``device``, ``dtype``, option overrides such as ``unpool="exact"``)."""
        from .official import from_official

        return from_official(path_or_state_dict, unet, **kwargs)


def _record_size(sizes: dict, module, args, kwargs):
    hidden_states = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 4:
        H, W = hidden_states.shape[-2:]
        sizes[H * W] = (H, W)


def load_adapter(
    path: str | os.PathLike,
    unet: nn.Module | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ROICtrlAdapter:
    """Load a ROICtrl adapter from ``path``, whatever form it is in; the one entry point the CLI uses.

    Accepted: a folder written by :meth:`ROICtrlAdapter.save_pretrained` (``config.json`` +
    ``roictrl_adapter.safetensors``), the path of that weights file, or the official ROICtrl release file
    (detected by :func:`~roi_ops.roictrl_adapter.official.is_official_checkpoint`, loaded by ``from_official``). With ``unet`` the adapter is checked
    against it and put on its device and dtype (``device``/``dtype`` override). Not installed.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)) and (
        not os.path.isfile(path) or os.path.basename(path) == WEIGHTS_NAME
    ):
        return ROICtrlAdapter.from_pretrained(folder, unet=unet, device=device, dtype=dtype)
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter path {path!r}: no such file or folder")
    from .official import from_official, is_official_checkpoint

    if is_official_checkpoint(path):
        return from_official(path, unet, device=device, dtype=dtype)
    raise ValueError(
        f"adapter path {path!r} is not a ROICtrlAdapter folder (expected {CONFIG_NAME} and {WEIGHTS_NAME}, as "
        "ROICtrlAdapter.save_pretrained writes), the path of that weights file, or an official ROICtrl checkpoint"
    )
