"""Benchmark of one ROICtrl adapter block at SD1.5 level-1 shapes: fused vs naive vs masked-attention ROICtrl.

    python benchmarks/bench_adapter.py --max-gib 20   # the full run (~45 min on 2 idle cores): writes
                                                    #   benchmarks/results/adapter_cpu.json, adapter_cpu.png
                                                    #   and the table in docs/efficiency.md
    python benchmarks/bench_adapter.py --quick      # small shapes, seconds per case: checks it all runs
                                                    #   (files in the temp dir, docs untouched)
    python benchmarks/bench_adapter.py --report     # plot + docs table again from the existing JSON
    python benchmarks/bench_adapter.py --profile 1024px:25   # torch.profiler top ops of each method's forward

What is measured, per (resolution, N instances, method), each in a FRESH subprocess:

* the block: :class:`roi_ops.roictrl_adapter.ROICtrlBlock` ``forward`` (steps 1-5: ROI-Align, instance
  cross-attention through the layer's own diffusers ``Attention``, ROI self-attention, paste-back + blend,
  box-coordinate guidance) given the layer's normed hidden states, residual stream and global cross-attention
  output (made up front: the global ``attn2`` call is the base model's and is the same for every method), plus
  the shared box encoder;
* ``fwd``: inference, under ``torch.no_grad()``; the median of ``fwd_repeats`` calls after ``warmup`` calls
  (see RESOLUTIONS: fewer at 1024 px, where one call takes 10-40 s), and the time spent in the instance path
  (steps 1-4) and in the box guidance (step 5) of each call;
* ``fwd+bwd``: training, forward then ``backward`` of ``<out, fixed random gradient> + 0.01 * L_reg`` into
  the block's and box encoder's parameters and the three input tensors (as in a UNet with adapter layers
  before this one); median of ``train_repeats`` steps (the forward calls warmed the process up);
* peak memory: ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's RSS high-water mark) after the
  forward calls and again after the training steps, minus the process's RSS just before the first call (read
  from ``/proc/self/statm``). Setup makes its inputs directly (no big temporaries), and the JSON records when a
  high-water mark was already reached during setup (``peak_saturated``), which would hide a smaller peak.

Cases whose estimated training memory exceeds ``--max-gib`` (default 16) are skipped and recorded with the
reason: at 1024 px the estimate is 4x (the pixel ratio) the same case's measured 512 px training peak.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
JSON_PATH = RESULTS / "adapter_cpu.json"
PNG_PATH = RESULTS / "adapter_cpu.png"
DOC_PATH = REPO / "docs" / "efficiency.md"
TABLE_BEGIN = "<!-- adapter-table:begin (bench_adapter.py --report writes this) -->"
TABLE_END = "<!-- adapter-table:end -->"

THREADS = int(os.environ.get("ROI_OPS_BENCH_THREADS", "2"))
METHODS = ("fused", "naive", "masked", "masked_xattn")
COUNTS = (1, 5, 10, 25, 50)

# SD1.5 UNet level 1 (down_blocks.0 / up_blocks.3): 320 channels, 8 heads of 40, CLIP-L captions (77 x 768),
# 8x VAE downsampling, so the adapter's ROI grid is 25 x 25. B = 2: a classifier-free-guidance batch, whose
# unconditional half has no instance (all-zero masks), the conditional half N instances.
SHAPE = dict(batch=2, channels=320, heads=8, caption_length=77, caption_dim=768, grid=25, position_dim=768,
             ff_mult=4, box_side=(0.1, 0.4))
RESOLUTIONS = {
    "512px": dict(image_px=512, size=(64, 64), warmup=1, fwd_repeats=3, train_repeats=3),
    # A 1024 px call takes 3-150 s here (the box guidance's self-attention over 16k tokens alone is ~3 s, the
    # masked self-attention ~3 s per instance): no warm-up call (its one-time costs are small next to that) and
    # fewer repeats; a second forward only while the first took under `repeat_budget_s`.
    "1024px": dict(image_px=1024, size=(128, 128), warmup=0, fwd_repeats=2, train_repeats=1, repeat_budget_s=60),
}
QUICK = dict(channels=64, heads=4, caption_length=16, caption_dim=64, grid=8, position_dim=64)
QUICK_RESOLUTIONS = {
    "512px": dict(image_px=128, size=(16, 16), warmup=1, fwd_repeats=2, train_repeats=2),
    "1024px": dict(image_px=256, size=(32, 32), warmup=0, fwd_repeats=2, train_repeats=1),
}
MIB = 2.0**20


# ----------------------------------------------------------------------------------------------- worker side
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build_case(shape: dict, size: tuple[int, int], n: int, method: str, seed: int = 0):
    """Everything one case needs: (block, attn, box encoder, inputs dict, instances)."""
    import torch
    from diffusers.models.attention_processor import Attention

    sys.path.insert(0, str(HERE))
    from adapter_baselines import make_block

    from roi_ops.roictrl_adapter import BoxEncoder, ROICtrlInstances

    B, C, heads = shape["batch"], shape["channels"], shape["heads"]
    L, D = shape["caption_length"], shape["caption_dim"]
    H, W = size
    torch.manual_seed(seed)
    attn = Attention(query_dim=C, cross_attention_dim=D, heads=heads, dim_head=C // heads).eval()
    attn.requires_grad_(False)  # the pretrained layer is frozen
    torch.manual_seed(seed + 1)  # the same adapter weights for every method
    block = make_block(method, C, heads, shape["position_dim"], shape["grid"], shape["ff_mult"])
    encoder = BoxEncoder(shape["position_dim"])
    with torch.no_grad():  # trained-looking weights: non-zero gates and blend projection, so no path is idle
        for p in (block.roi_gate, block.guide_attn_gate, block.guide_ff_gate):
            p.fill_(0.5)
        block.blend_proj.weight.normal_(0.0, C**-0.5)

    g = torch.Generator().manual_seed(seed + 2)
    lo, hi = shape["box_side"]
    side = lo + (hi - lo) * torch.rand(B, n, 2, generator=g)
    xy = (1 - side) * torch.rand(B, n, 2, generator=g)
    boxes = torch.cat([xy, xy + side], dim=-1)
    masks = torch.zeros(B, n, dtype=torch.bool)
    masks[1:] = True  # sample 0 is the unconditional half of the CFG batch
    instances = ROICtrlInstances(boxes, torch.randn(B, n, L, D, generator=g), masks=masks)
    inputs = {
        "hidden_states": torch.randn(B, H * W, C, generator=g),
        "residual": torch.randn(B, H * W, C, generator=g),
        "global_out": torch.randn(B, H * W, C, generator=g),
        "text": torch.randn(B, L, D, generator=g),
    }
    return block, attn, encoder, inputs, instances


def _worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    shape, size, n, method = spec["shape"], tuple(spec["size"]), spec["n"], spec["method"]
    import roi_ops

    if method == "fused" and not hasattr(roi_ops, "roi_unpool_blend"):
        raise RuntimeError("method 'fused' needs roi_ops.roi_unpool_blend, which this build lacks")
    block, attn, encoder, inputs, instances = build_case(shape, size, n, method)
    hidden, residual, global_out, text = (inputs[k] for k in ("hidden_states", "residual", "global_out", "text"))
    out_grad = torch.randn(global_out.shape, generator=torch.Generator().manual_seed(7))

    parts: dict[str, list[float]] = {"instance_path": [], "box_guidance": []}

    def timed(name, fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            parts[name].append(time.perf_counter() - t0)
            return result

        return call

    def step(h, r, g):
        pos = encoder(instances.instance_boxes)
        return block(h, r, g, attn, instances, size, pos, encoder_hidden_states=text)

    setup_maxrss = _maxrss_bytes()
    rss_before = _rss_bytes()

    # -- inference
    block.instance_path = timed("instance_path", block.instance_path)
    block.box_guidance = timed("box_guidance", block.box_guidance)
    fwd, fwd_cpu = [], []
    warmup = spec["warmup"]
    with torch.no_grad():
        for i in range(warmup + spec["fwd_repeats"]):
            if fwd and sum(fwd) > spec.get("repeat_budget_s", float("inf")):
                break  # one slow call is measurement enough (recorded: all_ms has fewer entries)
            c0, t0 = time.process_time(), time.perf_counter()
            out, stats = step(hidden, residual, global_out)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            del out, stats
            if i >= warmup:
                fwd.append(dt)
                fwd_cpu.append(dc)
    for name in parts:
        parts[name] = parts[name][warmup:]
    del block.instance_path, block.box_guidance  # back to the class methods
    fwd_maxrss = _maxrss_bytes()

    # -- training
    leaves = [t.clone().requires_grad_() for t in (hidden, residual, global_out)]
    params = list(block.parameters()) + list(encoder.parameters())
    train, train_cpu = [], []
    for _ in range(spec["train_repeats"]):
        for p in params + leaves:
            p.grad = None
        c0, t0 = time.process_time(), time.perf_counter()
        out, stats = step(*leaves)
        covered = stats["covered"]
        reg = (stats["base_weight"].float() * covered).sum() / covered.sum().clamp(min=1)
        loss = (out * out_grad).sum() + 0.01 * reg
        loss.backward()
        train.append(time.perf_counter() - t0)
        train_cpu.append(time.process_time() - c0)
        del out, stats, loss, reg, covered
    train_maxrss = _maxrss_bytes()
    grads_ok = all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in leaves)

    def summary(ts, cpu=None):
        out = {"median_ms": 1e3 * statistics.median(ts), "all_ms": [round(1e3 * t, 2) for t in ts]}
        if cpu:  # process CPU time of all threads: less sensitive than wall time to other processes' load
            out["cpu_median_ms"] = 1e3 * statistics.median(cpu)
        return out

    return {
        "status": "ok",
        "fwd": summary(fwd, fwd_cpu),
        "fwd_parts": {k: summary(v) for k, v in parts.items() if v},
        "fwd_bwd": summary(train, train_cpu),
        "inference_peak_mib": (fwd_maxrss - rss_before) / MIB,
        "training_peak_mib": (train_maxrss - rss_before) / MIB,
        "rss_before_mib": rss_before / MIB,
        "peak_saturated": {"inference": fwd_maxrss <= setup_maxrss, "training": train_maxrss <= fwd_maxrss},
        "input_grads_finite": grads_ok,
        "roi_ops_file": roi_ops.__file__,
        "instances": instances.num_instances,
    }


def _interleaved_worker(spec: dict) -> dict:
    """Forward times of every method in ONE process, calls alternating method by method, so that a change in
    the machine's load (shared with other jobs) hits all methods alike. Memory is not measured here."""
    import torch

    torch.set_num_threads(spec["threads"])
    shape, size, n = spec["shape"], tuple(spec["size"]), spec["n"]
    cases = {m: build_case(shape, size, n, m) for m in spec["methods"]}
    parts = {m: {"instance_path": [], "box_guidance": []} for m in cases}
    wall = {m: [] for m in cases}
    cpu = {m: [] for m in cases}
    for m, (block, *_rest) in cases.items():
        for name in ("instance_path", "box_guidance"):
            fn = getattr(block, name)

            def call(*args, _fn=fn, _m=m, _name=name, **kwargs):
                t0 = time.perf_counter()
                result = _fn(*args, **kwargs)
                parts[_m][_name].append(time.perf_counter() - t0)
                return result

            setattr(block, name, call)
    with torch.no_grad():
        for round_ in range(spec["warmup"] + spec["rounds"]):
            for m, (block, attn, encoder, inputs, instances) in cases.items():
                c0, t0 = time.process_time(), time.perf_counter()
                pos = encoder(instances.instance_boxes)
                out, _ = block(inputs["hidden_states"], inputs["residual"], inputs["global_out"], attn, instances,
                               size, pos, encoder_hidden_states=inputs["text"])
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                del out
                if round_ >= spec["warmup"]:
                    wall[m].append(dt)
                    cpu[m].append(dc)
    w = spec["warmup"]
    return {
        "status": "ok",
        "methods": {
            m: {
                "median_ms": 1e3 * statistics.median(wall[m]),
                "all_ms": [round(1e3 * t, 2) for t in wall[m]],
                "cpu_median_ms": 1e3 * statistics.median(cpu[m]),
                "parts_median_ms": {k: 1e3 * statistics.median(v[w:]) for k, v in parts[m].items()},
            }
            for m in cases
        },
    }


# ----------------------------------------------------------------------------------------------- driver side
def _estimate_gib(method: str, res: str, n: int, results: list[dict], shape: dict, size) -> tuple[float, str]:
    """Training memory estimate: 4x the measured 512 px peak at 1024 px, else a count of full-size maps."""
    if res == "1024px":
        for r in results:
            if (r["resolution"], r["method"], r["n"], r["status"]) == ("512px", method, n, "ok"):
                return 4 * r["training_peak_mib"] / 1024, "4 x the measured 512px training peak"
    B, C = shape["batch"], shape["channels"]
    feature_map = B * C * size[0] * size[1] * 4 / 2**30
    maps = {"fused": 30, "naive": 30 + 6 * (n + 1), "masked": 30 + 20 * (n + 1),
            "masked_xattn": 30 + 12 * (n + 1)}.get(method, 30)
    return maps * feature_map, f"about {maps} feature maps of [B, C, H, W] float32 live at once"


def _run_worker(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["subprocess_wall_s"] = round(wall, 1)
            return result
    tail = (proc.stderr or proc.stdout)[-600:]
    return {"status": "failed", "reason": f"worker exited with {proc.returncode}: {tail}"}


def environment() -> dict:
    sys.path.insert(0, str(HERE))
    import torch

    torch.set_num_threads(THREADS)
    from bench_ops import environment_info  # machine, versions, threads, load average

    import diffusers

    info = environment_info()
    info["versions"]["diffusers"] = diffusers.__version__
    return info


def run(args) -> None:
    quick = args.quick
    shape = dict(SHAPE, **(QUICK if quick else {}))
    resolutions = QUICK_RESOLUTIONS if quick else RESOLUTIONS
    methods = tuple(args.methods.split(","))
    counts = tuple(int(c) for c in args.counts.split(","))
    env = environment()
    started = time.perf_counter()
    results: list[dict] = []
    for res in args.resolutions.split(","):
        cfg = resolutions[res]
        for n in counts:
            for method in methods:  # interleaved, so a change in machine load hits every method alike
                spec = {"shape": shape, "size": list(cfg["size"]), "n": n, "method": method, "threads": THREADS,
                        "warmup": cfg["warmup"], "fwd_repeats": cfg["fwd_repeats"],
                        "train_repeats": cfg["train_repeats"],
                        "repeat_budget_s": cfg.get("repeat_budget_s", float("inf"))}
                row = {"resolution": res, "image_px": cfg["image_px"], "size": list(cfg["size"]), "n": n,
                       "method": method}
                est, how = _estimate_gib(method, res, n, results, shape, cfg["size"])
                row["estimated_training_gib"] = round(est, 2)
                if est > args.max_gib:
                    row.update(status="skipped", reason=f"estimated training memory {est:.1f} GiB ({how}) "
                                                        f"exceeds the {args.max_gib:g} GiB guard")
                else:
                    row["loadavg_before"] = [round(x, 2) for x in os.getloadavg()]
                    row.update(_run_worker(spec, args.timeout))
                results.append(row)
                print(_line(row), flush=True)
    env_after = [round(x, 2) for x in os.getloadavg()]
    doc = {
        "benchmark": "one ROICtrl adapter block (fused / naive / masked-attention), SD1.5 level-1 shapes, CPU",
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "quick": quick,
        **env,
        "loadavg_after": env_after,
        "total_wall_s": round(time.perf_counter() - started, 1),
        "shape": shape,
        "resolutions": {k: resolutions[k] for k in args.resolutions.split(",")},
        "methods": {
            "fused": "roi_ops.roictrl_adapter.ROICtrlBlock(fused_blend=True): ROI-Align, attention on the ROI "
                     "grids, roi_ops.roi_unpool_blend (never materialises [K, C, H, W])",
            "unfused": "ROICtrlBlock(fused_blend=False): the adapter's readable blend ([B, N, C, H, W])",
            "naive": "benchmarks/adapter_baselines.py NaiveROICtrlBlock: the official release's blend, "
                     "[B, N+1, C, H, W] stack, 1x1 projection on it, masked softmax, weighted sum",
            "masked": "benchmarks/adapter_baselines.py MaskedAttnROICtrlBlock: the same block with masks instead of "
                      "ROI grids: each instance's cross-attention on all H*W tokens, its ROI self-attention as a "
                      "self-attention over all H*W tokens with keys restricted to the box (N*(H*W)^2 scores), "
                      "outputs kept inside the box, blend over [B, N+1, H*W, C]",
            "masked_xattn": "MaskedAttnROICtrlBlock(masked_self_attention=False): the masked cross-attention and "
                            "blend only, without the ROI self-attention step: a lower bound of the masked "
                            "design's cost (it does less work than the adapter)",
        },
        "measurement": {
            "timing": "time.perf_counter around one block call (cpu_median_ms: time.process_time, all threads); "
                      "fwd: torch.no_grad, `warmup` untimed calls then the median of fwd_repeats calls; fwd_bwd: "
                      "forward + backward of <out, g> + 0.01 L_reg, median of train_repeats steps (after the "
                      "forward calls); fwd_parts: time inside instance_path (steps 1-4) and box_guidance "
                      "(step 5) of the timed forward calls",
            "memory": "RSS high-water (resource.getrusage(RUSAGE_SELF).ru_maxrss) of a fresh subprocess per "
                      "case, after the forward calls (inference_peak_mib) and after the training steps "
                      "(training_peak_mib), minus the RSS just before the first call (/proc/self/statm); "
                      "inputs and weights are not counted",
            "threads": THREADS,
            "max_gib_guard": args.max_gib,
        },
        "results": results,
        "summary": summarise(results, None),
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out} ({doc['total_wall_s']:.0f} s)")
    report(doc, Path(args.png), _doc_target(args))


def _doc_target(args) -> Path | None:
    """The docs table is written from the committed results only, not from a quick or elsewhere-saved run."""
    return DOC_PATH if Path(args.json).resolve() == JSON_PATH.resolve() and not args.quick else None


def run_interleaved(args) -> None:
    """Adds the interleaved forward timings to the results JSON (see _interleaved_worker), then the report."""
    path = Path(args.json)
    doc = json.loads(path.read_text())
    shape, resolutions = doc["shape"], doc["resolutions"]
    methods = [m for m in args.methods.split(",")]
    rows = []
    started = time.perf_counter()
    for res in args.resolutions.split(","):
        cfg = resolutions[res]
        for n in (int(c) for c in args.counts.split(",")):
            # No warm-up round at 1024 px, where one round of the masked method alone takes up to minutes.
            warmup = cfg.get("warmup", 1)
            spec = {"mode": "interleaved", "shape": shape, "size": cfg["size"], "n": n, "methods": methods,
                    "threads": THREADS, "warmup": warmup, "rounds": args.rounds or (3 if res == "1024px" else 5)}
            row = {"resolution": res, "n": n, "rounds": spec["rounds"], "warmup": warmup,
                   "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
            row.update(_run_worker(spec, args.timeout))
            rows.append(row)
            if row["status"] == "ok":
                print(f"{res:>6} N={n:<3} " + "  ".join(
                    f"{m} {v['median_ms']:8.0f} ms (instance path {v['parts_median_ms']['instance_path']:7.0f})"
                    for m, v in row["methods"].items()), flush=True)
            else:
                print(f"{res:>6} N={n:<3} {row['status']}: {row.get('reason')}", flush=True)
    # Rows of an earlier interleaved pass for other (resolution, N) are kept: a pass can redo a few cases.
    done = {(r["resolution"], r["n"]) for r in rows}
    kept = [r for r in doc.get("interleaved_fwd", {}).get("results", []) if (r["resolution"], r["n"]) not in done]
    for r in rows:
        r["measured_at"] = _dt.datetime.now().isoformat(timespec="seconds")
    order = {res: i for i, res in enumerate(resolutions)}
    doc["interleaved_fwd"] = {
        "what": "forward (torch.no_grad) of every method in one process per (resolution, N), calls alternating "
                "method by method for `rounds` rounds after `warmup` rounds; medians. Less exposed to the "
                "shared machine's changing load than the per-case subprocess timings; no memory measured",
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.perf_counter() - started, 1),
        "results": sorted(kept + rows, key=lambda r: (order.get(r["resolution"], 99), r["n"])),
    }
    doc["summary"] = summarise(doc["results"], doc["interleaved_fwd"])
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")
    report(doc, Path(args.png), _doc_target(args))


def _line(r: dict) -> str:
    head = f"{r['resolution']:>6} N={r['n']:<3} {r['method']:<12}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason', '')}"
    return (f"{head} fwd {r['fwd']['median_ms']:9.1f} ms  fwd+bwd {r['fwd_bwd']['median_ms']:9.1f} ms  "
            f"peak inf {r['inference_peak_mib']:8.1f} MiB  train {r['training_peak_mib']:8.1f} MiB")


def _get(results, res, method, n):
    for r in results:
        if (r["resolution"], r["method"], r["n"]) == (res, method, n) and r["status"] == "ok":
            return r
    return None


def _interleaved(interleaved: dict | None, res: str, n: int) -> dict | None:
    for row in (interleaved or {}).get("results", []):
        if (row["resolution"], row["n"], row["status"]) == (res, n, "ok"):
            return row["methods"]
    return None


def summarise(results: list[dict], interleaved: dict | None = None) -> dict:
    """The issue's bar at 1024 px / 25 instances, and each method's growth from the smallest to the largest N."""
    out: dict = {}
    f, nv = (_get(results, "1024px", k, 25) for k in ("fused", "naive"))
    bar: dict = {}
    if f and nv:
        ratio = f["training_peak_mib"] / nv["training_peak_mib"]
        bar["training_peak_fused_over_naive"] = round(ratio, 4)
        bar["training_peak_at_most_quarter_of_naive"] = ratio <= 0.25
    il = _interleaved(interleaved, "1024px", 25)
    # "masked" is the baseline of the bar; "masked_xattn" (no ROI self-attention) is its lower bound.
    for name in ("masked", "masked_xattn"):
        m = _get(results, "1024px", name, 25)
        if f and m:
            speed = m["fwd"]["median_ms"] / f["fwd"]["median_ms"]
            bar[f"fwd_speedup_fused_vs_{name}"] = round(speed, 3)
            bar[f"fwd_at_least_2.4x_faster_than_{name}"] = speed >= 2.4
            bar[f"fwd_cpu_time_ratio_{name}_over_fused"] = round(
                m["fwd"]["cpu_median_ms"] / f["fwd"]["cpu_median_ms"], 3)
            fi, mi = f["fwd_parts"].get("instance_path"), m["fwd_parts"].get("instance_path")
            if fi and mi:
                bar[f"instance_path_fwd_speedup_fused_vs_{name}"] = round(mi["median_ms"] / fi["median_ms"], 3)
        if il and "fused" in il and name in il:
            # The alternating-call measurement is the one to trust for speed on a shared machine.
            speed = il[name]["median_ms"] / il["fused"]["median_ms"]
            bar[f"interleaved_fwd_speedup_fused_vs_{name}"] = round(speed, 3)
            bar[f"interleaved_fwd_at_least_2.4x_faster_than_{name}"] = speed >= 2.4
            bar[f"interleaved_fwd_cpu_time_ratio_{name}_over_fused"] = round(
                il[name]["cpu_median_ms"] / il["fused"]["cpu_median_ms"], 3)
            bar[f"interleaved_instance_path_speedup_fused_vs_{name}"] = round(
                il[name]["parts_median_ms"]["instance_path"] / il["fused"]["parts_median_ms"]["instance_path"], 3)
    if il and "fused" in il:
        bar["interleaved_box_guidance_share_of_fused_fwd"] = round(
            il["fused"]["parts_median_ms"]["box_guidance"] / il["fused"]["median_ms"], 3)
    out["1024px_N25"] = bar
    growth: dict = {}
    for res in sorted({r["resolution"] for r in results}):
        for method in sorted({r["method"] for r in results}):
            rows = sorted((r for r in results if (r["resolution"], r["method"], r["status"]) == (res, method, "ok")),
                          key=lambda r: r["n"])
            if len(rows) >= 2:
                a, b = rows[0], rows[-1]
                growth[f"{res}/{method}"] = {
                    "from_n": a["n"], "to_n": b["n"],
                    "fwd_ratio": round(b["fwd"]["median_ms"] / a["fwd"]["median_ms"], 3),
                    "fwd_bwd_ratio": round(b["fwd_bwd"]["median_ms"] / a["fwd_bwd"]["median_ms"], 3),
                    "training_peak_ratio": round(b["training_peak_mib"] / max(a["training_peak_mib"], 1e-9), 3),
                    "training_peak_mib_per_instance": round(
                        (b["training_peak_mib"] - a["training_peak_mib"]) / (b["n"] - a["n"]), 2),
                }
                ia, ib = _interleaved(interleaved, res, a["n"]), _interleaved(interleaved, res, b["n"])
                if ia and ib and method in ia and method in ib:
                    growth[f"{res}/{method}"]["interleaved_fwd_ratio"] = round(
                        ib[method]["median_ms"] / ia[method]["median_ms"], 3)
                    growth[f"{res}/{method}"]["interleaved_instance_path_ms"] = [
                        round(ia[method]["parts_median_ms"]["instance_path"]),
                        round(ib[method]["parts_median_ms"]["instance_path"])]
    out["growth_smallest_to_largest_n"] = growth
    return out


# ----------------------------------------------------------------------------------------------- report
COLOURS = {"fused": "tab:green", "unfused": "tab:olive", "naive": "tab:red", "masked": "tab:blue",
           "masked_xattn": "tab:cyan"}


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    resolutions = list(doc["resolutions"])
    inter = doc.get("interleaved_fwd")
    rows = [("fwd", "inference time (s)" + (", interleaved" if inter else "")),
            ("fwd_bwd", "training step time (s), per case"),
            ("training_peak_mib", "training peak memory (GiB)"), ("inference_peak_mib", "inference peak memory (GiB)")]
    fig, axes = plt.subplots(len(rows), len(resolutions), figsize=(5.2 * len(resolutions), 3.1 * len(rows)),
                             squeeze=False, sharex=True)
    methods = [m for m in ("fused", "unfused", "naive", "masked", "masked_xattn") if any(r["method"] == m for r in results)]
    for j, res in enumerate(resolutions):
        for i, (key, label) in enumerate(rows):
            ax = axes[i][j]
            for method in methods:
                pts = sorted((r["n"], r) for r in results
                             if r["resolution"] == res and r["method"] == method and r["status"] == "ok")
                if not pts:
                    continue
                xs = [n for n, _ in pts]
                if key == "fwd" and inter:
                    il = [(n, _interleaved(inter, res, n)) for n in xs]
                    il = [(n, v[method]) for n, v in il if v and method in v]
                    xs, ys = [n for n, _ in il], [v["median_ms"] / 1e3 for _, v in il]
                    ax.plot(xs, [v["parts_median_ms"]["instance_path"] / 1e3 for _, v in il], "x--",
                            color=COLOURS.get(method), lw=1, alpha=0.7)
                elif key.endswith("_mib"):
                    ys = [r[key] / 1024 for _, r in pts]
                else:
                    ys = [r[key]["median_ms"] / 1e3 for _, r in pts]
                if not xs:
                    continue
                ax.plot(xs, ys, "o-", color=COLOURS.get(method), label=method)
                skipped = [r["n"] for r in results if r["resolution"] == res and r["method"] == method
                           and r["status"] != "ok"]
                for n in skipped:
                    ax.axvline(n, color=COLOURS.get(method), ls=":", lw=1)
            if key.endswith("_mib"):
                ax.set_ylim(bottom=0)  # linear from 0: a flat line reads as flat
            else:
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0:
                size = doc["resolutions"][res]["size"]
                ax.set_title(f"{res} ({size[0]}x{size[1]} level-1 map)")
            if i == len(rows) - 1:
                ax.set_xlabel("instances N")
            if j == 0:
                ax.set_ylabel(label)
            ax.set_xticks(sorted({r["n"] for r in results}))
    axes[0][0].legend(loc="best", fontsize=8)
    fig.suptitle(f"One ROICtrl block, SD1.5 level 1, B=2 (CFG), CPU {doc['threads']} threads"
                 + ("  [quick shapes]" if doc.get("quick") else "")
                 + "\n(dotted vertical: case skipped, see JSON"
                 + ("; dashed x: instance path (steps 1-4) alone" if inter else "") + ")",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(doc: dict) -> str:
    """Markdown tables from the JSON: one per resolution, one row per N."""
    results = doc["results"]
    methods = [m for m in ("fused", "unfused", "naive", "masked", "masked_xattn") if any(r["method"] == m for r in results)]
    lines = [f"Measured {doc['created']} on {doc['machine']['cpu_model']} ({doc['threads']} threads, load average "
             f"{doc['env']['loadavg_1_5_15min']} before, {doc['loadavg_after']} after), torch "
             f"{doc['versions']['torch']}, from `benchmarks/results/{JSON_PATH.name}`. Times are medians in ms; "
             "memory is the peak above the RSS before the first call, in MiB.", ""]
    for res, cfg in doc["resolutions"].items():
        lines.append(f"**{res}** (level-1 map {cfg['size'][0]}x{cfg['size'][1]}, B=2 CFG batch, N instances in "
                     "the conditional half)")
        lines.append("")
        head = ["N"] + [f"{kind} {m}" for kind in ("fwd", "fwd+bwd", "train peak") for m in methods]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---:|" * len(head))
        for n in sorted({r["n"] for r in results if r["resolution"] == res}):
            cells = [str(n)]
            for kind in ("fwd", "fwd_bwd", "training_peak_mib"):
                for m in methods:
                    r = next((r for r in results if (r["resolution"], r["method"], r["n"]) == (res, m, n)), None)
                    if r is None:
                        cells.append("")
                    elif r["status"] != "ok":
                        cells.append(r["status"])
                    elif kind.endswith("_mib"):
                        cells.append(f"{r[kind]:.0f}")
                    else:
                        cells.append(f"{r[kind]['median_ms']:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    inter = doc.get("interleaved_fwd")
    if inter:
        lines.append(f"**Inference, interleaved** ({inter['created']}, load average after {inter['loadavg_after']}): "
                     "the forward of every method in one process, calls alternating, median ms; in brackets the "
                     "instance path (steps 1-4) alone; `guidance` is the fused block's box guidance (step 5), "
                     "the same computation in every method.")
        lines.append("")
        for res in doc["resolutions"]:
            rows = [r for r in inter["results"] if r["resolution"] == res]
            if not rows:
                continue
            present = [m for m in methods if any(r["status"] == "ok" and m in r["methods"] for r in rows)]
            head = ["N"] + present + ["guidance"] + [f"{m} / fused" for m in present if m != "fused"]
            lines.append(f"{res}:")
            lines.append("")
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---:|" * len(head))
            for r in rows:
                if r["status"] != "ok":
                    lines.append(f"| {r['n']} | {r['status']} |")
                    continue
                v = r["methods"]
                cells = [str(r["n"])]
                cells += [f"{v[m]['median_ms']:.0f} ({v[m]['parts_median_ms']['instance_path']:.0f})" for m in present]
                cells.append(f"{v['fused']['parts_median_ms']['box_guidance']:.0f}" if "fused" in v else "")
                cells += [f"{v[m]['median_ms'] / v['fused']['median_ms']:.2f}x" for m in present if m != "fused"]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    skipped = [r for r in results if r["status"] != "ok"]
    for r in skipped:
        lines.append(f"- {r['resolution']} N={r['n']} {r['method']}: {r['status']}, {r.get('reason', '')}")
    if skipped:
        lines.append("")
    bar = doc["summary"].get("1024px_N25", {})
    if bar:
        lines.append("At 1024 px with 25 instances: " + ", ".join(f"`{k}` = {v}" for k, v in bar.items()) + ".")
        lines.append("")
    return "\n".join(lines)


def report(doc: dict, png: Path, doc_path: Path | None) -> None:
    plot(doc, png)
    print(f"wrote {png}")
    if doc_path is None:
        return
    text = doc_path.read_text() if doc_path.exists() else ""
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise SystemExit(f"{doc_path} has no {TABLE_BEGIN!r} ... {TABLE_END!r} markers to write the table between")
    before, rest = text.split(TABLE_BEGIN, 1)
    _, after = rest.split(TABLE_END, 1)
    doc_path.write_text(before + TABLE_BEGIN + "\n" + table(doc) + "\n" + TABLE_END + after)
    print(f"wrote the table in {doc_path}")


def profile(args) -> None:
    """torch.profiler's top operators (self CPU time) of one forward of each method, for one case."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    torch.set_num_threads(THREADS)
    res, n = args.profile.split(":")
    n = int(n)
    shape = dict(SHAPE, **(QUICK if args.quick else {}))
    size = (QUICK_RESOLUTIONS if args.quick else RESOLUTIONS)[res]["size"]
    for method in args.methods.split(","):
        block, attn, encoder, inputs, instances = build_case(shape, size, n, method)
        h, r, g, text = (inputs[k] for k in ("hidden_states", "residual", "global_out", "text"))
        with torch.no_grad():
            pos = encoder(instances.instance_boxes)
            block(h, r, g, attn, instances, size, pos, encoder_hidden_states=text)  # warm-up
            with tprofile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                block(h, r, g, attn, instances, size, pos, encoder_hidden_states=text)
        print(f"==== {res} N={n} {method}: forward, torch.no_grad, {THREADS} threads")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        del block, attn, encoder, inputs, instances


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run); files in the temp dir")
    ap.add_argument("--report", action="store_true", help="only redo the plot and docs table from --json")
    ap.add_argument("--interleaved", action="store_true",
                    help="add forward timings with the methods' calls alternating in one process to --json")
    ap.add_argument("--rounds", type=int, default=0, help="rounds of --interleaved (default 3 at 1024 px, 5 at 512)")
    ap.add_argument("--profile", metavar="RES:N", help="print torch.profiler tables for one case, e.g. 1024px:25")
    ap.add_argument("--rows", type=int, default=20, help="rows of each --profile table")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--counts", default=",".join(map(str, COUNTS)))
    ap.add_argument("--resolutions", default="512px,1024px")
    ap.add_argument("--max-gib", type=float, default=16.0, help="skip cases estimated above this (GiB)")
    ap.add_argument("--timeout", type=float, default=2400.0, help="seconds per case before it counts as failed")
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    args = ap.parse_args(argv)
    if args.worker:
        try:
            spec = json.loads(args.worker)
            result = _interleaved_worker(spec) if spec.get("mode") == "interleaved" else _worker(spec)
        except Exception as exc:  # reported in the JSON as the case's failure
            result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        print("RESULT " + json.dumps(result), flush=True)
        return
    # A quick run is a smoke test: its files go to the temp dir, never over the committed results.
    where = Path(tempfile.gettempdir()) if args.quick else RESULTS
    suffix = "_quick" if args.quick else ""
    args.json = args.json or str(where / f"adapter_cpu{suffix}.json")
    args.png = args.png or str(where / f"adapter_cpu{suffix}.png")
    if args.profile:
        profile(args)
    elif args.interleaved:
        run_interleaved(args)
    elif args.report:
        doc = json.loads(Path(args.json).read_text())
        doc["summary"] = summarise(doc["results"], doc.get("interleaved_fwd"))
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        report(doc, Path(args.png), None if doc.get("quick") else _doc_target(args))
    else:
        run(args)


if __name__ == "__main__":
    main()
