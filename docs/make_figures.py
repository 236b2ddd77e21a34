"""Draws docs/img/ops_semantics.png, the figure of docs/ops.md.

    python docs/make_figures.py            # needs roi_ops importable and matplotlib

Whatever the figure shows about coverage and interpolation weights is computed
by calling roi_ops itself (roi_unpool of all-ones and one-hot grids, roi_align
of one-hot images), so the picture cannot drift from the code. Only the
ROI-Align sample positions in panel (a) are drawn from the formula in
docs/spec.md; panel (d) checks them through roi_align's weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import roi_ops

OUT = Path(__file__).resolve().parent / "img" / "ops_semantics.png"

# One worked example, used by panels (a) and (b): a 6x8 feature map, spatial_scale=1, aligned=True.
H, W = 6, 8
BOX = (1.3, 1.0, 6.9, 5.2)  # (x1, y1, x2, y2) in input pixels
GRID = (2, 3)  # (PH, PW)
SR = 2  # sampling_ratio


def box_frame(box, scale=1.0, aligned=True):
    off = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = box
    return x1 * scale - off, y1 * scale - off, (x2 - x1) * scale, (y2 - y1) * scale


def unpool_weights_1d(n_out: int, P: int, start: float, length: float) -> torch.Tensor:
    """Tensor[P, n_out]: weight of grid cell i on output pixel h along one axis, from roi_unpool itself.

    start, length: y1' and rh of the box in the feature frame."""
    # One channel per grid cell holding a one-hot column; a 1-pixel-wide second axis.
    onehot = torch.eye(P, dtype=torch.float64).view(1, P, P, 1)
    # aligned=True subtracts 0.5: y1' = start, rh = length; x1' = -0.5, rw = 1 covers column 0.
    box = torch.tensor([[0.0, 0.0, start + 0.5, 1.0, start + length + 0.5]], dtype=torch.float64)
    out = roi_ops.roi_unpool(onehot, box, (n_out, 1), aligned=True)
    return out[0, :, :, 0]


def align_tap_weights(positions: torch.Tensor, n: int) -> torch.Tensor:
    """Tensor[len(positions), n]: ROI-Align's weight of pixel c for one sample at x, from roi_align itself."""
    # Image [1, n, 1, n]: channel c is the one-hot row at column c. A box of width 1 with
    # aligned=False, sampling_ratio=1 and a 1x1 output has its single sample at its centre.
    image = torch.eye(n, dtype=torch.float64).view(1, n, 1, n)
    x = positions.to(torch.float64)
    rois = torch.stack([torch.zeros_like(x), x - 0.5, torch.full_like(x, -0.5), x + 0.5,
                        torch.full_like(x, 0.5)], dim=1)
    out = roi_ops.roi_align(image, rois, (1, 1), sampling_ratio=1, aligned=False)
    return out[:, :, 0, 0]


def draw_pixels(ax, coverage=None, clamp=None):
    from matplotlib import patches

    for h in range(H):
        for w in range(W):
            face = "#ffffff"
            if coverage is not None and coverage[h, w]:
                face = "#cfe3f5" if not (clamp is not None and clamp[h, w]) else "#f6d7a7"
            ax.add_patch(patches.Rectangle((w - 0.5, h - 0.5), 1, 1, facecolor=face, edgecolor="#b0b0b0",
                                           linewidth=0.8))
            ax.plot(w, h, "o", color="#555", markersize=2.5)
    ax.set_xlim(-0.9, W - 0.1)
    ax.set_ylim(H - 0.1, -0.9)
    ax.set_aspect("equal")
    ax.set_xticks(range(W))
    ax.set_yticks(range(H))
    ax.set_xlabel("w  (feature-map column; pixel centre at x = w)")
    ax.set_ylabel("h  (row; centre at y = h)")
    ax.tick_params(labelsize=8)


def main() -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import patches

    x1p, y1p, rw, rh = box_frame(BOX)
    PH, PW = GRID
    fig, axes = plt.subplots(2, 2, figsize=(13.5, 10.5), dpi=110)
    (ax_a, ax_b), (ax_c, ax_d) = axes

    # (a) coordinates and ROI-Align sample points
    draw_pixels(ax_a)
    ax_a.add_patch(patches.Rectangle((x1p, y1p), rw, rh, fill=False, edgecolor="#d62728", linewidth=2))
    bin_h, bin_w = rh / PH, rw / PW
    for ph in range(1, PH):
        ax_a.plot([x1p, x1p + rw], [y1p + ph * bin_h] * 2, color="#d62728", linewidth=0.9, linestyle="--")
    for pw in range(1, PW):
        ax_a.plot([x1p + pw * bin_w] * 2, [y1p, y1p + rh], color="#d62728", linewidth=0.9, linestyle="--")
    ys = [y1p + ph * bin_h + ((iy + 0.5) * bin_h) / SR for ph in range(PH) for iy in range(SR)]
    xs = [x1p + pw * bin_w + ((ix + 0.5) * bin_w) / SR for pw in range(PW) for ix in range(SR)]
    for y in ys:
        ax_a.plot(xs, [y] * len(xs), "x", color="#d62728", markersize=6)
    # One sample's four bilinear neighbours.
    sy, sx = ys[1], xs[2]
    for ny in (int(sy), int(sy) + 1):
        for nx in (int(sx), int(sx) + 1):
            ax_a.plot([sx, nx], [sy, ny], color="#2ca02c", linewidth=1.2)
            ax_a.plot(nx, ny, "o", color="#2ca02c", markersize=5)
    ax_a.annotate(f"(x1', y1') = (x1*s - 0.5, y1*s - 0.5) = ({x1p:g}, {y1p:g}); rw = {rw:g}, rh = {rh:g}",
                  (x1p, y1p), (x1p - 0.9, -1.05), fontsize=8.5, color="#d62728",
                  arrowprops=dict(arrowstyle="->", color="#d62728"))
    ax_a.set_ylim(H - 0.1, -1.4)
    ax_a.set_title(f"(a) coordinates and ROI-Align samples\nbox {BOX} x spatial_scale 1, aligned=True -> "
                   f"{PH}x{PW} bins, sampling_ratio={SR}\nx: sample points; green: one sample's 4 bilinear "
                   "neighbours", fontsize=9.5)

    # (b) ROI-Unpool coverage and the clamped band, both read back from roi_unpool
    boxes = torch.tensor([[0.0, *BOX]], dtype=torch.float64)
    coverage = roi_ops.roi_unpool(torch.ones(1, 1, PH, PW, dtype=torch.float64), boxes, (H, W), aligned=True)[0, 0]
    covered = coverage > 0.5
    # A pixel is in the clamped band if its grid coordinate v or u falls outside [0, P-1]:
    # there, a grid that varies only along one axis pastes back as a constant.
    ramp_v = torch.arange(PH, dtype=torch.float64).view(1, 1, PH, 1).expand(1, 1, PH, PW)
    ramp_u = torch.arange(PW, dtype=torch.float64).view(1, 1, 1, PW).expand(1, 1, PH, PW)
    v = roi_ops.roi_unpool(ramp_v.contiguous(), boxes, (H, W), aligned=True)[0, 0]
    u = roi_ops.roi_unpool(ramp_u.contiguous(), boxes, (H, W), aligned=True)[0, 0]
    cy = [y1p + (i + 0.5) * rh / PH for i in range(PH)]
    cx = [x1p + (j + 0.5) * rw / PW for j in range(PW)]
    # Unclamped grid coordinate of each pixel centre, to tell the band apart.
    hh = torch.arange(H, dtype=torch.float64).view(H, 1).expand(H, W)
    ww = torch.arange(W, dtype=torch.float64).view(1, W).expand(H, W)
    v_raw = (hh - y1p) * PH / rh - 0.5
    u_raw = (ww - x1p) * PW / rw - 0.5
    clamp = covered & ((v_raw < 0) | (v_raw > PH - 1) | (u_raw < 0) | (u_raw > PW - 1))
    # Check that the pasted ramps agree with the clamped coordinates (the figure must match the code).
    vc, uc = v_raw.clamp(0, PH - 1), u_raw.clamp(0, PW - 1)
    if not (torch.allclose(v[covered], vc[covered]) and torch.allclose(u[covered], uc[covered])):
        raise RuntimeError("roi_unpool does not paste a ramp back as the clamped grid coordinate")
    draw_pixels(ax_b, covered, clamp)
    ax_b.add_patch(patches.Rectangle((x1p, y1p), rw, rh, fill=False, edgecolor="#d62728", linewidth=2))
    for y in cy:
        ax_b.plot(cx, [y] * len(cx), "s", color="#9467bd", markersize=7)
    # v depends on the row only and u on the column only: label them in the margins.
    rows, cols = covered.any(1).nonzero().flatten(), covered.any(0).nonzero().flatten()
    for h in rows.tolist():
        ax_b.text(W - 0.4, h, f"v = {float(v[h, cols[0]]):.2f}", va="center", fontsize=8, color="#333")
    for w in cols.tolist():
        ax_b.text(w, -0.75, f"u =\n{float(u[rows[0], w]):.2f}", ha="center", va="center", fontsize=8,
                  color="#333")
    ax_b.set_xlim(-0.9, W + 0.8)
    ax_b.set_ylim(H - 0.1, -1.3)
    ax_b.set_title("(b) ROI-Unpool coverage, half-open: y1' <= h < y1'+rh and x1' <= w < x1'+rw\n"
                   "blue: covered; orange: covered, grid coordinate clamped; white: exactly 0\n"
                   f"purple: the {PH}x{PW} grid cell centres; v, u: clamped grid coordinate of each row / column",
                   fontsize=9.5)

    # (c) 1-D ROI-Unpool weights along one axis, from one-hot grids
    n_out, P, y1c, length = 48, 4, 2.8, 40.0
    wts = unpool_weights_1d(n_out, P, y1c, length)
    hs = torch.arange(n_out)
    for i in range(P):
        ax_c.plot(hs, wts[i], "o-", markersize=3, linewidth=0.8, label=f"grid cell i={i}")
    ax_c.plot(hs, wts.sum(0), "k--", linewidth=1, label="sum of weights")
    for i in range(P):
        ax_c.axvline(y1c + (i + 0.5) * length / P, color="#999", linewidth=0.6, linestyle=":")
    ax_c.axvspan(y1c, y1c + 0.5 * length / P, color="#f6d7a7", alpha=0.5, label="clamped band")
    ax_c.axvspan(y1c + length - 0.5 * length / P, y1c + length, color="#f6d7a7", alpha=0.5)
    ax_c.axvline(y1c, color="#d62728", linewidth=1.2)
    ax_c.axvline(y1c + length, color="#d62728", linewidth=1.2, label="box edges y1', y1'+rh")
    ax_c.set_xlabel("output pixel h (dots: one per pixel)")
    ax_c.set_ylabel("weight of grid cell i")
    ax_c.set_ylim(-0.05, 1.5)
    ax_c.legend(fontsize=7.5, loc="upper center", ncol=4)
    ax_c.set_title(f"(c) ROI-Unpool, one axis: PH={P}, y1'={y1c:g}, rh={length:g}\n"
                   "clamped bilinear: tents between cell centres (dotted), flat to the box edge, "
                   "sum = 1 inside, 0 outside", fontsize=9.5)

    # (d) ROI-Align's 1-D tap with torchvision's border rule, from one-hot images
    n = 5
    xs_d = torch.linspace(-2.0, n + 1.0, 601)
    taps = align_tap_weights(xs_d, n)
    for c in range(n):
        ax_d.plot(xs_d, taps[:, c], linewidth=1.4, label=f"pixel {c}")
    ax_d.plot(xs_d, taps.sum(1), "k--", linewidth=1, label="sum")
    ax_d.axvspan(-1, 0, color="#f6d7a7", alpha=0.5, label="clamped to pixel 0 / W-1")
    ax_d.axvspan(n - 1, n, color="#f6d7a7", alpha=0.5)
    ax_d.axvline(-1, color="#d62728", linewidth=1)
    ax_d.axvline(n, color="#d62728", linewidth=1, label="x = -1 and x = W: beyond, 0")
    ax_d.set_xlabel("sample position x (feature-map units)")
    ax_d.set_ylabel("weight of pixel")
    ax_d.set_ylim(-0.05, 1.5)
    ax_d.legend(fontsize=7.5, loc="upper center", ncol=4)
    ax_d.set_title(f"(d) ROI-Align bilinear tap on an axis of W={n} pixels (torchvision's rule)\n"
                   "weight 0 for x < -1 or x > W; x in [-1, 0] clamps to 0; x >= W-1 reads pixel W-1",
                   fontsize=9.5)

    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT)
    plt.close(fig)
    return OUT


if __name__ == "__main__":
    print(main())
    sys.exit(0)
