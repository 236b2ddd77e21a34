"""The diffusers plumbing of :class:`~roi_ops.roictrl_adapter.ROICtrlAdapter`: the hooks that run its blocks
inside a UNet, and what they record.

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

The hooks ride on the modules' own calls, so gradient checkpointing recomputes them too. The helpers that read
and rewrite a module call's arguments by name (:func:`get_call_arg`, :func:`set_call_arg`) are public: the
pipeline's own UNet hook uses them.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .instances import ROICtrlInstances

__all__ = [
    "KWARG",
    "AdapterHooks",
    "BlendMapRecorder",
    "BlendRecord",
    "get_call_arg",
    "installed_adapter",
    "set_call_arg",
    "transformer_blocks",
    "unwrap_unet",
]

#: The ``cross_attention_kwargs`` key that carries the instances.
KWARG = "roictrl"
# Norm types whose norm2 takes the residual stream right before attn2 (see BasicTransformerBlock.forward).
SUPPORTED_NORMS = ("layer_norm", "ada_norm", "ada_norm_zero", "layer_norm_i2vgen", "ada_norm_continuous")


@dataclass(frozen=True)
class BlendRecord:
    """The blend of one adapter layer in one UNet call (what :meth:`ROICtrlAdapter.record_blend_maps` yields).

    Attributes:
        call: the UNet call it belongs to (0, 1, ... in the order of the calls recorded by its recorder).
        index: the layer's rank in ``adapter.blocks`` / ``adapter.specs``. layer: its module path in the UNet.
        rois: ``Tensor[K, 5]`` the instances' boxes in feature pixels, ``(batch_index, x1, y1, x2, y2)``.
        base_weight: ``Tensor[B, H, W]`` the global output's weight.
        instance_weights: ``Tensor[K, H, W]`` each instance's weight in the per-pixel softmax (0 where it does
            not cover; with ``base_weight`` of its image they sum to 1), pasted by the layer's paste rule.
    """

    call: int
    index: int
    layer: str
    rois: torch.Tensor
    base_weight: torch.Tensor
    instance_weights: torch.Tensor


class BlendMapRecorder:
    """Collects one :class:`BlendRecord` per adapter layer that blended instances, call after call."""

    def __init__(self) -> None:
        self.records: list[BlendRecord] = []
        #: UNet calls seen so far (the ``call`` of the next call's records)
        self.calls = 0

    def add(self, index: int, layer: str, rois, base_weight, instance_weights) -> None:
        """Record one layer's blend in the current UNet call."""
        self.records.append(BlendRecord(self.calls - 1, index, layer, rois, base_weight, instance_weights))

    def take(self) -> list[BlendRecord]:
        """The records made since the last ``take`` (call by call, each in the adapter's block order),
        forgetting them here."""
        taken, self.records = sorted(self.records, key=lambda r: (r.call, r.index)), []
        return taken

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)


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


def get_call_arg(module: nn.Module, args: tuple, kwargs: dict, name: str) -> Any:
    """The argument ``name`` of a call ``module(*args, **kwargs)`` (by keyword or by its position in
    ``forward``'s signature), or ``None``; for forward pre-hooks registered ``with_kwargs=True``."""
    if name in kwargs:
        return kwargs[name]
    names = _param_names(module)
    pos = names.index(name) if name in names else len(args)
    return args[pos] if pos < len(args) else None


def set_call_arg(module: nn.Module, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of the same call with the argument ``name`` set to ``value`` (a pre-hook's return)."""
    names = _param_names(module)
    pos = names.index(name) if name in names else len(args)
    if name not in kwargs and pos < len(args):
        args = args[:pos] + (value,) + args[pos + 1 :]
    else:
        kwargs = {**kwargs, name: value}
    return args, kwargs


def transformer_blocks(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every ``BasicTransformerBlock`` of ``unet`` with a cross-attention ``attn2``."""
    from diffusers.models.attention import BasicTransformerBlock

    found = []
    for name, module in unet.named_modules():
        if isinstance(module, BasicTransformerBlock) and getattr(module, "attn2", None) is not None:
            if module.attn2.is_cross_attention:
                found.append((name, module))
    return found


def unet_levels(unet: nn.Module) -> dict[str, int]:
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


def top_level(name: str) -> str:
    """The top-level UNet block of a module path: ``"down_blocks.1"``, ``"mid_block"``, ..."""
    parts = name.split(".")
    return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


def unwrap_unet(unet: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``OptimizedModule._orig_mod``), or ``unet`` itself.

    Hooks go on the original module: the compiled wrapper calls its ``forward``, so they run (and are traced)
    either way, and they are removed from the same module by ``uninstall``.
    """
    while isinstance(getattr(unet, "_orig_mod", None), nn.Module):
        unet = unet._orig_mod
    return unet


def installed_adapter(unet: nn.Module) -> "nn.Module | None":
    """The :class:`ROICtrlAdapter` whose hooks are on ``unet`` (a compiled UNet is unwrapped), or ``None``."""
    for hook in unwrap_unet(unet)._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, AdapterHooks):
            return owner.adapter
    return None


def _record_size(sizes: dict, module, args, kwargs):
    hidden_states = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden_states, torch.Tensor) and hidden_states.dim() == 4:
        H, W = hidden_states.shape[-2:]
        sizes[H * W] = (H, W)


class AdapterHooks:
    """The hooks of one adapter on one UNet (made by :meth:`ROICtrlAdapter.install`, removed by :meth:`remove`),
    and the per-call state of every layer they share."""

    def __init__(self, adapter: nn.Module, unet: nn.Module):
        self.adapter = adapter
        handles, states, sizes_by_parent = [], [], {}
        try:
            handles.append(unet.register_forward_pre_hook(self._unet_pre_hook, with_kwargs=True))
            for i, spec in enumerate(adapter.specs):
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
        self.handles, self.states, self.unet_ref = handles, states, weakref.ref(unet)

    def is_on(self, unet: nn.Module) -> bool:
        """Whether these hooks are on ``unet`` (a compiled UNet is unwrapped)."""
        return self.unet_ref() is unwrap_unet(unet)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.states = [], []

    def _unet_pre_hook(self, module, args, kwargs):
        adapter = self.adapter
        # Every call starts from empty size records, so a torch.compile'd UNet sees the same state at each call
        # (otherwise the first call, with nothing recorded yet, is compiled again at the second).
        for state in self.states:
            state.sizes.clear()
        if adapter.blend_recorder is not None:
            adapter.blend_recorder.calls += 1
        # Validate the instance data once per UNet call rather than once per block.
        if not adapter.enabled:
            return None
        cak = get_call_arg(module, args, kwargs, "cross_attention_kwargs")
        if isinstance(cak, Mapping) and cak.get(KWARG) is not None:
            instances = ROICtrlInstances.coerce(cak[KWARG])
            for spec in adapter.specs:  # fail before the first layer runs, naming the width the UNet expects
                instances.check_embedding_width(spec.cross_attention_dim, f"block {spec.name!r}")
            if instances is not cak[KWARG]:
                cak = {**cak, KWARG: instances}
                return set_call_arg(module, args, kwargs, "cross_attention_kwargs", cak)
        return None

    def _block_pre_hook(self, i, module, args, kwargs):
        state = self.states[i]
        state.instances, state.residual, state.stats = None, None, None
        cak = get_call_arg(module, args, kwargs, "cross_attention_kwargs")
        if not isinstance(cak, Mapping) or KWARG not in cak:
            return None
        cak = dict(cak)
        data = cak.pop(KWARG)  # never reaches attn1/attn2, so no processor warns about it
        if self.adapter.enabled and data is not None:
            instances = ROICtrlInstances.coerce(data)
            active = instances.num_instances > 0 or self.adapter.options.guide_empty_samples
            if active and instances.scale != 0.0:
                state.instances = instances
        return set_call_arg(module, args, kwargs, "cross_attention_kwargs", cak)

    def _norm2_pre_hook(self, i, module, args):
        state = self.states[i]
        if state.instances is not None:
            state.residual = args[0]

    def _attn2_hook(self, i, module, args, kwargs, output):
        adapter = self.adapter
        state = self.states[i]
        instances = state.instances
        if instances is None:
            return None
        kwargs = dict(kwargs)
        hidden_states = args[0] if args else kwargs.pop("hidden_states")
        encoder_hidden_states = args[1] if len(args) > 1 else kwargs.pop("encoder_hidden_states", None)
        kwargs.pop("attention_mask", None)
        spec = adapter.specs[i]
        instances.check_embedding_width(spec.cross_attention_dim, f"block {spec.name!r}")
        size = state.sizes.get(hidden_states.shape[1])
        if size is None or state.residual is None:
            raise RuntimeError(
                f"ROICtrl block {spec.name!r} could not see its feature-map size or residual stream; the adapter "
                "supports BasicTransformerBlocks called by a Transformer2DModel with 4-D input"
            )
        param = adapter.blocks[i].blend_proj.weight
        mixed = torch.is_autocast_enabled(hidden_states.device.type)  # autocast mixes dtypes on purpose
        if param.device != hidden_states.device or (param.dtype != hidden_states.dtype and not mixed):
            raise RuntimeError(
                f"ROICtrlAdapter is on {param.device}/{param.dtype} but the UNet runs on "
                f"{hidden_states.device}/{hidden_states.dtype} at {spec.name!r}; move it with adapter.to(...)"
            )
        position_tokens = adapter.box_encoder(instances.instance_boxes.to(hidden_states.device))
        null_position = adapter.box_encoder.null_token() if adapter.box_encoder.null_feature is not None else None
        recorder = adapter.blend_recorder
        out, stats = adapter.blocks[i](
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
            record_blend=recorder is not None,
        )
        state.stats = stats
        if recorder is not None and "instance_weights" in stats:
            recorder.add(i, spec.name, stats["rois"], stats["base_weight"].detach(), stats["instance_weights"])
        return out

    def _block_post_hook(self, i, module, args, output):
        state = self.states[i]
        state.instances, state.residual = None, None
