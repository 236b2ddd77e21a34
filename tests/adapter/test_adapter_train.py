"""examples/train_roictrl.py: the synthetic world written as a data folder and trained by ``roi-ops train``, in
one process and in 2 CPU processes (gloo, through Accelerate, with no code change)."""

import importlib.util
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_roictrl.py"
FAST = ["--num-samples", "8", "--max-steps", "2", "--learning-rate", "1e-3", "--no-progress"]
WEIGHTS = "roictrl_adapter.safetensors"


def _example():
    spec = importlib.util.spec_from_file_location("train_roictrl", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _ddp_worker(rank: int, world: int, out_dir: str, data: str, port: int):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        assert _example().main(["--output-dir", out_dir, "--data", data, "--batch-size", "2", *FAST]) == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_cpu_processes_train_what_one_process_at_twice_the_batch_trains(tmp_path):
    """The processes share one global batch draw (samples, latents, noise, timesteps), so 2 x batch 2 is the
    training of 1 x batch 4 up to float rounding and L_reg's per-process normalisation (docs/training.md)."""
    data = str(tmp_path / "data")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    assert _example().main(["--output-dir", str(tmp_path / "single"), "--data", data, "--batch-size", "4", *FAST]) == 0
    with open(os.path.join(data, "metadata.jsonl")) as f:
        assert len(f.read().splitlines()) == 8  # the world's layouts, written once and reused
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "ddp"), data, _free_port()), nprocs=2, join=True)
    ckpt = tmp_path / "ddp" / "checkpoint-2"
    assert (ckpt / "rng_state_0.pt").is_file() and (ckpt / "rng_state_1.pt").is_file()
    assert json.loads((ckpt / "trainer_state.json").read_text())["num_processes"] == 2
    single = load_file(tmp_path / "single" / "adapter" / WEIGHTS)
    ddp = load_file(tmp_path / "ddp" / "adapter" / WEIGHTS)
    initial_gate = [k for k, v in single.items() if v.dim() == 0]
    assert initial_gate and all(single[k] != 0 for k in initial_gate)  # the zero-initialised gates learnt
    assert all(torch.allclose(ddp[k], single[k], atol=1e-5) for k in single)
