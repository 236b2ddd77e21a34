"""A smoke run of the whole instance-control reproduction: every training stage (a few steps) and the evaluation
of all three methods on the result, through the same entry points `make quality` runs."""

import json
import os

import pytest

from instance_control import evaluate, train


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ic_smoke"))
    train.main(["--out", out, "--smoke", "--threads", "2"])
    return out


def test_training_writes_loadable_checkpoints(smoke_run):
    from diffusers import StableDiffusionPipeline

    from roi_ops.roictrl_adapter import ROICtrlAdapter

    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(smoke_run, "model"), safety_checker=None)
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.cross_attention_dim == 64
    ROICtrlAdapter.from_pretrained(os.path.join(smoke_run, "roictrl"), unet=pipe.unet)
    gligen = train.load_gligen_unet(smoke_run, pipe.unet)
    assert gligen.config.attention_type == "gated"
    # GLIGEN starts from the base weights: the shared parameters are the base UNet's.
    base = dict(pipe.unet.named_parameters())
    assert all((p == base[n]).all() for n, p in gligen.named_parameters() if n in base)
    with open(os.path.join(smoke_run, "train_config_vae_base_decoder_roictrl_gligen.json")) as f:
        assert json.load(f)["command"].startswith("python -m benchmarks.instance_control.train")


def test_gligen_stage_does_not_depend_on_the_global_rng(smoke_run, tmp_path):
    """The GLIGEN stage seeds its new layers' initialisation itself, as the ROICtrl stage does."""
    import shutil

    import torch
    from safetensors.torch import load_file

    states = []
    for rng_seed in (123, 456):
        out = str(tmp_path / f"run{rng_seed}")
        shutil.copytree(smoke_run, out)
        torch.manual_seed(rng_seed)
        train.main(["--out", out, "--smoke", "--threads", "2", "--stages", "gligen"])
        states.append(load_file(os.path.join(out, "gligen", "gligen.safetensors")))
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_region_stage_trains_only_the_region_vectors(smoke_run, tmp_path):
    """The ROICtrl stage with and without its region stage: every other weight bitwise the same (the region
    vectors, zero at init, draw no random numbers and stay frozen in the box stage), the region vectors trained."""
    import shutil

    import torch
    from safetensors.torch import load_file

    out = str(tmp_path / "boxes_only")
    shutil.copytree(smoke_run, out)
    train.main(["--out", out, "--smoke", "--threads", "2", "--stages", "roictrl", "--region-steps", "0"])
    boxes = load_file(os.path.join(out, "roictrl", "roictrl_adapter.safetensors"))
    both = load_file(os.path.join(smoke_run, "roictrl", "roictrl_adapter.safetensors"))
    region = {k for k in both if k.endswith((".region_outside", ".region_outside_gate"))}
    assert region and set(both) - region == set(boxes)
    assert all(torch.equal(boxes[k], both[k]) for k in boxes)
    assert all(both[k].abs().max() > 0 for k in region)


def test_ablations_train_through_the_trainer_and_reload(smoke_run):
    """--ablation trains the ROICtrl stage with one part removed; the saved adapter reloads as that ablation."""
    from diffusers import UNet2DConditionModel

    from instance_control import ablations

    unet = UNet2DConditionModel.from_pretrained(os.path.join(smoke_run, "model", "unet"))
    train.main(["--out", smoke_run, "--smoke", "--threads", "2", "--stages", "roictrl", "--ablation", "no_guidance"])
    adapter = ablations.load(os.path.join(smoke_run, "ablations", "no_guidance"), unet)
    # frozen at 0: the path adds exactly nothing, while the other gates trained
    assert all(b.guide_attn_gate.item() == 0 and b.guide_ff_gate.item() == 0 for b in adapter.blocks)
    assert any(b.roi_gate.item() != 0 for b in adapter.blocks)
    with open(os.path.join(smoke_run, "train_config_roictrl_no_guidance.json")) as f:
        assert "--ablation no_guidance" in json.load(f)["command"]
    masked = ablations.apply(train.make_roictrl_adapter(unet, 0), "masked_attn")
    assert all(type(b).__name__ == "MaskedAttnROICtrlBlock" and b.masked_self_attention for b in masked.blocks)
    with pytest.raises(SystemExit):
        train.main(["--out", smoke_run, "--smoke", "--stages", "gligen", "--ablation", "no_reg"])


def test_evaluation_runs_every_kind_of_method_on_both_tracks(smoke_run, tmp_path):
    methods = ("none", "regional", "gligen", "roictrl_no_guidance")  # one of each kind (roictrl = an ablation's path)
    if not os.path.isdir(os.path.join(smoke_run, "ablations", "no_guidance")):
        train.main(["--out", smoke_run, "--smoke", "--threads", "2", "--stages", "roictrl", "--ablation", "no_guidance"])
    record = evaluate.main(["--ckpt", smoke_run, "--out", str(tmp_path), "--per-level", "1", "--levels", "2,3",
                            "--overlap-per-level", "1", "--overlap-levels", "3", "--seeds", "0,1", "--steps", "2", "--grid-per-level", "1",
                            "--methods", ",".join(methods)])
    for track, levels in (("main", {"L2", "L3"}), ("overlap", {"L3"})):
        part = record["tracks"][track]
        assert set(part["methods"]) == set(methods)
        for method in part["methods"].values():
            assert set(method["levels"]) == levels
            for m in evaluate.METRICS:
                stats = method["average"][m]
                assert len(stats["per_seed"]) == 2 and 0 <= stats["mean"] <= 1
    assert record["tracks"]["main"]["ground_truth"]["average"]["isr"] >= 0.9
    assert os.path.getsize(tmp_path / "grid.png") > 1000
    with open(tmp_path / "results.json") as f:
        assert json.load(f)["settings"]["steps"] == 2
    assert "### Track: overlap" in (tmp_path / "table.md").read_text()
