"""Plot a results JSON written by bench_ops.py: one bar per implementation, log time axis.

    python benchmarks/plot_results.py benchmarks/results/cpu_<date>.json   # writes cpu_<date>.png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

IMPL_STYLE = {  # drawing order, top to bottom within a group
    "native": ("roi_ops native", "#1f77b4"),
    "grid_sample": ("grid_sample baseline", "#ff7f0e"),
    "reference": ("roi_ops.reference (oracle)", "#9a9a9a"),
}


def plot(json_path, png_path=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    png_path = Path(png_path) if png_path else json_path.with_suffix(".png")
    results = {(r["case"], r["op"], r["mode"], r["impl"]): r for r in data["results"]}
    groups = sorted({k[:3] for k in results}, key=lambda g: (list(data["cases"]).index(g[0]), g[1], g[2]))
    if not groups:
        raise ValueError(f"{json_path} has no results to plot")
    impls = [i for i in IMPL_STYLE if any(k[3] == i for k in results)]

    bar_h = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(10, 0.62 * len(groups) * len(impls) / 2 + 2.2), dpi=110)
    labels, ticks = [], []
    for gi, (case, op, mode) in enumerate(groups):
        native = results.get((case, op, mode, "native"))
        for ii, impl in enumerate(impls):
            r = results.get((case, op, mode, impl))
            y = gi + (ii - (len(impls) - 1) / 2) * bar_h
            label, color = IMPL_STYLE[impl]
            if r is None:
                ax.text(1, y, "  not run (see 'skipped' in the JSON)", va="center", fontsize=7.5, color="#777")
                continue
            ax.barh(y, r["median_ms"], height=bar_h * 0.92, color=color, label=label if gi == 0 else None)
            txt = f" {r['median_ms']:.1f} ms"
            if native is not None and impl != "native":
                txt += f"  (native {r['median_ms'] / native['median_ms']:.1f}x faster)"
            ax.text(r["median_ms"], y, txt, va="center", fontsize=7.5)
        ticks.append(gi)
        shape = "x".join(map(str, data["cases"][case]["input"]))
        labels.append(f"{case} [{shape}]\n{op} {mode}")
    ax.set_xscale("log")
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    xmax = max(r["median_ms"] for r in results.values())
    ax.set_xlim(left=1, right=xmax * 12)
    ax.set_xlabel("median time per call, ms (log scale)")
    ax.grid(axis="x", which="both", alpha=0.25)
    for gi in range(1, len(groups)):
        ax.axhline(gi - 0.5, color="#ddd", linewidth=0.8)
    m, v = data["machine"], data["versions"]
    sha = (v.get("roi_ops_git_sha") or "?")[:10] + ("+dirty" if v.get("roi_ops_git_dirty") else "")
    ax.set_title(f"roi_ops CPU benchmarks, {data['date_utc'][:10]}: {m['cpu_model']}, {data['threads']} threads, "
                 f"torch {v['torch']}, roi_ops {sha}\nfloat32, forward (fwd) and forward+backward (fwd+bwd); "
                 f"THP_MEM_ALLOC_ENABLE={data['env'].get('THP_MEM_ALLOC_ENABLE')}"
                 + (f"; other processes took {share:.0%} of the machine during the run"
                    if (share := data["env"].get("other_processes_share_of_machine")) is not None else ""),
                 fontsize=9.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(f"usage: {sys.argv[0]} RESULTS.json [OUT.png]")
    print(plot(*sys.argv[1:]))
