"""``roi-ops train`` end to end on the committed 32 px toy model: outputs, exact resume, cached embeddings,
validation images, Ctrl-C, and one clear line with exit status 2 for every bad input, before any step."""

import json
import os

import pytest
import torch
from training_helpers import TOY_MODEL, write_lines
from safetensors.torch import load_file

from roi_ops.roictrl_adapter import load_adapter
from roi_ops.training.trainer import find_checkpoint

FAST = ["--batch-size", "2", "--learning-rate", "1e-3", "--seed", "0", "--no-progress"]
WEIGHTS = "roictrl_adapter.safetensors"


def _weights(folder):
    return load_file(os.path.join(folder, WEIGHTS))


def _same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def layout_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("layout") / "layout.json"
    path.write_text(json.dumps({"prompt": "a red circle and a blue square", "instances": [
        {"box": [0.1, 0.1, 0.45, 0.45], "caption": "a red circle"},
        {"box": [0.5, 0.5, 0.9, 0.9], "caption": "a blue square"}]}))
    return str(path)


def test_train_writes_every_output_and_a_split_run_ends_where_the_straight_one_does(cli, world_data, tmp_path,
                                                                                     layout_file):
    a, b = tmp_path / "a", tmp_path / "b"
    status, out, err = cli("train", "--model", TOY_MODEL, "--data", world_data, "--output-dir", a, "--max-steps", 4,
                           "--checkpoint-every", 2, "--validation-layout", layout_file, "--validation-every", 2,
                           "--validation-steps", 2, *FAST)
    assert status == 0, err
    assert sorted(p.name for p in a.iterdir()) == ["adapter", "checkpoint-2", "checkpoint-4", "train_log.jsonl",
                                                   "validation"]
    assert sorted(p.name for p in (a / "validation").iterdir()) == ["step-2.png", "step-4.png"]
    log = [json.loads(line) for line in (a / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert set(log[0]) == {"step", "loss", "l_ldm", "l_reg", "lr", "seconds"}
    assert all(r["loss"] == pytest.approx(r["l_ldm"] + 0.01 * r["l_reg"], abs=1e-5) for r in log)
    adapter = load_adapter(a / "adapter")
    # architecture defaults from the toy model folder: VAE factor 2, caption width 64, grids that fit 16/8 maps
    assert {(s.downsample, s.grid) for s in adapter.specs} == {(2, 8), (4, 4)}
    assert adapter.position_dim == 64 and adapter.position_hidden_dim == 128
    state = json.loads((a / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data_position"] == 4 and state["config"]["batch_size"] == 2
    assert _same(_weights(a / "adapter"), _weights(a / "checkpoint-4" / "adapter"))
    # AdamW's fused kernel by default (TrainConfig.fused_optimizer=None: fused on CPU and CUDA)
    optimizer = torch.load(a / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert optimizer["param_groups"][0]["fused"] is True

    status, _, err = cli("train", "--model", TOY_MODEL, "--data", world_data, "--output-dir", b, "--max-steps", 2,
                         *FAST)
    assert status == 0, err
    assert not _same(_weights(b / "adapter"), _weights(a / "adapter"))
    status, _, err = cli("train", "--model", TOY_MODEL, "--data", world_data, "--output-dir", b, "--max-steps", 4,
                         "--resume", *FAST)
    assert status == 0, err
    assert "resumed from" in err and "checkpoint-2" in err
    assert _same(_weights(b / "adapter"), _weights(a / "adapter"))  # bit for bit
    assert len((b / "train_log.jsonl").read_text().splitlines()) == 4

    # --cache-embeddings: the same training (latents encoded in another batch layout: equal to float rounding)
    c = tmp_path / "c"
    status, _, err = cli("train", "--model", TOY_MODEL, "--data", world_data, "--output-dir", c, "--max-steps", 2,
                         "--cache-embeddings", *FAST)
    assert status == 0, err
    cached, plain = _weights(c / "adapter"), _weights(a / "checkpoint-2" / "adapter")
    assert all(torch.allclose(cached[k], plain[k], atol=1e-5) for k in plain)

    # a checkpoint with another batch size cannot continue exactly: refused
    status, _, err = cli("train", "--model", TOY_MODEL, "--data", world_data, "--output-dir", b, "--max-steps", 6,
                         "--resume", *FAST[:0], "--batch-size", "3", "--no-progress")
    assert status == 2 and "--batch-size 2" in err


def test_ctrl_c_keeps_the_last_checkpoint(cli, world_data, tmp_path, monkeypatch):
    from roi_ops.training import trainer

    calls = {"n": 0}
    forward = trainer._Denoiser.forward

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(trainer._Denoiser, "forward", interrupted)
    status, _, err = cli("train", "--model", TOY_MODEL, "--data", world_data, "--output-dir", tmp_path,
                         "--max-steps", 4, "--checkpoint-every", 2, *FAST)
    assert status == 130 and "checkpoint-2" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "train_log.jsonl"]
    load_adapter(tmp_path / "checkpoint-2" / "adapter")
    # a folder being written (temporary name) or without trainer_state.json is never resumed from
    (tmp_path / ".tmp-checkpoint-4").mkdir()
    (tmp_path / ".tmp-checkpoint-4" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-6").mkdir()
    assert find_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")


def _foreign_adapter(folder) -> str:
    """An adapter for a UNet of another width than the toy model's."""
    from diffusers import UNet2DConditionModel

    from instance_control import models
    from roi_ops.roictrl_adapter import ROICtrlAdapter

    unet = UNet2DConditionModel(**models.unet_config(block_out_channels=(16, 32)))
    ROICtrlAdapter.from_unet(unet, grid_sizes={2: 4, 4: 3}, vae_scale_factor=2, position_dim=16,
                             position_hidden_dim=16).save_pretrained(folder)
    return os.fspath(folder)


GOOD = {"file_name": "a.png", "prompt": "p", "instances": [{"box": [0.1, 0.1, 0.5, 0.5], "caption": "c"}]}


@pytest.mark.parametrize("case", ["malformed line", "missing image", "undecodable image", "empty dataset",
                                  "no unet", "foreign init adapter", "bad resolution", "bad adapter config",
                                  "tracker not installed"])
def test_bad_input_is_one_line_and_exit_status_2(cli, world_data, tmp_path, case):
    args = {"--model": TOY_MODEL, "--data": world_data, "--output-dir": tmp_path / "out"}
    expect = {
        "malformed line": "metadata.jsonl:2: instances[0] box",
        "missing image": "metadata.jsonl:1: image 'b.png': no such file",
        "undecodable image": "metadata.jsonl:1: image 'a.png' cannot be decoded",
        "empty dataset": "empty dataset",
        "no unet": "has no UNet",
        "foreign init adapter": "--init-adapter: ROICtrlAdapter does not fit",
        "bad resolution": "--resolution 30 is not a positive multiple of 4",
        "bad adapter config": "--adapter-config",
        "tracker not installed": "--report-to wandb: the wandb package is not installed",
    }[case]
    if case == "malformed line":
        args["--data"] = write_lines(tmp_path / "d", [GOOD, {**GOOD, "instances": [{"box": [1, 2], "caption": "c"}]}])
    elif case == "missing image":
        args["--data"] = write_lines(tmp_path / "d", [{**GOOD, "file_name": "b.png"}])
    elif case == "undecodable image":
        args["--data"] = write_lines(tmp_path / "d", [GOOD])
        (tmp_path / "d" / "a.png").write_bytes(b"not an image")
    elif case == "empty dataset":
        args["--data"] = write_lines(tmp_path / "d", [])
    elif case == "no unet":
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "model_index.json").write_text("{}")
        args["--model"] = tmp_path / "m"
    elif case == "foreign init adapter":
        args["--init-adapter"] = _foreign_adapter(tmp_path / "foreign")
    elif case == "bad resolution":
        args["--resolution"] = 30
    elif case == "bad adapter config":
        (tmp_path / "cfg.json").write_text('{"no_such_option": 1}')
        args["--adapter-config"] = tmp_path / "cfg.json"
    elif case == "tracker not installed":
        import importlib.util

        if importlib.util.find_spec("wandb") is not None:
            pytest.skip("wandb is installed")
        args["--report-to"] = "wandb"
    argv = [x for kv in args.items() for x in kv]
    status, out, err = cli("train", *argv, "--max-steps", 1, *FAST)
    lines = err.strip().splitlines()
    assert status == 2, err
    assert lines[-1].startswith("roi-ops train: error: ") and expect in lines[-1], err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "train_log.jsonl").exists()


def test_sdxl_tiny_model_trains_with_both_encoders_and_time_ids(cli, world_data, tmp_path, monkeypatch):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "adapter"))
    from tiny_pipelines import make_sdxl_pipeline

    from roi_ops.training import trainer

    model = tmp_path / "sdxl"
    make_sdxl_pipeline(tmp_path / "build").save_pretrained(model)
    seen = []
    forward = trainer._Denoiser.forward

    def spy(self, noisy, t, text, instances, added=None):
        seen.append((text.shape, instances.embeddings.shape, {k: v.shape for k, v in (added or {}).items()}))
        return forward(self, noisy, t, text, instances, added)

    monkeypatch.setattr(trainer._Denoiser, "forward", spy)
    status, _, err = cli("train", "--model", model, "--data", world_data, "--output-dir", tmp_path / "out",
                         "--max-steps", 2, *FAST)
    assert status == 0, err
    # 64 px (the model's own size: 8 x VAE factor 8); prompts and captions: both encoders' states (16 + 16)
    text, emb, added = seen[0]
    assert text[0] == 2 and text[-1] == 32 and emb[-1] == 32
    assert added == {"text_embeds": (2, 16), "time_ids": (2, 6)}
    adapter = load_adapter(tmp_path / "out" / "adapter")
    from diffusers import UNet2DConditionModel

    adapter.check_compatible(UNet2DConditionModel.from_pretrained(model / "unet"))
    assert {(s.downsample, s.grid) for s in adapter.specs} == {(16, 2)}  # SDXL's cross-attention at 4x4 maps
