"""Where a UNet call's adapter time goes, block by block (issue 19): each ``ROICtrlBlock``'s instance path and box
guidance timed alone, without gradients, on random inputs of that block's shape.

    python benchmarks/adapter_parts.py                # SD1.5-shaped UNet, 512 px, CFG batch of 2, 10 instances
                                                      #   on the conditional sample: benchmarks/results/adapter_parts_cpu.json

The adapter is ``ROICtrlAdapter.from_unet(unet)`` (or ``--adapter-options``, as bench_step.py). Per block: the
instance path (``instance_path``: ROI-Align, the layer's own cross-attention on the crops, ROI self-attention,
blend), the box guidance of the conditional sample (``box_guidance``) and its feed-forward alone, and, for scale,
the layer's own cross-attention on both samples. Medians of ``--repeats`` calls after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_step import QUICK_UNET, TOKENS, environment, instances_for, parse_overrides  # noqa: E402
from breakdown import median_ms  # noqa: E402
from bench_training import SD15_UNET  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--adapter-options", default="", metavar="OPT=VAL[,OPT=VAL]")
    ap.add_argument("--quick", action="store_true", help="tiny UNet (a smoke run); give --json")
    ap.add_argument("--json", default=str(HERE / "results" / "adapter_parts_cpu.json"))
    args = ap.parse_args(argv)

    import torch
    from diffusers import UNet2DConditionModel

    from roi_ops.roictrl_adapter import ROICtrlAdapter, ROICtrlInstances

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = QUICK_UNET if args.quick else SD15_UNET
    unet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    grid_sizes = {8: 5, 16: 3} if args.quick else None
    adapter = ROICtrlAdapter.from_unet(unet, grid_sizes=grid_sizes, **parse_overrides(args.adapter_options)).eval()
    data = instances_for(args.instances, cfg["cross_attention_dim"])
    inst = ROICtrlInstances(data["boxes"], data["embeddings"], data["masks"])
    conditional = torch.tensor([1])
    blocks, totals = [], {"instance_path": 0.0, "guidance": 0.0, "guidance_feed_forward": 0.0,
                          "layer_cross_attention": 0.0}
    for spec, block in zip(adapter.specs, adapter.blocks):
        side = cfg["sample_size"] * 8 // spec.downsample
        attn2 = unet.get_submodule(spec.name).attn2
        x = torch.randn(2, side * side, spec.dim)
        text = torch.randn(2, TOKENS, cfg["cross_attention_dim"])
        with torch.no_grad():
            g = attn2(x, encoder_hidden_states=text)
            pos = adapter.box_encoder(inst.instance_boxes)
            row = {
                "block": spec.name, "map": side, "channels": spec.dim,
                "instance_path": median_ms(lambda: block.instance_path(x, g, attn2, inst, (side, side)), args.repeats),
                "guidance": median_ms(lambda: block.box_guidance(x[1:], pos, inst, conditional, None, (side, side)),
                                      args.repeats),
                "layer_cross_attention": median_ms(lambda: attn2(x, encoder_hidden_states=text), args.repeats),
            }
            if block.options.guidance_feed_forward:
                row["guidance_feed_forward"] = median_ms(lambda: block.guide_ff(block.guide_ff_norm(x[1:])),
                                                         args.repeats)
        for k in totals:
            totals[k] += row.get(k, 0.0)
        blocks.append(row)
        print(json.dumps(row), flush=True)
    doc = {"benchmark": "ROICtrl adapter parts per block, no gradient (issue 19)", **environment(),
           "adapter_config": {k: v for k, v in adapter.config.items() if k != "blocks"},
           "instances": args.instances, "batch": 2, "instances_on": "sample 1 of 2 (CFG)", "repeats": args.repeats,
           "totals_ms": {k: round(v, 1) for k, v in totals.items()}, "blocks": blocks}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc["totals_ms"]))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
