"""GLIGEN + pixel positions (``gligen_positions.py``, ``train.py --gligen-pixel-positions``): the embedding is
the documented Fourier embedding of pixel centres, the zero-initialised projection makes the variant exactly
diffusers' GLIGEN at initialisation, it reaches only the fuser's attention, and a checkpoint trained with it is
rebuilt by ``evaluate.load_pipelines(ckpt, ("gligen", "none"))`` from its folder alone."""

import math
import os
import shutil

import pytest
import torch

from instance_control import evaluate, gligen_positions, models, train, world
from tiny_gligen import tiny_gligen

CKPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "instance_control", "checkpoints")


def test_embedding_is_the_fourier_family_of_pixel_centres():
    h, w, freqs = 2, 3, 4
    emb = gligen_positions.pixel_fourier_embedding(h, w, freqs)
    assert emb.shape == (h * w, 4 * freqs)
    for i in range(h):
        for j in range(w):
            x, y = (j + 0.5) / w, (i + 0.5) / h  # row-major, as Transformer2DModel flattens [B, C, H, W]
            want = []
            for k in range(freqs):
                f = 100 ** (k / freqs)
                want += [math.sin(f * x), math.cos(f * x), math.sin(f * y), math.cos(f * y)]
            torch.testing.assert_close(emb[i * w + j], torch.tensor(want), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="height, width and freqs"):
        gligen_positions.pixel_fourier_embedding(0, 3)


def _run(unet):
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, models.TEXT_WIDTH, generator=g)
    kw = {"gligen": {"boxes": torch.rand(2, 30, 4, generator=g), "masks": torch.ones(2, 30),
                     "positive_embeddings": torch.randn(2, 30, models.TEXT_WIDTH, generator=g)}}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), text, cross_attention_kwargs=kw).sample


def test_zero_initialised_projection_is_plain_gligen_and_only_the_attention_sees_positions():
    plain = tiny_gligen()
    variant = tiny_gligen()
    new = gligen_positions.install(variant)
    fusers = [m for m in variant.modules() if gligen_positions.has_pixel_positions(m)]
    assert len(fusers) == 7 and len(new) == 14  # a weight and a bias per fuser of the 7 transformer blocks
    assert all(p.abs().sum() == 0 for n, p in variant.named_parameters() if n in new)
    assert torch.equal(_run(plain), _run(variant))
    assert sorted({f.pixel_grid_hw for f in fusers}) == [(8, 8), (16, 16)]  # the hook saw both map sizes
    with torch.no_grad():
        for n, p in variant.named_parameters():
            if n in new:
                p.normal_()
    assert not torch.allclose(_run(plain), _run(variant), atol=1e-4)
    # the fuser's residual is not shifted by the embedding: with the attention gate shut it is plain again
    for unet in (plain, variant):
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if n.endswith("alpha_attn"):
                    p.zero_()
    torch.testing.assert_close(_run(plain), _run(variant), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="pixel positions already"):
        gligen_positions.install(variant)
    # StableDiffusionGLIGENPipeline.enable_fuser (scheduled sampling) matches the exact class: still switches them
    from diffusers.models.attention import GatedSelfAttentionDense

    assert all(type(f) is GatedSelfAttentionDense for f in fusers)


@pytest.mark.skipif(not os.path.isdir(os.path.join(CKPT, "model")), reason="the committed toy model is missing")
def test_a_variant_checkpoint_reloads_through_load_pipelines(tmp_path):
    out = str(tmp_path)
    shutil.copytree(os.path.join(CKPT, "model"), os.path.join(out, "model"))
    train.main(["--out", out, "--smoke", "--threads", "1", "--stages", "gligen", "--gligen-pixel-positions"])
    folder = os.path.join(out, "gligen")
    assert os.path.isfile(os.path.join(folder, gligen_positions.CONFIG_NAME))
    from safetensors.torch import load_file

    saved = load_file(os.path.join(folder, "gligen.safetensors"))
    proj = {n: t for n, t in saved.items() if gligen_positions.PROJ in n}
    assert len(proj) == 2 * 7  # 7 fusers in the toy UNet, weight and bias each; trained 3 steps
    assert any(t.abs().sum() > 0 for t in proj.values())
    from diffusers import UNet2DConditionModel

    unet = train.load_gligen_unet(out, UNet2DConditionModel.from_pretrained(os.path.join(out, "model", "unet")))
    for n, p in unet.named_parameters():
        if n in saved:
            assert torch.equal(p.detach(), saved[n]), n
    # the plain GLIGEN folder (no config) loads as diffusers' GLIGEN, without the layers
    os.remove(os.path.join(folder, gligen_positions.CONFIG_NAME))
    with pytest.raises(ValueError, match="expected the GLIGEN UNet"):
        train.load_gligen_unet(out, UNet2DConditionModel.from_pretrained(os.path.join(out, "model", "unet")))
    gligen_positions.save_config(folder)

    pipes = evaluate.load_pipelines(out, ("gligen", "none"))
    layout = world.eval_layouts(1, (2,))[2][0]
    images = pipes["gligen"](layout, evaluate.generators((0,), layout), num_inference_steps=2, guidance_scale=3.0,
                             height=models.RESOLUTION, width=models.RESOLUTION)
    assert images.shape == (1, 3, models.RESOLUTION, models.RESOLUTION) and torch.isfinite(torch.from_numpy(images)).all()


def test_attention_probe_measures_own_box_share_and_box_similarity():
    from instance_control import gligen_attention

    masks = torch.tensor([[1, 1, 0], [1, 1, 1]])
    same = torch.ones(2, 3, 4)
    apart = torch.eye(3, 4).expand(2, 3, 4)
    assert gligen_attention._mean_pair_cosine(same, masks) == pytest.approx(1.0)
    assert gligen_attention._mean_pair_cosine(apart, masks) == pytest.approx(0.0)
    inside = gligen_attention._inside((2, 2), torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 1.0]]]),
                                      torch.tensor([[1, 0]]))
    assert inside[0, :, 0].tolist() == [True, False, False, False] and not inside[0, :, 1].any()  # masked box


@pytest.mark.skipif(not os.path.isdir(os.path.join(CKPT, "model")), reason="the committed toy model is missing")
def test_attention_probe_on_the_untrained_layers():
    from instance_control import gligen_attention

    torch.set_num_threads(1)
    rows = gligen_attention.probe(CKPT, gligen_attention.INIT)
    assert len(rows) == 7 and sorted({tuple(r["map"]) for r in rows}) == [(8, 8), (16, 16)]
    for r in rows:  # untrained: attention to the own box at chance, the boxes' grounding tokens still distinct
        assert abs(r["own_share"] - r["chance"]) < 0.01 and 0.3 < r["cos_objs"] < 0.9, r


def _box_token_cosine(gligen):
    """Mean pairwise cosine of the box tokens as every fuser's attention sees them (after its ``norm1``)."""
    from diffusers.models.attention import GatedSelfAttentionDense

    g = torch.Generator().manual_seed(2)
    boxes = torch.rand(1, 6, 4, generator=g).sort(-1).values[..., [0, 2, 1, 3]]  # x1 <= x2, y1 <= y2
    objs = gligen.position_net(boxes=boxes, masks=torch.ones(1, 6),
                               positive_embeddings=8 * torch.nn.functional.normalize(
                                   torch.randn(1, 6, models.TEXT_WIDTH, generator=g), dim=-1))
    sims = []
    for f in gligen.modules():
        if isinstance(f, GatedSelfAttentionDense):
            t = torch.nn.functional.normalize(f.norm1(f.linear(objs))[0], dim=-1)
            sims.append(((t @ t.T).sum() - 6) / 30)
    return torch.stack(sims).mean().item()


def test_distinct_box_tokens_zeroes_the_shared_biases():
    plain = tiny_gligen()
    distinct = tiny_gligen()
    train.distinct_box_tokens(distinct)
    changed = {n for (n, p), q in zip(plain.named_parameters(), distinct.parameters()) if not torch.equal(p, q)}
    assert changed and all(n == "position_net.linears.4.bias" or n.endswith(".fuser.linear.bias") for n in changed)
    assert all(distinct.get_parameter(n).abs().sum() == 0 for n in changed)
    with torch.no_grad():  # default init: the shared bias dominates, the box tokens look alike (docs/gligen_toy.md)
        assert _box_token_cosine(plain) > 0.85 and _box_token_cosine(distinct) < 0.7


def test_box_token_path_has_its_own_learning_rate_group():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    gligen, new = models.gligen_unet_from_base(UNet2DConditionModel(**models.unet_config()))
    groups = train.gligen_param_groups(gligen, new, 0.1, None, lr_scale_tokens=0.05)
    names = {id(p): n for n, p in gligen.named_parameters()}
    by_scale = {g["lr_scale"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert set(by_scale) == {1.0, 0.1, 0.05}
    tokens = by_scale[0.05]
    assert tokens == {n for n in new if n.startswith("position_net.") or ".fuser.linear." in n}
    assert all(n.endswith(("alpha_attn", "alpha_dense")) for n in by_scale[0.1])
    assert set().union(*by_scale.values()) == new  # the frozen base is in no group


def test_randomly_initialised_positions_change_nothing_while_the_gates_are_shut():
    plain, variant = tiny_gligen(), tiny_gligen()
    torch.manual_seed(3)
    new = gligen_positions.install(variant, init="random")
    assert all(variant.get_parameter(n).abs().sum() > 0 for n in new if n.endswith("weight"))
    assert not torch.allclose(_run(plain), _run(variant), atol=1e-4)  # gates at 0.5: the positions matter
    for unet in (plain, variant):
        with torch.no_grad():
            for n, p in unet.named_parameters():
                if n.endswith(("alpha_attn", "alpha_dense")):
                    p.zero_()
    torch.testing.assert_close(_run(plain), _run(variant), rtol=0, atol=0)
    with pytest.raises(ValueError, match="init must be 'zero' or 'random'"):
        gligen_positions.install(tiny_gligen(), init="ones")
