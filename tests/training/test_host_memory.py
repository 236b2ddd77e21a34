"""``roi_ops.training.host_memory``: glibc keeps freed memory (no page faults when it is allocated again), and
``roi-ops train`` turns it on for a CPU run unless ``--release-host-memory``."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
from training_helpers import TOY_MODEL

# Fewest faults of one allocation of a 64 MiB tensor, written in full and freed, over 8 in a row (a fresh process;
# the fewest, because a retained heap may still grow once or twice where a small allocation split its free space).
_PROBE = """
import resource, sys, torch
if sys.argv[1] == "retain":
    from roi_ops.training.host_memory import retain_freed_host_memory
    assert retain_freed_host_memory() is True and retain_freed_host_memory() is True
counts = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold, so mmapped by default
    x.fill_(1.0)
    del x
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(counts[2:]))
"""


def _faults(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only")
def test_retained_memory_is_reused_without_page_faults():
    pages = 64 * 2**20 // 4096
    assert _faults("release") >= pages // 2  # glibc's default: every allocation maps and zeroes its pages anew
    assert _faults("retain") < pages // 50


def test_train_retains_host_memory_on_the_cpu_unless_told_not_to(cli, world_data, tmp_path, monkeypatch):
    import roi_ops.training.trainer as trainer

    calls = []
    monkeypatch.setattr(trainer, "retain_freed_host_memory", lambda: calls.append(1) or True)
    common = ["--model", TOY_MODEL, "--data", world_data, "--max-steps", 1, "--batch-size", 2, "--no-progress"]
    status, _, err = cli("train", *common, "--output-dir", tmp_path / "a")
    assert status == 0, err
    assert calls == [1]
    status, _, err = cli("train", *common, "--output-dir", tmp_path / "b", "--release-host-memory")
    assert status == 0, err
    assert calls == [1]
