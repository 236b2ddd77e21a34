"""examples/train_roictrl.py: checkpoints, exact resumption, and DDP with 2 CPU processes (gloo)."""

import importlib.util
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from roi_ops.roictrl_adapter import ROICtrlAdapter

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_roictrl.py"
FAST = ["--batch-size", "2", "--resolution", "64", "--max-instances", "2", "--no-progress"]


def _example():
    spec = importlib.util.spec_from_file_location("train_roictrl", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dataset_is_deterministic_and_matches_its_captions():
    ex = _example()
    img, boxes, mask, captions, caption = ex.make_sample(3, 64, 3, seed=0)
    img2, *_ = ex.make_sample(3, 64, 3, seed=0)
    assert torch.equal(img, img2) and img.shape == (3, 64, 64) and img.min() >= -1 and img.max() <= 1
    n = int(mask.sum())
    assert 1 <= n <= 3 and all(c for c in captions[:n]) and not any(captions[n:])
    assert caption == "a photo of " + " and ".join(captions[:n])
    assert (boxes[:n, 2:] > boxes[:n, :2]).all() and (boxes[:n] >= 0).all() and (boxes[:n] <= 1).all()
    # the last-drawn shape's colour is at the centre of its box
    color, shape = captions[n - 1].split()[1:]
    cx, cy = ((boxes[n - 1, 0] + boxes[n - 1, 2]) / 2 * 64).long(), ((boxes[n - 1, 1] + boxes[n - 1, 3]) / 2 * 64).long()
    torch.testing.assert_close(img[:, cy, cx], torch.tensor(ex.COLORS[color]) * 2 - 1)


def test_training_checkpoints_and_resumes_exactly(tmp_path):
    ex = _example()
    straight = ex.main(["--output-dir", str(tmp_path / "a"), "--steps", "3", "--checkpoint-every", "2", *FAST])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter", "checkpoint-000002", "checkpoint-000003"]
    assert not straight.is_installed

    ex.main(["--output-dir", str(tmp_path / "b"), "--steps", "2", "--checkpoint-every", "2", *FAST])
    resumed = ex.main(["--output-dir", str(tmp_path / "b"), "--steps", "3", "--checkpoint-every", "2", "--resume", *FAST])
    assert _same(straight.state_dict(), resumed.state_dict())
    saved = ROICtrlAdapter.from_pretrained(tmp_path / "b" / "adapter")
    assert _same(saved.state_dict(), resumed.state_dict())

    initial = ex.main(["--output-dir", str(tmp_path / "c"), "--steps", "0", *FAST])
    assert not _same(initial.state_dict(), straight.state_dict())
    gates = [k for k, v in straight.state_dict().items() if v.dim() == 0]
    assert gates and all(straight.state_dict()[k] != 0 for k in gates)  # the zero-initialised gates learn


def _ddp_worker(rank: int, world: int, out_dir: str, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        adapter = _example().main(["--output-dir", out_dir, "--steps", "1", *FAST])
        save_file({k: v.contiguous() for k, v in adapter.state_dict().items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_two_cpu_processes_keep_adapter_weights_identical(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), _free_port()), nprocs=2, join=True)
    rank0 = load_file(tmp_path / "rank0.safetensors")
    rank1 = load_file(tmp_path / "rank1.safetensors")
    assert _same(rank0, rank1)
    initial = _example().main(["--output-dir", str(tmp_path / "init"), "--steps", "0", *FAST]).state_dict()
    assert not _same(rank0, initial)
    # Each rank saw different samples, so a single-process step on rank 0's batch would differ from the DDP step.
    single = _example().main(["--output-dir", str(tmp_path / "single"), "--steps", "1", *FAST]).state_dict()
    assert not _same(rank0, single)
