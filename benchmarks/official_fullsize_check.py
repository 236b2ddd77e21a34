"""End-to-end check at full Stable Diffusion 1.4 size (not in CI: about 1 GB written twice, a few minutes on 2 cores).

Builds a synthetic official release from the released key list (tests/adapter/data/official_roictrl_sd14_keys.json,
487 keys, random values), converts it with ``python -m roi_ops.cli convert-official``, loads the folder into a
randomly initialised SD1.4 UNet and runs a forward at latent 64 x 64 (image 512) with instances.

    .venv/bin/python benchmarks/official_fullsize_check.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = os.path.join(HERE, "..", "tests", "adapter", "data", "official_roictrl_sd14_keys.json")


def main() -> None:
    from diffusers import UNet2DConditionModel

    from roi_ops.roictrl_adapter import ROICtrlAdapter
    from roi_ops.roictrl_adapter.official import SD14_UNET_CONFIG

    start = time.time()
    with open(KEYS) as f:
        shapes = json.load(f)
    g = torch.Generator().manual_seed(0)
    state = {"unet." + k: (torch.tensor(0.7) if s == [] else torch.empty(s).normal_(0, 0.02, generator=g))
             for k, s in shapes.items()}
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "ROICtrl_sdv14_30K.safetensors"), os.path.join(tmp, "converted")
        save_file(state, src)
        del state
        subprocess.run([sys.executable, "-m", "roi_ops.cli", "convert-official", src, out], check=True)
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SD14_UNET_CONFIG).eval().requires_grad_(False)
        adapter = ROICtrlAdapter.from_pretrained(out, unet).install(unet)
    boxes = torch.tensor([[0.1, 0.1, 0.6, 0.5], [0.4, 0.3, 0.95, 0.9], [0.0, 0.0, 1.0, 1.0]]).expand(2, 3, 4)
    data = {"boxes": boxes, "masks": torch.tensor([[1, 1, 1], [1, 0, 0]]), "embeddings": torch.randn(2, 3, 77, 768)}
    sample, t, text = torch.randn(2, 4, 64, 64), torch.tensor([500, 500]), torch.randn(2, 77, 768)
    with torch.no_grad():
        out_ = unet(sample, t, text, cross_attention_kwargs={"roictrl": data}).sample
        adapter.enabled = False
        base = unet(sample, t, text).sample
    assert torch.isfinite(out_).all() and (out_ - base).abs().max() > 0
    print(f"full-size SD1.4: converted, loaded, forward {tuple(out_.shape)} finite, max change from the base "
          f"{float((out_ - base).abs().max()):.3g}; {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
