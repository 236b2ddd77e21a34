"""ROI-Align -> ROI-Unpool round trip on a synthesised image.

Run ``python -m roi_ops.demo`` (or ``make demo``). It draws a test image with
Pillow, crops a fixed-size grid out of it for each of several boxes with
``roi_align``, pastes every grid back at full resolution with ``roi_unpool``,
and writes one picture (``demo_output/roi_ops_demo.png`` unless ``--out`` says
otherwise) showing the boxes, the crops, the paste-backs and the per-pixel
reconstruction error. It also prints a table of shapes, timings and the
largest difference from the float64 pure-PyTorch oracle ``roi_ops.reference``.

Then, given ``--toy-model DIR``, the toy Stable-Diffusion model trained by ``benchmarks/instance_control`` (a
source checkout holds it in ``benchmarks/instance_control/checkpoints``; ``make demo`` passes that folder; it is not
part of the installed package), it turns one layout into images with the ROICtrl adapter off and on (same seeds),
boxes drawn, and the adapter's blend-weight map per instance (``demo_output/roictrl_toy_demo.png``,
``--toy-out``). Without ``--toy-model`` that part is skipped, with a note saying how to get the model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import roi_ops
from roi_ops import reference

DEFAULT_OUT = Path("demo_output") / "roi_ops_demo.png"
DEFAULT_TOY_OUT = Path("demo_output") / "roictrl_toy_demo.png"
# Where a source checkout of roi-ops holds the toy model of the instance-control benchmark (relative to the
# checkout's root; the installed package does not ship it).
TOY_MODEL_IN_CHECKOUT = "benchmarks/instance_control/checkpoints"
TOY_MODEL_HOWTO = (
    f"the toy model (folders model/ and roictrl/, about 7 MB) is in a source checkout of roi-ops under "
    f"{TOY_MODEL_IN_CHECKOUT}: pass --toy-model <checkout>/{TOY_MODEL_IN_CHECKOUT} (make demo does)"
)
# (box (x1, y1, x2, y2) normalised, caption): one colour per instance, the scorer's palette.
TOY_LAYOUT = [
    ((0.06, 0.08, 0.40, 0.42), "a red circle"),
    ((0.56, 0.10, 0.92, 0.44), "a blue square"),
    ((0.10, 0.56, 0.44, 0.92), "a yellow triangle"),
    ((0.58, 0.58, 0.90, 0.90), "a green circle"),
]
TOY_EDGE = {"red": "#ff4040", "blue": "#4060ff", "yellow": "#ffe020", "green": "#30d040", "cyan": "#20e0e0",
            "magenta": "#ff40e0"}
IMAGE_H, IMAGE_W = 240, 320  # deliberately not square, so an H/W mix-up shows
GRID = (16, 16)  # ROI-Align output size (PH, PW)

# (x1, y1, x2, y2) in image pixels. Fractional on purpose: nothing is rounded.
DEFAULT_BOXES = [
    (14.5, 18.25, 110.75, 114.0),  # red disc
    (128.3, 20.6, 196.1, 112.4),  # striped bar: high frequencies the grid cannot hold
    (212.0, 12.5, 306.5, 94.0),  # yellow triangle
    (20.2, 136.7, 150.9, 226.3),  # purple ellipse, wide box -> squeezed grid
    (170.6, 122.1, 232.4, 226.8),  # smooth background only: near-exact round trip
    (244.4, 130.0, 310.0, 228.5),  # checkerboard
]


def make_image(height: int = IMAGE_H, width: int = IMAGE_W) -> torch.Tensor:
    """Synthesise an RGB test image as a float32 Tensor[1, 3, H, W] in [0, 1]."""
    from PIL import Image, ImageDraw

    ys = torch.linspace(0.0, 1.0, height).view(height, 1)
    xs = torch.linspace(0.0, 1.0, width).view(1, width)
    # Smooth, nearly affine background: ROI-Align -> ROI-Unpool reproduces it.
    background = torch.stack(
        [
            0.15 + 0.55 * xs + 0.0 * ys,
            0.25 + 0.45 * ys + 0.0 * xs,
            0.75 - 0.35 * xs - 0.2 * ys,
        ]
    )
    pixels = (background.clamp(0, 1) * 255).round().to(torch.uint8)
    img = Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")
    draw = ImageDraw.Draw(img)

    draw.ellipse((24, 28, 100, 104), fill=(220, 40, 40), outline=(120, 0, 0), width=3)
    for i in range(8):  # vertical stripes, 4 px wide
        x = 134 + 8 * i
        draw.rectangle((x, 28, x + 3, 104), fill=(20, 20, 20))
    draw.polygon([(259, 20), (300, 88), (218, 88)], fill=(245, 205, 30))
    draw.ellipse((30, 150, 140, 212), fill=(140, 60, 190))
    for r in range(6):  # checkerboard of 8 px squares
        for c in range(6):
            if (r + c) % 2 == 0:
                x, y = 252 + 9 * c, 146 + 12 * r
                draw.rectangle((x, y, x + 8, y + 11), fill=(250, 250, 250))

    out = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    out = out.view(height, width, 3).permute(2, 0, 1).float().div_(255.0)
    return out.unsqueeze(0).contiguous()


def _time_ms(fn, repeats: int) -> float:
    fn()  # warm-up: first call pays for lazy initialisation and page faults
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def run(image: torch.Tensor, boxes: torch.Tensor, grid, repeats: int):
    """Compute the round trip, timings and errors. Returns a dict of tensors and a table."""
    _, _, H, W = image.shape
    K = boxes.shape[0]
    kw = dict(spatial_scale=1.0, aligned=True)

    crops = roi_ops.roi_align(image, boxes, grid, sampling_ratio=-1, **kw)
    pasted = roi_ops.roi_unpool(crops, boxes, (H, W), **kw)
    # Partition of unity: pasting a grid of ones gives 1 exactly where a box covers.
    coverage = roi_ops.roi_unpool(torch.ones(K, 1, *grid), boxes, (H, W), **kw)[:, 0]

    # Backward of each op with a fixed upstream gradient.
    gen = torch.Generator().manual_seed(0)
    g_crops = torch.randn(crops.shape, generator=gen)
    g_pasted = torch.randn(pasted.shape, generator=gen)

    def align_fwd_bwd(x, b):
        x = x.detach().requires_grad_(True)
        out = roi_ops.roi_align(x, b, grid, sampling_ratio=-1, **kw)
        return torch.autograd.grad(out, x, g_crops)[0]

    def unpool_fwd_bwd(x, b):
        x = x.detach().requires_grad_(True)
        out = roi_ops.roi_unpool(x, b, (H, W), **kw)
        return torch.autograd.grad(out, x, g_pasted)[0]

    def oracle(dtype):
        """The four results above from roi_ops.reference, with every input cast to dtype."""
        b = boxes.to(dtype)
        x = image.to(dtype, copy=True).requires_grad_(True)
        out = reference.roi_align(x, b, grid, 1.0, -1, True)
        (g_align,) = torch.autograd.grad(out, x, g_crops.to(dtype))
        c = crops.to(dtype, copy=True).requires_grad_(True)
        back = reference.roi_unpool(c, b, (H, W), 1.0, True)
        (g_unpool,) = torch.autograd.grad(back, c, g_pasted.to(dtype))
        return out.detach(), back.detach(), g_align, g_unpool

    ours = (crops, pasted, align_fwd_bwd(image, boxes), unpool_fwd_bwd(crops, boxes))
    ref32, ref64 = oracle(torch.float32), oracle(torch.float64)
    errs = [(_max_abs(o, r32), _max_abs(o, r64)) for o, r32, r64 in zip(ours, ref32, ref64)]

    shape = lambda t: "x".join(str(s) for s in t.shape)  # noqa: E731
    table = [
        ("roi_align", shape(image), shape(crops),
         _time_ms(lambda: roi_ops.roi_align(image, boxes, grid, sampling_ratio=-1, **kw), repeats), *errs[0]),
        ("roi_unpool", shape(crops), shape(pasted),
         _time_ms(lambda: roi_ops.roi_unpool(crops, boxes, (H, W), **kw), repeats), *errs[1]),
        ("roi_align fwd+bwd", shape(image), "grad " + shape(image),
         _time_ms(lambda: align_fwd_bwd(image, boxes), repeats), *errs[2]),
        ("roi_unpool fwd+bwd", shape(crops), "grad " + shape(crops),
         _time_ms(lambda: unpool_fwd_bwd(crops, boxes), repeats), *errs[3]),
    ]

    covered = coverage > 0.5
    # Per ROI and pixel: largest error over the three colour channels, NaN where not covered.
    err = (pasted - image).abs().amax(dim=1)
    err = torch.where(covered, err, torch.full_like(err, float("nan")))
    return dict(crops=crops, pasted=pasted, covered=covered, err=err), table


def print_table(table, backend: str, threads: int) -> None:
    head = ("op", "input", "output", "time (ms)", "max|diff| f32 oracle", "max|diff| f64 oracle")
    rows = [head] + [(op, i, o, f"{t:.3f}", f"{e32:.1e}", f"{e64:.1e}") for op, i, o, t, e32, e64 in table]
    widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
    print(f"backend: {backend}; torch {torch.__version__}, {threads} thread(s); float32 image and boxes; "
          "time: median of --repeats calls")
    print("oracle: roi_ops.reference (pure PyTorch) on the same inputs cast to float32 / float64")
    for n, r in enumerate(rows):
        print("  ".join(cell.ljust(w) if c < 3 else cell.rjust(w)
                        for c, (cell, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def _box_window(box, H, W, margin=4):
    x1, y1, x2, y2 = (float(v) for v in box)
    r0, r1 = max(int(y1) - margin, 0), min(int(y2) + 1 + margin, H)
    c0, c1 = max(int(x1) - margin, 0), min(int(x2) + 1 + margin, W)
    return r0, r1, c0, c1


def _to_rgb(t: torch.Tensor):
    return t.clamp(0, 1).permute(1, 2, 0).numpy()


def save_figure(image, boxes, res, grid, out: Path, backend: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patches

    img = image[0]
    _, H, W = img.shape
    K = boxes.shape[0]
    crops, pasted, covered, err = res["crops"], res["pasted"], res["covered"], res["err"]
    colors = plt.cm.tab10.colors
    # Shared colour scale for every error panel so they can be compared.
    vmax = max(float(torch.nan_to_num(err, nan=0.0).max()), 1e-6)
    cmap = plt.get_cmap("magma").copy()
    cmap.set_bad(color=(0.85, 0.85, 0.85))

    fig = plt.figure(figsize=(2.3 * K + 1.0, 12.2), dpi=110)
    gs = fig.add_gridspec(4, K + 1, height_ratios=[2.4, 1, 1, 1], width_ratios=[1] * K + [0.08],
                          hspace=0.38, wspace=0.12, left=0.045, right=0.95, top=0.93, bottom=0.03)
    fig.suptitle(
        f"roi_ops round trip: roi_align (aligned=True) to a {grid[0]}x{grid[1]} grid per box, "
        f"then roi_unpool back to {H}x{W}   [backend: {backend}]",
        fontsize=12,
    )

    third = K // 3
    ax_in = fig.add_subplot(gs[0, 0:third])
    ax_pb = fig.add_subplot(gs[0, third:2 * third])
    ax_er = fig.add_subplot(gs[0, 2 * third:K])
    ax_cb = fig.add_subplot(gs[0, K])

    def draw_boxes(ax, labels=True, lw=1.8):
        for k in range(K):
            x1, y1, x2, y2 = (float(v) for v in boxes[k, 1:])
            # Pixel (h, w) is the unit square centred on (w, h): edges sit at -0.5 offsets.
            ax.add_patch(patches.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False,
                                           edgecolor=colors[k % 10], linewidth=lw))
            if labels:
                ax.text(x1 + 1, y1 + 1, str(k), color="white", fontsize=10, fontweight="bold",
                        va="top", ha="left",
                        bbox=dict(facecolor=colors[k % 10], edgecolor="none", pad=1.5))

    ax_in.imshow(_to_rgb(img), interpolation="nearest")
    draw_boxes(ax_in)
    ax_in.set_title("input image [1,3,%d,%d] and boxes" % (H, W), fontsize=11)

    # Composite: every covered pixel shows the paste-back of the highest-numbered ROI covering it.
    comp = img * 0.3
    for k in range(K):
        comp = torch.where(covered[k], pasted[k], comp)
    ax_pb.imshow(_to_rgb(comp), interpolation="nearest")
    draw_boxes(ax_pb, labels=False, lw=1.0)
    ax_pb.set_title("all paste-backs (uncovered pixels dimmed)", fontsize=11)

    err_all = torch.nan_to_num(err, nan=-1.0).amax(dim=0)
    err_all = torch.where(covered.any(0), err_all, torch.full_like(err_all, float("nan")))
    im = ax_er.imshow(err_all.numpy(), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
    draw_boxes(ax_er, labels=False, lw=1.0)
    ax_er.set_title("|paste-back - input|, max over RGB (grey: no box)", fontsize=11)
    fig.colorbar(im, cax=ax_cb).set_label("abs error (image in [0, 1])")
    for n, ax in enumerate((ax_in, ax_pb, ax_er)):
        ax.set_xticks([0, W // 2, W - 1])
        ax.set_yticks([0, H // 2, H - 1] if n == 0 else [])
        ax.tick_params(labelsize=8)

    row_titles = [f"ROI-Align crop\n{grid[0]}x{grid[1]} grid", "ROI-Unpool\npaste-back", "|paste-back - input|"]
    for k in range(K):
        box = boxes[k, 1:]
        r0, r1, c0, c1 = _box_window(box, H, W)
        x1, y1, x2, y2 = (float(v) for v in box)
        extent = (c0 - 0.5, c1 - 0.5, r1 - 0.5, r0 - 0.5)

        ax = fig.add_subplot(gs[1, k])
        ax.imshow(_to_rgb(crops[k]), interpolation="nearest")
        ax.set_title(f"box {k}: ({x1:g}, {y1:g})-\n({x2:g}, {y2:g})", fontsize=9, color=colors[k % 10])

        ax = fig.add_subplot(gs[2, k])
        ax.imshow(_to_rgb(pasted[k][:, r0:r1, c0:c1]), interpolation="nearest", extent=extent)
        ax.add_patch(patches.Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False,
                                       edgecolor=colors[k % 10], linewidth=1.2, linestyle="--"))
        ax.set_title(f"{int(covered[k].sum())} px covered", fontsize=9)

        ax = fig.add_subplot(gs[3, k])
        ek = err[k][r0:r1, c0:c1]
        ax.imshow(ek.numpy(), cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest", extent=extent)
        finite = ek[~torch.isnan(ek)]
        mean = float(finite.mean()) if finite.numel() else 0.0
        mx = float(finite.max()) if finite.numel() else 0.0
        ax.set_title(f"mean {mean:.3f}, max {mx:.3f}", fontsize=9)

        for row in (1, 2, 3):
            a = fig.axes[-4 + row]
            a.set_xticks([])
            a.set_yticks([])
            if k == 0:
                a.set_ylabel(row_titles[row - 1], fontsize=10.5)

    fig.text(0.03, 0.005,
             "Crops are shown pixel for pixel (each square is one grid cell). Paste-backs and errors "
             "are cut to each box plus a 4 px margin; dashed line: box edge. Uncovered pixels are 0 "
             "(black) in a paste-back and grey in the error maps.", fontsize=8.5)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def toy_generate(toy: Path, layout=TOY_LAYOUT, seeds=(0, 1, 2), steps: int = 20, guidance: float = 3.0):
    """The toy model's images of ``layout`` with ROICtrl off and on (same initial noise) and the blend maps.

    Returns (off float[S, R, R, 3], on float[S, R, R, 3], blend maps float[S, n_instances, R, R]).
    """
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from roi_ops.roictrl_adapter import ROICtrlAdapter
    from roi_ops.roictrl_adapter.pipeline import ROICtrlPipeline

    base = StableDiffusionPipeline.from_pretrained(str(toy / "model"), safety_checker=None)
    base.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    base.set_progress_bar_config(disable=True)
    pipe = ROICtrlPipeline.from_pipe(base, ROICtrlAdapter.from_pretrained(str(toy / "roictrl"), unet=base.unet))
    prompt = " and ".join(caption for _, caption in layout)
    instances = [{"box": list(box), "caption": caption} for box, caption in layout]
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, output_type="np", num_images_per_prompt=len(seeds))

    def gens():
        return [torch.Generator().manual_seed(s) for s in seeds]

    off = base(prompt, generator=gens(), **kw).images
    out = pipe(prompt, instances=[instances], generator=gens(), return_blend_maps=True, **kw)
    return off, out.images, torch.stack(out.blend_maps).numpy()


def roictrl_toy_demo(toy: Path, out: Path, n_seeds: int = 3) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patches

    off, on, maps = toy_generate(toy, seeds=tuple(range(n_seeds)))
    S, R = off.shape[0], off.shape[1]
    K = len(TOY_LAYOUT)
    fig, axes = plt.subplots(S, 2 + K, figsize=(2.0 * (2 + K), 2.1 * S + 0.8), dpi=100, squeeze=False)

    def boxes(ax, only=None):
        for k, (box, caption) in enumerate(TOY_LAYOUT):
            if only is not None and k != only:
                continue
            x1, y1, x2, y2 = (v * R for v in box)
            ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=1.2, linestyle="--",
                                           edgecolor=TOY_EDGE.get(caption.split()[1], "white")))

    for s in range(S):
        for c, (img, title) in enumerate(((off[s], "ROICtrl off"), (on[s], "ROICtrl on"))):
            ax = axes[s][c]
            ax.imshow(img.clip(0, 1), interpolation="nearest", extent=(0, R, R, 0))
            boxes(ax)
            if s == 0:
                ax.set_title(title, fontsize=10)
        for k in range(K):
            ax = axes[s][2 + k]
            ax.imshow(maps[s, k], cmap="viridis", vmin=0, vmax=1, interpolation="nearest", extent=(0, R, R, 0))
            boxes(ax, only=k)
            if s == 0:
                ax.set_title(f"blend weight:\n{TOY_LAYOUT[k][1]}", fontsize=9)
        axes[s][0].set_ylabel(f"seed {s}", fontsize=9)
        for ax in axes[s]:
            ax.set_xticks([])
            ax.set_yticks([])
    prompt = " and ".join(c for _, c in TOY_LAYOUT)
    fig.suptitle(f"toy SD model ({R}x{R}), prompt: '{prompt}'; dashed: the instance boxes\n"
                 "blend weight: the instance's share of the cross-attention output, mean over layers and steps",
                 fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roi_ops.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"where to write the PNG (default: {DEFAULT_OUT})")
    parser.add_argument("--grid", type=int, default=GRID[0],
                        help=f"ROI-Align output size, square (default: {GRID[0]})")
    parser.add_argument("--repeats", type=int, default=20,
                        help="timed repetitions per op; the table shows the median (default: 20)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads before running (default: torch's choice)")
    parser.add_argument("--toy-model", default=None, metavar="DIR",
                        help="folder with model/ (diffusers) and roictrl/ (adapter) of the toy model, for the "
                             f"ROICtrl part ({TOY_MODEL_IN_CHECKOUT} in a source checkout); without it, or "
                             "with 'none', that part is skipped")
    parser.add_argument("--toy-out", type=Path, default=DEFAULT_TOY_OUT,
                        help=f"where to write the ROICtrl picture (default: {DEFAULT_TOY_OUT})")
    parser.add_argument("--toy-seeds", type=int, default=3, help="images per setting in the ROICtrl part")
    args = parser.parse_args(argv)
    if args.toy_seeds < 1:
        parser.error(f"--toy-seeds must be a positive integer, got {args.toy_seeds}")
    if args.grid < 1:
        parser.error(f"--grid must be a positive integer, got {args.grid}")
    if args.repeats < 1:
        parser.error(f"--repeats must be a positive integer, got {args.repeats}")
    toy = None
    if args.toy_model is not None and args.toy_model.lower() != "none":
        toy = Path(args.toy_model)
        if not ((toy / "model" / "model_index.json").is_file() and (toy / "roictrl").is_dir()):
            parser.error(f"--toy-model {args.toy_model!r}: no toy model there (model/model_index.json and "
                         f"roictrl/); {TOY_MODEL_HOWTO}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be a positive integer, got {args.threads}")
        torch.set_num_threads(args.threads)

    native = roi_ops.native_available("cpu")
    backend = "native C++ CPU kernels" if native else "pure-PyTorch fallback (native kernels not built)"
    if not native:
        print("note: the C++ extension is not loaded; the timings below are of the pure-PyTorch "
              "fallback. Build it with `make build` (or `pip install -e . --no-build-isolation`).")

    image = make_image()
    boxes = torch.tensor([[0.0, *b] for b in DEFAULT_BOXES], dtype=torch.float32)
    grid = (args.grid, args.grid)
    with warnings.catch_warnings():
        # The fallback's one-time warning is already explained above.
        warnings.simplefilter("ignore" if not native else "default")
        res, table = run(image, boxes, grid, args.repeats)
    print_table(table, backend, torch.get_num_threads())
    save_figure(image, boxes, res, grid, args.out, "native CPU" if native else "reference fallback")
    print(f"wrote {args.out.resolve()}")
    if toy is not None:
        roictrl_toy_demo(toy, args.toy_out, args.toy_seeds)
        print(f"wrote {args.toy_out.resolve()}")
    elif args.toy_model is None:
        print(f"note: skipped the ROICtrl part, which needs --toy-model DIR; {TOY_MODEL_HOWTO}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
