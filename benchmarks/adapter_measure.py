"""Measure: one ROICtrl adapter block per case, each in a FRESH subprocess (the first step of bench_adapter.py).

What is measured, per (resolution, N instances, method):

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

:func:`measure_cases` and :func:`measure_interleaved` return the results (a JSON-ready dict); they summarise
nothing (``adapter_report.py``) and write nothing (``adapter_publish.py``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
#: the command line whose ``--worker`` mode runs one case (:func:`worker_main`)
CLI = HERE / "bench_adapter.py"

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



def worker_main(spec_json: str) -> None:
    """The ``--worker`` mode: run one case (or one interleaved pass) and print its result as one JSON line."""
    try:
        spec = json.loads(spec_json)
        result = _interleaved_worker(spec) if spec.get("mode") == "interleaved" else _worker(spec)
    except Exception as exc:  # reported in the JSON as the case's failure
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    print("RESULT " + json.dumps(result), flush=True)


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
    cmd = [sys.executable, str(CLI), "--worker", json.dumps(spec)]
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


def measure_cases(args) -> dict:
    """Every (resolution, N, method) case of ``args``, one subprocess each: the results document without its
    summary (progress printed as the cases finish)."""
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
                print(progress_line(row), flush=True)
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
            "unfused": "ROICtrlBlock(fused_blend=False): the adapter's readable blend ([K, C, H, W])",
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
    }
    return doc


def measure_interleaved(args, doc: dict) -> dict:
    """The interleaved forward timings (see _interleaved_worker) of ``args``'s cases, merged with the rows of an
    earlier pass in ``doc`` for other (resolution, N): the document's new ``interleaved_fwd`` entry."""
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
    return {
        "what": "forward (torch.no_grad) of every method in one process per (resolution, N), calls alternating "
                "method by method for `rounds` rounds after `warmup` rounds; medians. Less exposed to the "
                "shared machine's changing load than the per-case subprocess timings; no memory measured",
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.perf_counter() - started, 1),
        "results": sorted(kept + rows, key=lambda r: (order.get(r["resolution"], 99), r["n"])),
    }


def progress_line(r: dict) -> str:
    head = f"{r['resolution']:>6} N={r['n']:<3} {r['method']:<12}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r.get('reason', '')}"
    return (f"{head} fwd {r['fwd']['median_ms']:9.1f} ms  fwd+bwd {r['fwd_bwd']['median_ms']:9.1f} ms  "
            f"peak inf {r['inference_peak_mib']:8.1f} MiB  train {r['training_peak_mib']:8.1f} MiB")


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

