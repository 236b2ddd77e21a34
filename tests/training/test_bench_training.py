"""benchmarks/bench_training.py --quick: the JSON's structure, and ratios that come from its own rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_training  # noqa: E402


@pytest.fixture(scope="module")
def quick_doc(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "training.json"
    # plain and uncached adapter, checkpointing off and on: every ratio kind; --quick runs them in one worker
    # process (one torch import), which keeps this under 30 s on an idle 2-core machine.
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_training.py"), "--quick", "--modes",
           "plain,adapter_uncached", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text()), proc.stdout


def test_structure(quick_doc):
    doc, _ = quick_doc
    for key in ("machine", "versions", "threads", "loadavg_before", "loadavg_after", "setup", "measurement",
                "configs", "ratios", "command", "created"):
        assert key in doc, key
    assert doc["quick"] is True and doc["one_process"] is True and doc["complete"] is True
    assert len(doc["loadavg_before"]) == 3 and doc["planned"] == list(doc["configs"])
    assert {"torch", "diffusers"} <= set(doc["versions"])
    assert "fused=True" in doc["setup"]["optimizer"] and "retain_freed_host_memory" in doc["setup"]["host_memory"]
    assert list(doc["configs"]) == ["plain", "adapter_uncached", "plain+ckpt", "adapter_uncached+ckpt"]
    for name, row in doc["configs"].items():
        assert row["status"] == "ok", (name, row.get("reason"))
        assert row["host_memory_retained"] is (sys.platform == "linux")  # --host-memory retain, the default
        steps = row["steps"]
        assert [s["warmup"] for s in steps] == [True, False]
        assert all(s["peak_mib"] >= s["rss_before_mib"] > 0 for s in steps)
        stats = row["stats"]
        timed = [s for s in steps if not s["warmup"]]
        assert stats["step_s"]["all"] == [round(s["step_s"], 4) for s in timed]
        assert stats["step_s"]["min"] <= stats["step_s"]["median"] <= stats["step_s"]["max"]
        assert stats["above_setup_mib"]["all"] == [round(s["peak_mib"] - row["rss_after_setup_mib"], 4) for s in timed]
        assert row["unet_got_gradients"] is False
        layers = 4  # the quick UNet: 1 cross-attention transformer block down, 1 mid, 2 up
        calls = stats["calls_per_step"]
        factor = 2 if row["checkpointing"] else 1  # checkpointing recomputes the blocks in the backward
        assert calls["unet_transformer_blocks"] == factor * layers
        if row["mode"] == "adapter_uncached":
            assert calls["adapter_blocks"] == factor * layers
            assert stats["encode_s"]["median"] > 0
            assert row["adapter_tensors_changed"] == row["adapter_tensors"] > 0  # the optimizer trained it
        else:
            assert calls["adapter_blocks"] == 0 and row["adapter_tensors"] is None


def test_ratios_come_from_its_own_rows(quick_doc):
    doc, stdout = quick_doc
    rows = doc["configs"]
    assert set(doc["ratios"]) == {"adapter_uncached", "adapter_uncached+ckpt", "plain: ckpt over no ckpt",
                                  "adapter_uncached: ckpt over no ckpt"}
    for name, base in (("adapter_uncached", "plain"), ("adapter_uncached+ckpt", "plain+ckpt")):
        r = doc["ratios"][name]
        assert r["over"] == base
        for key, stat in (("step_time", "step_s"), ("peak_memory", "peak_mib"),
                          ("above_setup_memory", "above_setup_mib")):
            num, den = rows[name]["stats"][stat]["median"], rows[base]["stats"][stat]["median"]
            if den <= 0:  # the tiny plain step may add no measurable RSS (or lose some to reclaim): no ratio
                assert r[key] is None
            else:
                assert r[key] == pytest.approx(num / den, abs=1e-3)
    r = doc["ratios"]["plain: ckpt over no ckpt"]
    assert r["step_time"] == pytest.approx(
        rows["plain+ckpt"]["stats"]["step_s"]["median"] / rows["plain"]["stats"]["step_s"]["median"], abs=1e-3)
    # recomputing the ratios from the rows gives the JSON's (the function is the one the run used)
    assert bench_training.ratios(rows) == doc["ratios"]
    # the table is made from the JSON: its ratio cells are the JSON's
    table = bench_training.table(doc)
    assert f"{doc['ratios']['adapter_uncached']['step_time']:.2f}x" in table
    assert "| adapter_uncached | on |" in table and str(doc["loadavg_before"]) in table
    assert table.splitlines()[0] in stdout


def test_ratios_follow_edited_rows(quick_doc):
    """A ratio is not a stored constant: doubling the baseline's median halves it."""
    doc, _ = quick_doc
    rows = json.loads(json.dumps(doc["configs"]))
    rows["plain"]["stats"]["step_s"]["median"] *= 2
    before = doc["ratios"]["adapter_uncached"]["step_time"]
    after = bench_training.ratios(rows)["adapter_uncached"]["step_time"]
    assert after == pytest.approx(before / 2, rel=0.01, abs=2e-3)
