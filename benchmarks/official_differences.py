"""Measure each difference between the official ROICtrl block and roi-ops' design on a UNet output.

No trained weights can be downloaded here, so this uses random official-format weights (every gate non-zero) on a
UNet with Stable Diffusion 1.4's block structure at a tenth of its width (tests/adapter/test_official.py's SMALL),
at the real resolution: latent 64 x 64 (image 512), batch 2 (sample 0 with 6 instances, sample 1 none). For each
option the adapter is switched from the official configuration to roi-ops' choice, keeping every weight that
still applies, and the change of the noise prediction is reported relative to the adapter's own effect
(``|out_variant - out_official| / |out_official - out_base|``, L2). Also: the share of covered pixels the
quantised unpool zeroes at each layer size. Writes benchmarks/results/official_differences.json.

    .venv/bin/python benchmarks/official_differences.py
"""

from __future__ import annotations

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "adapter"))

import official_reference as ref  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from test_official import SMALL  # noqa: E402

from roi_ops.roictrl_adapter import OFFICIAL_CONFIG, ROICtrlAdapter  # noqa: E402
from roi_ops.roictrl_adapter.official import roi_unpool_quantized  # noqa: E402

LATENT = (64, 64)


def rim_shares(trials: int = 2000) -> dict[str, float]:
    """Share of the pixels inside a box that the quantised unpool sets to 0, for boxes of 10-100% of the side."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for size, grid in ((64, 25), (32, 19), (16, 13), (8, 7)):
        side = 0.1 + 0.9 * torch.rand(trials, 2, generator=g, dtype=torch.float64)
        lo = torch.rand(trials, 2, generator=g, dtype=torch.float64) * (1 - side)
        boxes = torch.cat([torch.zeros(trials, 1, dtype=torch.float64), lo, lo + side], 1)
        boxes[:, 1:] *= size
        pasted = roi_unpool_quantized(torch.ones(trials, 1, grid, grid, dtype=torch.float64), boxes, (size, size))
        start, end = torch.ceil(boxes[:, 1:3] - 0.5), torch.ceil(boxes[:, 3:5] - 0.5)
        inside = ((end - start).clamp(min=0)).prod(1)
        out[f"{size}x{size}, grid {grid}"] = float(1 - (pasted != 0).sum() / inside.sum())
    return out


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    unet = UNet2DConditionModel(**SMALL).requires_grad_(False).eval()
    state = ref.synthetic_state_dict(ref.unet_official_shapes(unet), seed=1)
    g = torch.Generator().manual_seed(3)
    lo = torch.rand(2, 30, 2, generator=g) * 0.5
    boxes = torch.cat([lo, lo + 0.2 + torch.rand(2, 30, 2, generator=g) * 0.3], -1)
    masks = torch.zeros(2, 30)
    masks[0, :6] = 1
    emb = torch.randn(2, 30, 7, 32, generator=g)
    sample = torch.randn(2, 4, *LATENT, generator=g)
    t, text = torch.tensor([500, 500]), torch.randn(2, 7, 32, generator=g)
    kw = {"roictrl": {"boxes": boxes, "masks": masks, "embeddings": emb}}

    def run(adapter=None, seed=None):
        if adapter is not None:
            adapter.install(unet)
        try:
            if seed is not None:
                torch.manual_seed(seed)
            with torch.no_grad():
                return unet(sample, t, text, cross_attention_kwargs=kw if adapter else None).sample
        finally:
            if adapter is not None:
                adapter.uninstall()

    official = ROICtrlAdapter.from_official(state, unet)
    weights = official.state_dict()

    def variant(**overrides):
        adapter = ROICtrlAdapter.from_unet(unet, preset="official", **overrides).eval()
        adapter.load_state_dict({k: v for k, v in weights.items() if k in adapter.state_dict()}, strict=False)
        return adapter

    base, ref_out = run(), run(official)
    effect = (ref_out - base).norm()

    def rel(out, sample_index=None):
        s = slice(None) if sample_index is None else slice(sample_index, sample_index + 1)
        return float((out[s] - ref_out[s]).norm() / (ref_out[s] - base[s]).norm())

    results = {
        "setting": "random official-format weights, SD1.4 block structure at 1/10 width, latent 64x64, float32",
        "adapter_effect_relative_to_base": float(effect / base.norm()),
        "unpool exact (vs quantised)": rel(run(variant(unpool="exact"))),
        "sampling_ratio -1 (vs 2)": rel(run(variant(sampling_ratio=-1))),
        "fourier pow2_pi (vs gligen)": rel(run(variant(fourier_embedding="pow2_pi"))),
        "position_padding drop (vs null_token)": rel(run(variant(position_padding="drop"))),
        "channel_gate off (vs on)": rel(run(variant(channel_gate=False))),
        "guide_empty_samples off, on the empty sample (vs on)": rel(run(variant(guide_empty_samples=False)), 1),
        "slot_order random (vs identity), mean of 4 draws": sum(
            rel(run(variant(slot_order="random"), seed=s)) for s in range(4)
        ) / 4,
        "rim_share_of_box_pixels_zeroed": rim_shares(),
    }
    path = os.path.join(HERE, "results", "official_differences.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    assert OFFICIAL_CONFIG["unpool"] == "official"


if __name__ == "__main__":
    main()
