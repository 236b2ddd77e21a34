"""Report: the adapter benchmark's results turned into its summary (the issue's bar), plot and markdown tables.

Pure functions of the results document that ``adapter_measure.py`` makes; ``adapter_publish.py`` writes what
they return.
"""

from __future__ import annotations

from pathlib import Path


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


# ----------------------------------------------------------------------------------------------- plot and tables
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


def table(doc: dict, json_name: str = "adapter_cpu.json") -> str:
    """Markdown tables from the JSON: one per resolution, one row per N."""
    results = doc["results"]
    methods = [m for m in ("fused", "unfused", "naive", "masked", "masked_xattn") if any(r["method"] == m for r in results)]
    lines = [f"Measured {doc['created']} on {doc['machine']['cpu_model']} ({doc['threads']} threads, load average "
             f"{doc['env']['loadavg_1_5_15min']} before, {doc['loadavg_after']} after), torch "
             f"{doc['versions']['torch']}, from `benchmarks/results/{json_name}`. Times are medians in ms; "
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


