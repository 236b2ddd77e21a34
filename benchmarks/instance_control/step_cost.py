"""Time and memory of one toy training step: ROICtrl (ROI-Align / ROI-Unpool) against its masked-attention ablation.

    python -m benchmarks.instance_control.step_cost --out benchmarks/instance_control/results/step_cost.json

The toy model of ``checkpoints/model`` with a fresh adapter of the committed size, one training step as the
trainer runs it (batch 16 training layouts, UNet forward with the adapter, ``L_LDM + 0.01 L_reg``, backward),
for ``roictrl`` and ``masked_attn`` (``ablations.py``; the same weights) in turns, in one process, so the ratio
comes from one run. Time: median over the measured steps. Memory: the bytes autograd saves for the backward
(every tensor the forward keeps, counted by ``torch.autograd.graph.saved_tensors_hooks``: the activation memory
of a step, deterministic, unlike the process's peak RSS) and the growth of the peak RSS over the run. The large
shapes (SD1.5, up to 50 instances) are measured in ``docs/efficiency.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from . import ablations, evaluate, models, train, world

CKPT = os.path.join(os.path.dirname(__file__), "checkpoints")


def saved_bytes(fn) -> tuple[object, int]:
    """``fn()``'s result and the bytes of every tensor autograd saved for the backward while it ran."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def main(argv=None):
    from diffusers import DDPMScheduler

    from roi_ops.roictrl_adapter.instances import ROICtrlInstances

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=CKPT)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--steps", type=int, default=6, help="measured steps per method (after one warm-up each)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    vae, unet, text_encoder, tokenizer = train.load_model(args.ckpt)
    unet.requires_grad_(False)
    images, boxes, masks, captions, prompts = world.batch([world.train_layout(i, 0) for i in range(16)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        text, _ = models.encode_text(text_encoder, tokenizer, prompts)
        states, _ = models.encode_text(text_encoder, tokenizer, [c for row in captions for c in row])
    scheduler = DDPMScheduler(**models.scheduler_config())
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    noisy = scheduler.add_noise(z, noise, t)
    instances = ROICtrlInstances(boxes, states.view(16, masks.shape[1], *states.shape[1:]), masks)

    adapters = {}
    for name in ("roictrl", "masked_attn"):
        adapter = train.make_roictrl_adapter(unet, 0)  # the same initial weights for both
        if name != "roictrl":
            ablations.apply(adapter, name)
        adapters[name] = adapter

    def step(adapter):
        adapter.install(unet)
        try:
            def fwd():
                pred = unet(noisy, t, text, cross_attention_kwargs={"roictrl": instances}).sample
                return F.mse_loss(pred, noise) + 0.01 * adapter.regularization_loss()

            t0 = time.perf_counter()
            loss, saved = saved_bytes(fwd)
            loss.backward()
            seconds = time.perf_counter() - t0
        finally:
            adapter.uninstall(unet)
        adapter.zero_grad(set_to_none=True)
        return seconds, saved

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = {n: [] for n in adapters}
    saved = {}
    for i in range(args.steps + 1):
        for name, adapter in adapters.items():  # in turns, so both see the same machine load
            seconds, saved[name] = step(adapter)
            if i:
                times[name].append(seconds)
    record = {
        "methods": {n: {"seconds_per_step_median": statistics.median(v), "seconds_per_step": v,
                        "saved_for_backward_mib": saved[n] / 2**20} for n, v in times.items()},
        "masked_over_roi": {
            "time": statistics.median(times["masked_attn"]) / statistics.median(times["roictrl"]),
            "saved_for_backward": saved["masked_attn"] / saved["roictrl"]},
        "peak_rss_growth_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024,
        "settings": {"batch": 16, "latent": "4x16x16 (32x32 images)", "instances_per_sample": "1-6 (training layouts 0-15)",
                     "measured_steps": args.steps, "order": "interleaved, one warm-up step each"},
        "environment": evaluate.environment(),
    }
    evaluate.write_json(args.out, record)
    r = record["masked_over_roi"]
    print(f"masked / ROI per training step: time {r['time']:.2f}x, saved activations {r['saved_for_backward']:.2f}x "
          + " ".join(f"{n} {v['seconds_per_step_median']:.3f}s {v['saved_for_backward_mib']:.1f}MiB"
                     for n, v in record["methods"].items()))
    return record


if __name__ == "__main__":
    main()
