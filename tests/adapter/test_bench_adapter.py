"""The adapter benchmark runs end to end (small shapes) and its summary states the issue's bar from its own rows."""

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_adapter.py")


def test_quick_run_writes_json_plot_and_the_bar(tmp_path):
    out, png = tmp_path / "a.json", tmp_path / "a.png"
    subprocess.run(
        [sys.executable, BENCH, "--quick", "--resolutions", "1024px", "--counts", "1,25",
         "--json", str(out), "--png", str(png)],
        check=True, capture_output=True, text=True, env=dict(os.environ, ROI_OPS_BENCH_THREADS="1"), timeout=600,
    )
    doc = json.loads(out.read_text())
    assert png.stat().st_size > 0 and doc["quick"] and doc["threads"] == 1
    rows = {(r["method"], r["n"]): r for r in doc["results"]}
    assert set(rows) == {(m, n) for m in ("fused", "naive", "masked", "masked_xattn") for n in (1, 25)}
    assert all(r["status"] == "ok" and r["input_grads_finite"] for r in rows.values())
    bar = doc["summary"]["1024px_N25"]
    f, nv = rows[("fused", 25)], rows[("naive", 25)]
    assert bar["training_peak_fused_over_naive"] == round(f["training_peak_mib"] / nv["training_peak_mib"], 4)
    for name in ("masked", "masked_xattn"):
        speed = rows[(name, 25)]["fwd"]["median_ms"] / f["fwd"]["median_ms"]
        assert bar[f"fwd_speedup_fused_vs_{name}"] == round(speed, 3)
        assert bar[f"fwd_at_least_2.4x_faster_than_{name}"] == (speed >= 2.4)
    growth = doc["summary"]["growth_smallest_to_largest_n"]["1024px/fused"]
    assert (growth["from_n"], growth["to_n"]) == (1, 25)
