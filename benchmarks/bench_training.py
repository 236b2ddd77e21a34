"""Cost of one ROICtrl adapter training step on CPU, against the plain UNet's forward + backward (issue 23).

    python benchmarks/bench_training.py                 # SD1.5-shaped UNet, 512 px, batch 1, 10 instances:
                                                       #   benchmarks/results/training_cpu.json (~30-60 min
                                                       #   on 2 shared cores)
    python benchmarks/bench_training.py --quick         # tiny models, 2 steps, all in one worker process:
                                                       #   checks it all runs (JSON in the temp dir)
    python benchmarks/bench_training.py --report --docs # the markdown table from the JSON (--docs: into
                                                       #   docs/training.md, between its markers)

Models are built from configs with random weights (nothing is downloaded): SD1.5's UNet
(``UNet2DConditionModel``, block_out_channels 320/640/1280/1280, cross_attention_dim 768, attention_head_dim 8,
layers_per_block 2), SD1.5's VAE (``AutoencoderKL``, 128/256/512/512) and SD1.5's text encoder (CLIP ViT-L/14
text config: 12 layers, width 768, 77 tokens). Random weights cost the same time and memory as trained ones.

Configurations, each in a FRESH subprocess (so that one configuration's allocations never hide another's peak):

* ``plain``: the frozen UNet alone, forward + backward of the MSE loss into the noisy latents (the same
  backward through every UNet layer that adapter training needs, with no weight gradients): the baseline.
* ``adapter_cached``: the adapter installed, UNet frozen; given precomputed latents, prompt embedding and the
  10 instance-caption embeddings: forward, ``loss = MSE + 0.01 * adapter.regularization_loss()``, backward,
  ``AdamW.step()`` on the adapter's parameters.
* ``adapter_uncached``: the same step, plus, inside the timed step and under ``torch.no_grad()``, the text
  encoder on the prompt + 10 captions (11 x 77 tokens, one batch; random token ids: the tokenizer itself is
  microseconds and needs vocabulary files) and the VAE encoding of a 512 px image.

each with and without ``unet.enable_gradient_checkpointing()``. The adapter's optimizer is the trainer's (AdamW's
fused kernel), and every configuration's process keeps freed host memory as ``roi-ops train`` does on the CPU
(``roi_ops.training.host_memory``; ``--host-memory release`` for glibc's defaults, which unmap and page-fault the
step's memory in again every step). Per step we count the forward calls of the UNet's
``BasicTransformerBlock``s and of the adapter's ``ROICtrlBlock``s: with checkpointing both run twice (the
backward recomputes them), which shows that checkpointing applies with the adapter installed and that the
adapter's blocks are inside the checkpointed regions (their activations are recomputed, not stored).

Memory: the Linux peak resident set size (``VmHWM`` in ``/proc/self/status``), reset to the current RSS by
writing ``5`` to ``/proc/self/clear_refs`` just before each step and read right after it. RSS counts every byte
torch's CPU allocator takes from the OS (weights, activations, gradients, optimizer state, oneDNN/BLAS
workspaces), which ``tracemalloc`` (Python objects only) does not see; a fresh process per configuration keeps
the peaks independent. ``peak_mib`` is the whole process (weights included: comparable to a GPU's peak memory);
``above_setup_mib`` is the peak minus the RSS once the models and inputs were built, before the first step:
what training adds to the weights (activations, gradients, optimizer state, workspaces). (The peak minus the
RSS at the step's own start, ``step_extra_mib``, is also recorded, but after the first step it is small because
the C allocator keeps freed memory mapped, so the RSS no longer drops between steps.) Where
``clear_refs`` cannot be written, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (never reset) is used and the
JSON says so.
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
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
JSON_PATH = RESULTS / "training_cpu.json"
DOC_PATH = REPO / "docs" / "training.md"
TABLE_BEGIN, TABLE_END = "<!-- training-cost:begin (bench_training.py --report --docs writes this) -->", \
    "<!-- training-cost:end -->"
THREADS = int(os.environ.get("ROI_OPS_BENCH_THREADS", "2"))
MIB = 2.0**20

MODES = ("plain", "adapter_cached", "adapter_uncached")
CHECKPOINTING = (False, True)

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)
# CLIP ViT-L/14's text tower, as in SD1.5's text_encoder/config.json.
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
FULL = dict(unet=SD15_UNET, vae=SD15_VAE, text=SD15_TEXT, image_px=512, tokens=77, vae_factor=8, grid_sizes=None,
            instances=10, batch=1, warmup=2, repeats=3)
QUICK = dict(
    unet=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
              norm_num_groups=8),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             norm_num_groups=4, sample_size=64, scaling_factor=0.18215),
    text=dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=16, projection_dim=32),
    image_px=64, tokens=16, vae_factor=8, grid_sizes={8: 5, 16: 3}, instances=10, batch=1, warmup=1, repeats=1,
)


# ----------------------------------------------------------------------------------------------- worker side
_CLEAR_REFS_OK: bool | None = None


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def _reset_peak() -> None:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); remembers whether that worked."""
    global _CLEAR_REFS_OK
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _CLEAR_REFS_OK = True
    except OSError:
        _CLEAR_REFS_OK = False


def _peak_bytes() -> int:
    if _CLEAR_REFS_OK:
        return _status_kib("VmHWM") * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def _boxes(n: int, seed: int):
    """``n`` boxes, sides 10-40 % of the image, anywhere inside it (seeded), normalised xyxy."""
    import torch

    g = torch.Generator().manual_seed(seed)
    side = 0.1 + 0.3 * torch.rand(1, n, 2, generator=g)
    xy = (1 - side) * torch.rand(1, n, 2, generator=g)
    return torch.cat([xy, xy + side], dim=-1)


def _worker(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.models.attention import BasicTransformerBlock

    torch.set_num_threads(spec["threads"])
    retained = False
    if spec.get("host_memory", "retain") == "retain":  # as roi-ops train does on the CPU, for every mode
        from roi_ops.training.host_memory import retain_freed_host_memory

        retained = retain_freed_host_memory()
    cfg, mode, ckpt = spec["cfg"], spec["mode"], spec["checkpointing"]
    B, N, L = cfg["batch"], cfg["instances"], cfg["tokens"]
    latent = cfg["image_px"] // cfg["vae_factor"]

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg["unet"]).requires_grad_(False)
    unet.train()  # diffusers' checkpointing also looks at self.training in some versions
    if ckpt:
        unet.enable_gradient_checkpointing()
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    text_dim = cfg["unet"]["cross_attention_dim"]

    adapter = optimizer = None
    if mode != "plain":
        from roi_ops.roictrl_adapter import ROICtrlAdapter

        kw = {} if cfg["grid_sizes"] is None else {"grid_sizes": {int(k): v for k, v in cfg["grid_sizes"].items()}}
        adapter = ROICtrlAdapter.from_unet(unet, vae_scale_factor=cfg["vae_factor"], **kw).install(unet)
        adapter.train()
        from roi_ops.training.trainer import _use_fused_adamw

        params = list(adapter.parameters())  # the trainer's AdamW: fused where torch has it
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True if _use_fused_adamw(params, None) else None)

    text_encoder = vae = None
    g = torch.Generator().manual_seed(1)
    if mode == "adapter_uncached":
        from transformers import CLIPTextConfig, CLIPTextModel

        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text"])).eval().requires_grad_(False)
        vae = AutoencoderKL(**cfg["vae"]).eval().requires_grad_(False)
        token_ids = torch.randint(0, cfg["text"]["vocab_size"], (B * (1 + N), L), generator=g)
        image = torch.rand(B, 3, cfg["image_px"], cfg["image_px"], generator=g) * 2 - 1
    cached = {  # what --cache-embeddings would hand the step
        "latents": torch.randn(B, 4, latent, latent, generator=g),
        "prompt": torch.randn(B, L, text_dim, generator=g),
        "captions": torch.randn(B, N, L, text_dim, generator=g),
    }
    boxes = _boxes(N, seed=2).repeat(B, 1, 1)

    counts = {"unet_transformer_blocks": 0, "adapter_blocks": 0}

    def counter(key):
        def hook(*_):
            counts[key] += 1
        return hook

    for m in unet.modules():
        if isinstance(m, BasicTransformerBlock):
            m.register_forward_pre_hook(counter("unet_transformer_blocks"))
    if adapter is not None:
        for blk in adapter.blocks:
            blk.register_forward_pre_hook(counter("adapter_blocks"))

    def step(i: int) -> dict:
        t0 = time.perf_counter()
        if mode == "adapter_uncached":
            with torch.no_grad():
                emb = text_encoder(token_ids)[0].view(B, 1 + N, L, -1)
                prompt, captions = emb[:, 0], emb[:, 1:]
                latents = vae.encode(image).latent_dist.sample(generator=torch.Generator().manual_seed(i))
                latents = latents * vae.config.scaling_factor
        else:
            prompt, captions, latents = cached["prompt"], cached["captions"], cached["latents"]
        t_enc = time.perf_counter()
        gen = torch.Generator().manual_seed(100 + i)
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, 1000, (B,), generator=gen)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if adapter is None:
            noisy.requires_grad_(True)  # backward through every layer, as adapter training needs
            pred = unet(noisy, timesteps, prompt).sample
            loss = F.mse_loss(pred, noise)
        else:
            roictrl = {"boxes": boxes, "embeddings": captions}
            pred = unet(noisy, timesteps, prompt, cross_attention_kwargs={"roictrl": roictrl}).sample
            reg = adapter.regularization_loss()
            loss = F.mse_loss(pred, noise) + 0.01 * reg
        t_fwd = time.perf_counter()
        loss.backward()
        t_bwd = time.perf_counter()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t_end = time.perf_counter()
        return {"step_s": t_end - t0, "encode_s": t_enc - t0, "forward_s": t_fwd - t_enc,
                "backward_s": t_bwd - t_fwd, "optimizer_s": t_end - t_bwd, "loss": float(loss)}

    import gc

    initial = [p.detach().clone() for p in adapter.parameters()] if adapter is not None else []
    rows = []
    rss_setup = _rss_bytes()
    for i in range(spec["warmup"] + spec["repeats"]):
        gc.collect()
        counts.update(unet_transformer_blocks=0, adapter_blocks=0)
        _reset_peak()
        rss0 = _rss_bytes()
        c0 = time.process_time()
        row = step(i)
        row["cpu_s"] = time.process_time() - c0
        peak = _peak_bytes()
        row.update(peak_mib=peak / MIB, step_extra_mib=(peak - rss0) / MIB, rss_before_mib=rss0 / MIB,
                   warmup=i < spec["warmup"], calls=dict(counts))
        rows.append(row)
        print(f"  step {i}: {row['step_s']:.2f} s, peak {row['peak_mib']:.0f} MiB", file=sys.stderr, flush=True)

    changed = None
    if adapter is not None:  # the optimizer really trained the adapter (zero-initialised gates included)
        changed = sum(not torch.equal(a, b.detach()) for a, b in zip(initial, adapter.parameters()))
    return {
        "status": "ok",
        "host_memory_retained": retained,
        "steps": rows,
        "rss_after_setup_mib": rss_setup / MIB,
        "peak_method": "VmHWM after clear_refs=5" if _CLEAR_REFS_OK else "ru_maxrss (not reset between steps)",
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "adapter_parameters": None if adapter is None else sum(p.numel() for p in adapter.parameters()),
        "adapter_blocks": None if adapter is None else len(adapter.blocks),
        "gradient_checkpointing_flag": bool(getattr(unet, "is_gradient_checkpointing", ckpt)),
        "adapter_tensors_changed": changed,
        "adapter_tensors": None if adapter is None else len(initial),
        "unet_got_gradients": any(p.grad is not None for p in unet.parameters()),
    }


# ----------------------------------------------------------------------------------------------- driver side
def _run_worker(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            if isinstance(result, dict):
                result["subprocess_wall_s"] = round(time.perf_counter() - t0, 1)
            return result
    return {"status": "failed", "reason": f"worker exited with {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}"}


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "all": [round(v, 4) for v in values]}


def _config_name(mode: str, ckpt: bool) -> str:
    return f"{mode}{'+ckpt' if ckpt else ''}"


def summarise_row(result: dict) -> dict:
    """Median and spread over the timed (non-warm-up) steps of one configuration's worker result."""
    timed = [s for s in result["steps"] if not s["warmup"]]
    out = {key: _summary([s[key] for s in timed])
           for key in ("step_s", "encode_s", "forward_s", "backward_s", "optimizer_s", "cpu_s", "peak_mib",
                       "step_extra_mib")}
    out["above_setup_mib"] = _summary([s["peak_mib"] - result["rss_after_setup_mib"] for s in timed])
    out["calls_per_step"] = timed[-1]["calls"]
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b > 0 else None  # a tiny model's step can add no measurable RSS


def _ratio_set(row: dict, base: dict) -> dict:
    return {key: _ratio(row["stats"][stat]["median"], base["stats"][stat]["median"])
            for key, stat in (("step_time", "step_s"), ("peak_memory", "peak_mib"),
                              ("above_setup_memory", "above_setup_mib"))}


def ratios(configs: dict) -> dict:
    """Each configuration's median step time and median peak over the plain UNet's in the same run (and same
    checkpointing setting), computed from the rows of ``configs`` only."""
    out = {}
    for name, row in configs.items():
        if row["status"] != "ok" or row["mode"] == "plain":
            continue
        base = configs.get(_config_name("plain", row["checkpointing"]))
        if not base or base["status"] != "ok":
            continue
        out[name] = {"over": base["name"], **_ratio_set(row, base)}
    for mode in MODES:  # what checkpointing buys, per mode
        a, b = configs.get(_config_name(mode, False)), configs.get(_config_name(mode, True))
        if a and b and a["status"] == b["status"] == "ok":
            out[f"{mode}: ckpt over no ckpt"] = {"over": a["name"], **_ratio_set(b, a)}
    return out


def environment() -> dict:
    from importlib.metadata import version  # no torch import in the driver: the workers report torch's own

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    return {
        "machine": {"cpu_model": cpu, "logical_cpus": os.cpu_count(), "memory_gib": round(mem_gib, 1) if mem_gib else None,
                    "platform": platform.platform(), "python": platform.python_version()},
        "versions": {name: version(name) for name in ("torch", "diffusers", "transformers")},
        "threads": THREADS,
    }


def run(args) -> dict:
    cfg = dict(QUICK if args.quick else FULL)
    if args.repeats is not None:
        cfg["repeats"] = args.repeats
    if args.warmup is not None:
        cfg["warmup"] = args.warmup
    modes = args.modes.split(",")
    env = environment()
    env["started_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    load_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    configs: dict = {}
    settings = {"off": (False,), "on": (True,), "both": CHECKPOINTING}[args.checkpointing]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"bench_training.py: error: --modes {unknown} unknown; expected some of {list(MODES)}")
    one_process = args.one_process or args.quick
    planned = []
    for ckpt in settings:
        for mode in modes:  # the plain baseline next to the adapter runs, in the same run
            spec = {"cfg": cfg, "mode": mode, "checkpointing": ckpt, "threads": THREADS,
                    "warmup": cfg["warmup"], "repeats": cfg["repeats"], "host_memory": args.host_memory}
            planned.append(({"name": _config_name(mode, ckpt), "mode": mode, "checkpointing": ckpt}, spec))

    def finish(row: dict, result: dict) -> None:
        row.update(result)
        row["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        name = row["name"]
        if row["status"] == "ok":
            row["stats"] = summarise_row(row)
            s = row["stats"]
            print(f"{name:>24}: step {s['step_s']['median']:.2f} s (min {s['step_s']['min']:.2f}, max "
                  f"{s['step_s']['max']:.2f}), peak {s['peak_mib']['median']:.0f} MiB, calls "
                  f"{s['calls_per_step']}, load {row['loadavg_after']}", flush=True)
        else:
            print(f"{name:>24}: {row['status']}: {row['reason']}", flush=True)
        configs[name] = row
        if not one_process:
            _write(args, cfg, env, load_before, started, configs, planned, one_process, complete=False)

    if one_process:
        load = [round(x, 2) for x in os.getloadavg()]
        results = _run_worker({"group": [spec for _, spec in planned], "threads": THREADS},
                              args.timeout * len(planned))
        if not isinstance(results, list):  # the whole process failed: every configuration with it
            results = [results] * len(planned)
        for (row, _), result in zip(planned, results):
            finish({**row, "loadavg_before": load, "process": "shared (--one-process)"}, result)
    else:
        for row, spec in planned:
            print(f"{row['name']} ...", flush=True)
            row = {**row, "loadavg_before": [round(x, 2) for x in os.getloadavg()], "process": "fresh"}
            finish(row, _run_worker(spec, args.timeout))
    return _write(args, cfg, env, load_before, started, configs, planned, one_process, complete=True)


def _write(args, cfg, env, load_before, started, configs, planned, one_process, complete) -> dict:
    """The JSON of the run so far (rewritten after every configuration, so a run stopped early keeps what it
    measured; ``complete`` says whether every planned configuration ran)."""
    doc = {
        "complete": complete,
        "planned": [row["name"] for row, _ in planned],
        "benchmark": "one ROICtrl adapter training step vs the plain UNet's forward + backward, CPU",
        "created": env.get("started_at") or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python benchmarks/bench_training.py " + " ".join(args.argv),
        "quick": bool(args.quick),
        "one_process": bool(one_process),
        **env,
        "loadavg_before": load_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "load_note": "the machine is shared (other jobs ran on the same cores): absolute times are noisy; "
                     "compare ratios within this run, and see each configuration's own load averages",
        "total_wall_s": round(time.perf_counter() - started, 1),
        "setup": {
            "models": "random weights built from configs (no download)",
            "unet": cfg["unet"], "vae": cfg["vae"], "text_encoder": cfg["text"],
            "image_px": cfg["image_px"], "latent": cfg["image_px"] // cfg["vae_factor"], "batch": cfg["batch"],
            "instances": cfg["instances"], "tokens": cfg["tokens"], "warmup_steps": cfg["warmup"],
            "timed_steps": cfg["repeats"], "adapter": "ROICtrlAdapter.from_unet defaults (fused blend)"
            + ("" if cfg["grid_sizes"] is None else f", grid_sizes {cfg['grid_sizes']}"),
            "optimizer": "torch.optim.AdamW(adapter.parameters(), lr=1e-4, fused=True) (the trainer's)",
            "host_memory": {"retain": "roi_ops.training.host_memory.retain_freed_host_memory() at the start of "
                                      "every configuration's process (as roi-ops train on the CPU)",
                            "release": "glibc malloc's defaults (freed blocks go back to the OS)"}[args.host_memory],
            "loss": "F.mse_loss(pred, noise) + 0.01 * adapter.regularization_loss() (plain: the MSE only)",
        },
        "modes": {
            "plain": "frozen UNet, no adapter: forward + backward of the MSE into the noisy latents (requires_grad), "
                     "no optimizer",
            "adapter_cached": "frozen UNet + adapter: forward, backward, AdamW step; latents and caption "
                              "embeddings given precomputed",
            "adapter_uncached": "as adapter_cached, plus the text encoder on the prompt + instance captions (one "
                                "batch) and the VAE encode of the image, under no_grad, inside the timed step",
        },
        "measurement": {
            "time": "time.perf_counter around the step (cpu_s: time.process_time, all threads); median, min, max "
                    "over the timed steps after the warm-up steps (the first allocates AdamW's state; with "
                    "retained host memory the heap reaches its peak size within two steps)",
            "memory": "peak RSS (VmHWM of /proc/self/status, reset by writing 5 to /proc/self/clear_refs before "
                      "each step): peak_mib is the whole process's peak during the step (weights included), "
                      "above_setup_mib that peak minus the RSS after the models and inputs were built (what "
                      "training adds: activations, gradients, optimizer state, workspaces), step_extra_mib the "
                      "peak minus the RSS at the step's start (small after the first step: the C allocator keeps "
                      "freed memory mapped); "
                      + ("all configurations in one process (--one-process), in turn" if one_process else
                         "one fresh subprocess per configuration")
                      + ". tracemalloc would miss torch's tensors (it traces Python allocations only)",
            "calls_per_step": "forward calls of the UNet's BasicTransformerBlocks and of the adapter's ROICtrlBlocks "
                              "in one step: twice the layer count under gradient checkpointing (recomputed in "
                              "the backward)",
        },
        "configs": configs,
    }
    doc["ratios"] = ratios(configs)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    if complete:
        print(f"wrote {out} ({doc['total_wall_s']:.0f} s)")
        print(table(doc))
    return doc


def table(doc: dict) -> str:
    """Markdown table of one run, from its JSON."""
    lines = [
        (f"Run {doc['created']} to {doc['finished']} (UTC) on" if "finished" in doc else f"Written {doc['created']} on")
        + f" {doc['machine']['cpu_model']} ({doc['threads']} threads; load average "
        f"{doc['loadavg_before']} before, {doc['loadavg_after']} after), torch {doc['versions']['torch']}, "
        f"diffusers {doc['versions']['diffusers']}; `{doc['command']}`. "
        f"{doc['setup']['image_px']} px ({doc['setup']['latent']}x{doc['setup']['latent']} latents), batch "
        f"{doc['setup']['batch']}, {doc['setup']['instances']} instances; median [min-max] of "
        f"{doc['setup']['timed_steps']} steps after {doc['setup']['warmup_steps']} warm-up.",
        "",
        "| configuration | checkpointing | step (s) | fwd / bwd / opt (s) | encode (s) | peak RSS (MiB) | "
        "above setup (MiB) | time / plain | peak / plain | above setup / plain | block calls (UNet, adapter) | "
        "load after |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rat = doc["ratios"]
    for name, row in doc["configs"].items():
        if row["status"] != "ok":
            lines.append(f"| {row['mode']} | {'on' if row['checkpointing'] else 'off'} | {row['status']} | "
                         f"{row.get('reason', '')[:80]} | | | | | | | | |")
            continue
        s = row["stats"]
        r = rat.get(name)
        calls = s["calls_per_step"]
        rel = " | ".join("n/a" if v is None else f"{v:.2f}x"
                         for v in (r["step_time"], r["peak_memory"], r["above_setup_memory"])) if r else "1 | 1 | 1"
        lines.append(
            f"| {row['mode']} | {'on' if row['checkpointing'] else 'off'} | {s['step_s']['median']:.2f} "
            f"[{s['step_s']['min']:.2f}-{s['step_s']['max']:.2f}] | {s['forward_s']['median']:.2f} / "
            f"{s['backward_s']['median']:.2f} / {s['optimizer_s']['median']:.3f} | {s['encode_s']['median']:.2f} | "
            f"{s['peak_mib']['median']:.0f} | {s['above_setup_mib']['median']:.0f} | {rel} | "
            f"{calls['unet_transformer_blocks']}, {calls['adapter_blocks']} | {row['loadavg_after'][0]} |"
        )
    missing = [name for name in doc.get("planned", []) if name not in doc["configs"]]
    if missing:
        lines.append(f"| not run (the run was stopped before them): {', '.join(missing)} | | | | | | | | | | | |")
    lines.append("")
    for name, r in rat.items():
        if "ckpt over" in name:
            lines.append(f"- {name}: step time x{r['step_time']}, peak RSS x{r['peak_memory']}, "
                         f"memory above setup x{r['above_setup_memory']}")
    return "\n".join(lines)


def parameter_breakdown(unet_config: dict) -> dict:
    """The default adapter's parameter count per part (summed over blocks), built on the meta device (no memory,
    no weights): where the adapter's size, hence its gradients and optimizer state, comes from."""
    import torch
    from diffusers import UNet2DConditionModel

    from roi_ops.roictrl_adapter import ROICtrlAdapter

    with torch.device("meta"):
        adapter = ROICtrlAdapter.from_unet(UNet2DConditionModel(**unet_config))
    parts: dict[str, int] = {}
    for name, p in adapter.named_parameters():
        part = name.split(".")[2] if name.startswith("blocks.") else name.split(".")[0]
        parts[part] = parts.get(part, 0) + p.numel()
    return dict(sorted(parts.items(), key=lambda kv: -kv[1]))


def write_docs(text: str) -> None:
    doc = DOC_PATH.read_text()
    if TABLE_BEGIN not in doc or TABLE_END not in doc:
        raise SystemExit(f"{DOC_PATH} has no {TABLE_BEGIN!r} ... {TABLE_END!r} markers to write the table between")
    before, rest = doc.split(TABLE_BEGIN, 1)
    DOC_PATH.write_text(before + TABLE_BEGIN + "\n" + text + "\n" + TABLE_END + rest.split(TABLE_END, 1)[1])
    print(f"wrote the table in {DOC_PATH}")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true",
                    help="tiny models, 1 warm-up + 1 timed step, --one-process; JSON in the temp dir")
    ap.add_argument("--report", action="store_true", help="print the markdown table of --json")
    ap.add_argument("--docs", action="store_true",
                    help=f"with --report: also write the table into {DOC_PATH.relative_to(REPO)} between its markers")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per configuration (default 3; quick 1)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2; quick 1)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--checkpointing", choices=("off", "on", "both"), default="both",
                    help="gradient checkpointing settings to run (default both)")
    ap.add_argument("--one-process", action="store_true",
                    help="run every configuration in one worker process (default with --quick: one torch import "
                         "instead of six; the peaks are still per step, but the RSS at a step's start then "
                         "includes earlier configurations' leftovers)")
    ap.add_argument("--host-memory", choices=("retain", "release"), default="retain",
                    help="retain: glibc keeps freed memory, as roi-ops train sets it on the CPU (default); release: "
                    "glibc's defaults. Either way for every mode")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.argv = [a for a in argv if not a.startswith("--worker")]
    if args.worker:
        spec = json.loads(args.worker)
        results = []
        for one in spec.get("group", [spec]):  # --one-process: every configuration in this process, in turn
            try:
                results.append(_worker(one))
            except Exception as exc:  # recorded as the configuration's failure
                import traceback

                traceback.print_exc()
                results.append({"status": "failed", "reason": f"{type(exc).__name__}: {exc}"})
            import gc

            gc.collect()
        print("RESULT " + json.dumps(results if "group" in spec else results[0]), flush=True)
        return
    # A quick run is a smoke test: its JSON goes to the temp dir, never over the committed results.
    args.json = args.json or str(Path(tempfile.gettempdir()) / "training_cpu_quick.json" if args.quick else JSON_PATH)
    if args.report:
        doc = json.loads(Path(args.json).read_text())
        # Statistics and ratios again from the raw per-step rows, so the JSON and the table follow this code.
        for row in doc["configs"].values():
            if row["status"] == "ok":
                row["stats"] = summarise_row(row)
        doc["ratios"] = ratios(doc["configs"])
        if not doc.get("quick"):
            doc["adapter_parameter_breakdown"] = {
                "how": "ROICtrlAdapter.from_unet(UNet2DConditionModel(**setup.unet)) on the meta device, "
                       "named_parameters() summed per block part (bench_training.parameter_breakdown)",
                "parameters": parameter_breakdown(doc["setup"]["unet"]),
            }
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        text = table(doc)
        print(text)
        if args.docs:
            write_docs(text)
        return
    run(args)


if __name__ == "__main__":
    main()
