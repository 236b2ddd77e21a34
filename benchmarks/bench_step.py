"""Cost of the ROICtrl adapter in a whole UNet call (issue 19): plain UNet vs UNet + default adapter, one process.

    python benchmarks/bench_step.py                          # 512 px (64x64 latents), N = 10, 5 rounds:
                                                             #   benchmarks/results/step_cpu.json
    python benchmarks/bench_step.py --counts 0,5,10,25 --resolutions 512,1024 --rounds 3 --breakdown
    python benchmarks/bench_step.py --train                  # + one training step, plain vs adapter, at N=10
    python benchmarks/bench_step.py --variant kv2:guidance_kv_pool=2   # + that option, same rounds, at N=10
    python benchmarks/bench_step.py --quick                  # tiny UNet, seconds: checks it all runs

What is timed (the issue's held-out check): one forward of an SD1.5-shaped ``UNet2DConditionModel`` (random
weights, built from its config), a classifier-free-guidance batch of 2 whose conditional sample (index 1) carries
``N`` instances and the unconditional one none, under ``torch.no_grad()``, with the default adapter of
``ROICtrlAdapter.from_unet(unet)`` (or ``--grid-policy``/``--guidance-pool``/``--guidance-kv-pool`` overrides),
against the same UNet with no adapter installed. Boxes: sides uniform in 10-50 % of the image, anywhere inside it (seeded), the sizes of a
typical layout. Rounds are interleaved (plain, then each N, in an order that alternates from round to round), so a
load change hits every configuration alike; the JSON keeps every call, the medians, the spread (min / max of the
per-round ratio) and the load of other processes during the run (``other_processes_share_of_machine``, from
``/proc/stat``: trust a run only when it is near 0).

``--breakdown`` adds one more call per N with timers on the adapter's parts (the timers cost a little, so these
calls are not the ones the ratios come from): where the added time goes. ``--train`` times a training step
(forward + ``0.01 * regularization_loss`` + backward + fused AdamW step on the adapter; the plain step: forward +
backward of the same MSE into the latents, frozen UNet), its peak RSS and its minor page faults, plain and adapter
interleaved. ``--host-memory retain`` runs it all with glibc keeping freed memory, as ``roi-ops train`` does on the
CPU (``roi_ops.training.host_memory``; docs/training.md, "Host memory").
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
if str(HERE) not in sys.path:  # machine_load sits beside this file
    sys.path.insert(0, str(HERE))

from bench_training import SD15_UNET  # noqa: E402  (the one SD1.5-shaped UNet config of the benchmarks)
from machine_load import cpu_busy_s  # noqa: E402

QUICK_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
TOKENS = 77
BOX_SIDE = (0.1, 0.5)


class LoadMeter:
    """How much of the machine other processes took between ``start`` and ``stop``."""

    def __init__(self):
        self.t0, self.c0 = time.perf_counter(), cpu_busy_s()

    def share(self) -> float | None:
        c1 = cpu_busy_s()
        if self.c0 is None or c1 is None:
            return None
        wall = time.perf_counter() - self.t0
        others = max((c1[0] - self.c0[0]) - (c1[1] - self.c0[1]), 0.0)
        return round(others / (wall * (os.cpu_count() or 1)), 3)


def _git(*args) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment() -> dict:
    import torch

    import roi_ops

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else None
    return {
        "machine": {"cpu_model": cpu, "logical_cores": os.cpu_count(), "platform": platform.platform()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": __import__("diffusers").__version__, "roi_ops": roi_ops.__version__,
                     "roi_ops_git_sha": _git("rev-parse", "HEAD"),
                     "roi_ops_git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))},
        "threads": torch.get_num_threads(),
        "loadavg_before": [round(x, 2) for x in os.getloadavg()],
    }


def boxes_for(n: int, batch: int, seed: int = 2):
    """``Tensor[batch, n, 4]``: sides uniform in BOX_SIDE of the image, anywhere inside it (seeded)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    lo, hi = BOX_SIDE
    side = lo + (hi - lo) * torch.rand(batch, n, 2, generator=g)
    xy = (1 - side) * torch.rand(batch, n, 2, generator=g)
    return torch.cat([xy, xy + side], dim=-1)


def instances_for(n: int, dim: int, seed: int = 2):
    """A CFG batch of 2: sample 0 (unconditional) without instances, sample 1 with ``n``."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    masks = torch.zeros(2, n, dtype=torch.bool)
    masks[1] = True
    return {"boxes": boxes_for(n, 2, seed), "embeddings": torch.randn(2, n, TOKENS, dim, generator=g), "masks": masks}


class PartTimer:
    """Wall time of the adapter's parts in one call, by forward hooks / method wrappers on every block."""

    def __init__(self, adapter):
        self.totals: dict[str, float] = defaultdict(float)
        self.handles, self.patched = [], []
        for block in adapter.blocks:
            for name in ("roi_attn", "guide_attn", "guide_ff", "position_proj"):
                self._hook(getattr(block, name), name)
            for name in ("instance_path", "box_guidance", "forward", "_blend", "_align", "_inject"):
                if hasattr(block, name):
                    self._wrap(block, name)
        self._hook(adapter.box_encoder, "box_encoder")

    def _hook(self, module, name):
        start = {}

        def pre(*_):
            start[0] = time.perf_counter()

        def post(*_):
            self.totals[name] += time.perf_counter() - start[0]

        self.handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def _wrap(self, obj, name):
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals["block" if name == "forward" else name] += time.perf_counter() - t0

        setattr(obj, name, timed)
        self.patched.append((obj, name))

    def remove(self):
        for h in self.handles:
            h.remove()
        for obj, name in self.patched:
            delattr(obj, name)

    def parts_ms(self) -> dict[str, float]:
        t = {k: 1e3 * v for k, v in self.totals.items()}
        out = {
            "adapter_blocks_total": t.get("block", 0.0),
            "instance_path": t.get("instance_path", 0.0),
            "roi_self_attention": t.get("roi_attn", 0.0),
            "blend": t.get("_blend", 0.0),
            "box_guidance": t.get("box_guidance", 0.0),
            "guidance_self_attention": t.get("guide_attn", 0.0),
            "guidance_feed_forward": t.get("guide_ff", 0.0),
            "box_encoder": t.get("box_encoder", 0.0),
        }
        if "_align" in t:
            out["roi_align"] = t["_align"]
        if "_inject" in t:
            out["instance_cross_attention"] = t["_inject"]
        known = sum(out.get(k, 0.0) for k in ("roi_self_attention", "blend", "roi_align", "instance_cross_attention"))
        out["instance_path_rest"] = out["instance_path"] - known
        out["guidance_rest"] = out["box_guidance"] - out["guidance_self_attention"] - out["guidance_feed_forward"]
        out["outside_blocks"] = 0.0  # filled by the caller: adapter call - plain call - blocks
        return {k: round(v, 2) for k, v in out.items()}


def parse_overrides(spec: str) -> dict:
    """``"OPT=VAL,OPT=VAL"`` -> adapter keyword arguments (``true``/``false`` -> bool, digits -> int)."""
    overrides = {}
    for item in filter(None, spec.split(",")):
        k, _, v = item.partition("=")
        if v.lower() in ("true", "false"):
            overrides[k] = v.lower() == "true"
        else:
            overrides[k] = int(v) if v.lstrip("-").isdigit() else v
    return overrides


def load_shared_weights(adapter, source) -> list[str]:
    """Copy into ``adapter`` every weight of ``source`` it has with the same name and shape; the rest (weights an
    option adds or reshapes) keep their init. Returns the names of those."""
    mine = adapter.state_dict()
    missing, _ = adapter.load_state_dict({k: v for k, v in source.state_dict().items()
                                          if k in mine and mine[k].shape == v.shape}, strict=False)
    return missing


def adapter_kwargs(args) -> dict:
    kw = parse_overrides(args.adapter_options)
    if args.grid_policy:
        kw["grid_policy"] = args.grid_policy
    if args.guidance_pool:
        kw["guidance_pool"] = args.guidance_pool
    if args.guidance_kv_pool:
        kw["guidance_kv_pool"] = args.guidance_kv_pool
    return kw


def run_inference(args, unet, adapter, size: int, counts: list[int], dim: int) -> dict:
    import torch

    rounds = args.rounds if size <= 512 or args.rounds_large is None else args.rounds_large

    g = torch.Generator().manual_seed(0)
    lat = size // 8
    latents = torch.randn(2, 4, lat, lat, generator=g)
    text = torch.randn(2, TOKENS, dim, generator=g)
    t = torch.tensor([500, 500])
    inst = {n: instances_for(n, dim) for n in counts}
    cpu_times: dict[str, list[float]] = {}  # process CPU time per call: less sensitive to other processes' load

    variants = getattr(args, "variant_adapters", {})
    installed = [None]  # the adapter now on the UNet

    def put(a):
        if installed[0] is not a:
            if installed[0] is not None:
                installed[0].uninstall(unet)
            if a is not None:
                a.install(unet)
            installed[0] = a

    def call(c):
        """``c``: None (plain), N (the default adapter) or (variant, N)."""
        label, n = c if isinstance(c, tuple) else (None, c)
        put(None if n is None else variants[label] if label else adapter)
        kw = {} if n is None else {"cross_attention_kwargs": {"roictrl": inst[n]}}
        c0, t0 = time.process_time(), time.perf_counter()
        with torch.no_grad():
            unet(latents, t, text, **kw)
        cpu_times.setdefault(key(c), []).append(time.process_time() - c0)
        return time.perf_counter() - t0

    def key(c):
        return f"{c[0]}:{c[1]}" if isinstance(c, tuple) else str(c)

    configs = [None] + counts + [(label, n) for label in variants for n in args.variant_counts if n in inst]
    for c in configs[: args.warmup and len(configs)]:  # warm-up: one call of each configuration
        call(c)
    times: dict[str, list[float]] = {key(c): [] for c in configs}
    meter = LoadMeter()
    cpu_times.clear()  # the warm-up calls' do not count
    for r in range(rounds):
        order = configs if r % 2 == 0 else configs[::-1]
        for c in order:
            times[key(c)].append(call(c))
        print(f"  {size}px round {r + 1}/{rounds}: " + ", ".join(
            f"{'plain' if c is None else f'N={key(c)}'} {1e3 * times[key(c)][-1]:.0f} ms" for c in configs),
            flush=True)
    put(adapter)
    share = meter.share()
    plain = times["None"]
    result = {
        "image_px": size, "latent": lat, "rounds": rounds, "other_processes_share_of_machine": share,
        "plain_ms": {"median": round(1e3 * statistics.median(plain), 1), "all": [round(1e3 * x, 1) for x in plain],
                     "cpu_median": round(1e3 * statistics.median(cpu_times["None"][: len(plain)]), 1)},
        "adapter": {},
    }
    for n in [key(c) for c in configs[1:]]:
        ts = times[n]
        ratios = [a / p for a, p in zip(ts, plain)]
        cpu, plain_cpu = cpu_times[n][: len(ts)], cpu_times["None"][: len(plain)]
        result["adapter"][n] = {
            "median_ms": round(1e3 * statistics.median(ts), 1), "all_ms": [round(1e3 * x, 1) for x in ts],
            "cpu_ratio_of_medians": round(statistics.median(cpu) / statistics.median(plain_cpu), 4),
            "ratio_of_medians": round(statistics.median(ts) / statistics.median(plain), 4),
            "ratio_per_round": [round(x, 4) for x in ratios],
            "ratio_spread": [round(min(ratios), 4), round(max(ratios), 4)],
        }
    if args.breakdown:
        result["breakdown_ms"] = {}
        for c in configs[1:]:
            label, n = c if isinstance(c, tuple) else (None, c)
            if n == 0:
                continue
            timer = PartTimer(variants[label] if label else adapter)
            try:
                total = call(c)
            finally:
                timer.remove()
            parts = timer.parts_ms()
            parts["call_with_timers"] = round(1e3 * total, 1)
            parts["added_vs_median_plain"] = round(1e3 * total - result["plain_ms"]["median"], 1)
            result["breakdown_ms"][key(c)] = parts
        put(adapter)
    return result


def run_training(args, unet, adapter, dim: int, n: int = 10) -> dict:
    """One training step at 512 px, batch 1 with ``n`` instances (as bench_training.py), plain vs the adapter and
    every ``--variant``, interleaved."""
    import torch
    import torch.nn.functional as F

    from bench_training import _peak_bytes, _reset_peak, _rss_bytes

    g = torch.Generator().manual_seed(5)
    lat = args.train_px // 8
    latents = torch.randn(1, 4, lat, lat, generator=g)
    text = torch.randn(1, TOKENS, dim, generator=g)
    target = torch.randn(1, 4, lat, lat, generator=g)
    t = torch.tensor([500])
    inst = {"boxes": boxes_for(n, 1), "embeddings": torch.randn(1, n, TOKENS, dim, generator=g)}
    adapters = {"adapter": adapter, **getattr(args, "variant_adapters", {})}
    # fused: one pass over each parameter instead of one per AdamW term (the same update; ~5x faster on CPU here)
    optimizers = {name: torch.optim.AdamW(a.parameters(), lr=1e-4, fused=True) for name, a in adapters.items()}
    for a in adapters.values():
        a.train()

    def step(mode: str):
        for name, a in adapters.items():
            if a.is_installed and name != mode:
                a.uninstall(unet)
        model = adapters.get(mode)
        if model is not None and not model.is_installed:
            model.install(unet)
        x = latents.clone().requires_grad_(model is None)  # the plain step backpropagates into the latents
        _reset_peak()
        rss0 = _rss_bytes()
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        kw = {"cross_attention_kwargs": {"roictrl": inst}} if model is not None else {}
        pred = unet(x, t, text, **kw).sample
        loss = F.mse_loss(pred, target)
        if model is not None:
            loss = loss + 0.01 * model.regularization_loss()
        loss.backward()
        if model is not None:
            optimizers[mode].step()
            optimizers[mode].zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        return dt, (_peak_bytes() - rss0) / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0

    modes = ["plain", *adapters]
    for mode in modes:  # warm-up (and AdamW state)
        step(mode)
    rows = {mode: [] for mode in modes}
    meter = LoadMeter()
    for r in range(args.train_rounds):
        for mode in (modes if r % 2 == 0 else modes[::-1]):
            rows[mode].append(step(mode))
        print(f"  train round {r + 1}: " + ", ".join(f"{m} {rows[m][-1][0]:.2f} s" for m in modes), flush=True)
    for a in adapters.values():
        a.eval()
        if a.is_installed:
            a.uninstall(unet)
    out = {"image_px": args.train_px, "batch": 1, "instances": n, "rounds": args.train_rounds,
           "optimizer": "torch.optim.AdamW(lr=1e-4, fused=True)",
           "other_processes_share_of_machine": meter.share()}
    for mode, vals in rows.items():
        out[mode] = {"median_s": round(statistics.median(v[0] for v in vals), 3),
                     "all_s": [round(v[0], 3) for v in vals],
                     "peak_above_step_start_mib": round(max(v[1] for v in vals), 1),
                     "minor_page_faults": [v[2] for v in vals]}
    for mode in adapters:
        ratios = [a[0] / p[0] for a, p in zip(rows[mode], rows["plain"])]
        key = "" if mode == "adapter" else f"{mode}_"
        out[f"{key}ratio_of_medians"] = round(out[mode]["median_s"] / out["plain"]["median_s"], 4)
        out[f"{key}ratio_spread"] = [round(min(ratios), 4), round(max(ratios), 4)]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", default="512", help="image sizes in px, comma-separated (latents = px / 8)")
    ap.add_argument("--counts", default="10", help="instance counts on the conditional sample, comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rounds-large", type=int, default=None, help="rounds above 512 px (default: --rounds)")
    ap.add_argument("--warmup", type=int, default=1, help="1: one call of every configuration first, untimed")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("ROI_OPS_BENCH_THREADS", "1")))
    ap.add_argument("--breakdown", action="store_true", help="one more timed-by-part call per N")
    ap.add_argument("--train", action="store_true", help="also a training step at N=10, plain vs adapter")
    ap.add_argument("--train-rounds", type=int, default=3)
    ap.add_argument("--train-px", type=int, default=512)
    ap.add_argument("--grid-policy", default=None, help="override the adapter's grid_policy")
    ap.add_argument("--guidance-pool", type=int, default=None, help="override the adapter's guidance_pool")
    ap.add_argument("--guidance-kv-pool", type=int, default=None, help="override the adapter's guidance_kv_pool")
    ap.add_argument("--adapter-options", default="", metavar="OPT=VAL[,OPT=VAL]",
                    help="options of the timed adapter instead of from_unet's defaults, e.g. "
                         "guidance_keys=visual,guidance_kv_pool=2,guidance_kv_pool_scope=finest")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:OPT=VAL[,OPT=VAL]",
                    help="also time the adapter with these options (same weights where it has them) in the same "
                         "interleaved rounds, e.g. kv2:guidance_kv_pool=2 or old:guidance_keys=visual,ff_mult=4; "
                         "repeatable")
    ap.add_argument("--variant-counts", default="10", help="instance counts of the variants, comma-separated")
    ap.add_argument("--host-memory", choices=("release", "retain"), default="release",
                    help="release: glibc malloc's defaults (default); retain: glibc keeps freed memory, as roi-ops "
                    "train sets it on the CPU (roi_ops.training.host_memory), for every configuration")
    ap.add_argument("--quick", action="store_true", help="tiny UNet (smoke run); JSON in the temp dir")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.host_memory == "retain":
        from roi_ops.training.host_memory import retain_freed_host_memory

        retain_freed_host_memory()
    sys.path.insert(0, str(HERE))
    from diffusers import UNet2DConditionModel

    from roi_ops.roictrl_adapter import ROICtrlAdapter

    cfg = QUICK_UNET if args.quick else SD15_UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    grid_sizes = {8: 5, 16: 3} if args.quick else None
    adapter = ROICtrlAdapter.from_unet(unet, grid_sizes=grid_sizes, **adapter_kwargs(args))
    dim = cfg["cross_attention_dim"]
    args.variant_counts = [int(c) for c in args.variant_counts.split(",")]
    args.variant_adapters = {}
    for spec in args.variant:
        name, _, opts = spec.partition(":")
        overrides = parse_overrides(opts)
        variant = ROICtrlAdapter.from_unet(unet, grid_sizes=grid_sizes, **{**adapter_kwargs(args), **overrides})
        load_shared_weights(variant, adapter)
        args.variant_adapters[name] = variant.eval()
    doc = {"benchmark": "UNet forward with vs without the default ROICtrl adapter (issue 19)",
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **environment(),
           "unet": "SD1.5-shaped UNet2DConditionModel, random weights" if not args.quick else "tiny UNet",
           "adapter_config": {k: v for k, v in adapter.config.items() if k != "blocks"},
           "variants": {name: {k: v for k, v in a.config.items() if k != "blocks" and adapter.config.get(k) != v}
                        for name, a in args.variant_adapters.items()},
           "grids": sorted({s.grid for s in adapter.specs}), "box_side": BOX_SIDE, "batch": 2,
           "instances_on": "sample 1 of 2 (CFG)", "host_memory": args.host_memory, "results": []}
    t0 = time.perf_counter()
    counts = [int(c) for c in args.counts.split(",")]
    for px in (int(r) for r in args.resolutions.split(",")):
        px = 64 if args.quick else px
        doc["results"].append(run_inference(args, unet, adapter, px, counts, dim))
        res = doc["results"][-1]
        print(json.dumps({n: (v["ratio_of_medians"], v["ratio_spread"], v["cpu_ratio_of_medians"])
                          for n, v in res["adapter"].items()}),
              flush=True)
        for n, parts in res.get("breakdown_ms", {}).items():
            print(f"  breakdown N={n}: {parts}", flush=True)
        if args.quick:
            break
    if args.train:
        if args.quick:
            args.train_px = 64
        doc["training"] = run_training(args, unet, adapter, dim)
        print(json.dumps(doc["training"]), flush=True)
    doc["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    doc["total_wall_s"] = round(time.perf_counter() - t0, 1)
    path = Path(args.json) if args.json else (Path(tempfile.gettempdir()) / "step_cpu_quick.json" if args.quick
                                              else RESULTS / "step_cpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
