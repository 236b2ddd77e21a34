"""The box mask of GLIGEN's fusers (``gligen_oracle.py``): the diagnostic that hands the fusers their boxes, and
the training curriculum (``train.py --gligen-box-mask-curriculum``) that fades it out, so the saved model is
GLIGEN's fuser (+ pixel positions) again."""

import os
import shutil

import pytest
import torch

from instance_control import gligen_oracle, gligen_positions, models, train
from tiny_gligen import tiny_gligen

CKPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "instance_control", "checkpoints")


def test_inside_marks_pixel_centres_in_real_boxes():
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]])
    got = gligen_oracle.inside((2, 2), boxes, torch.tensor([[1.0, 1.0, 0.0]]))
    # pixels row-major: (0,0) (0,1) (1,0) (1,1) -> centres x, y in {0.25, 0.75}
    assert got[0, :, 0].tolist() == [True, False, False, False]
    assert got[0, :, 1].tolist() == [False, True, False, True]
    assert not got[0, :, 2].any()  # a padded slot is in no pixel's box


def test_curriculum_schedule():
    assert [gligen_oracle.strength_at(s, 2, 6, 8.0) for s in (0, 1, 2, 4, 6, 9)] == [8.0, 8.0, 8.0, 4.0, 0.0, 0.0]
    assert train.gligen_curriculum("") is None and train.gligen_curriculum("200,800") == (200, 800)
    for bad in ("200", "8,2", "a,b"):
        with pytest.raises(ValueError, match="gligen-box-mask-curriculum"):
            train.gligen_curriculum(bad)


def _run(unet, embeddings=None):
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, models.TEXT_WIDTH, generator=g)
    boxes = torch.zeros(2, 30, 4)
    boxes[:, 0] = torch.tensor([0.1, 0.1, 0.6, 0.5])
    boxes[:, 1] = torch.tensor([0.5, 0.5, 0.5, 0.9])  # zero width: holds no pixel centre
    masks = torch.zeros(2, 30)
    masks[:, :2] = 1
    if embeddings is None:
        embeddings = torch.randn(2, 30, models.TEXT_WIDTH, generator=g)
    kw = {"gligen": {"boxes": boxes, "masks": masks, "positive_embeddings": embeddings}}
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), text, cross_attention_kwargs=kw).sample


def test_mask_hides_boxes_outside_a_pixel_and_strength_zero_is_the_plain_fuser():
    plain, masked = tiny_gligen(True), tiny_gligen(True)
    fusers = gligen_oracle.install(masked, strength=0.0)
    assert len(fusers) == 7
    torch.testing.assert_close(_run(masked), _run(plain), rtol=0, atol=0)  # strength 0: the unmasked fuser
    e = torch.randn(2, 30, models.TEXT_WIDTH, generator=torch.Generator().manual_seed(5))
    e2 = e.clone()
    e2[:, 1] += 3  # the phrase of the box that holds no pixel
    assert not torch.allclose(_run(plain, e), _run(plain, e2), atol=1e-4)  # unmasked, every pixel sees it
    gligen_oracle.set_strength(fusers, gligen_oracle.MASKED)
    torch.testing.assert_close(_run(masked, e), _run(masked, e2), rtol=0, atol=1e-6)  # masked, no pixel does
    assert not torch.allclose(_run(masked, e), _run(plain, e), atol=1e-4)
    with pytest.raises(RuntimeError, match="box mask already"):
        gligen_oracle.install(masked)
    gligen_oracle.install(tiny_gligen(False))  # works without pixel positions too (records the map size itself)


@pytest.mark.skipif(not os.path.isdir(os.path.join(CKPT, "model")), reason="the committed toy model is missing")
def test_curriculum_run_saves_an_unmasked_model_and_masked_snapshots(tmp_path):
    out = str(tmp_path)
    shutil.copytree(os.path.join(CKPT, "model"), os.path.join(out, "model"))
    train.main(["--out", out, "--smoke", "--threads", "1", "--stages", "gligen", "--gligen-pixel-positions",
                "--gligen-box-mask-curriculum", "1,2", "--gligen-snapshots", "1"])
    assert not os.path.exists(os.path.join(out, "gligen", gligen_oracle.CONFIG_NAME))  # over: GLIGEN's fuser
    snap = os.path.join(out, "gligen_step1", gligen_oracle.CONFIG_NAME)
    assert os.path.isfile(snap)  # inside the curriculum: loads with its mask
    from diffusers import UNet2DConditionModel

    unet = train.load_gligen_unet(out, UNet2DConditionModel.from_pretrained(os.path.join(out, "model", "unet")),
                                  "gligen_step1")
    fusers = [m for m in unet.modules() if hasattr(m, "oracle_strength")]
    assert len(fusers) == 7 and all(f.oracle_strength == 8.0 for f in fusers)
    assert all(gligen_positions.has_pixel_positions(f) for f in fusers)
    with pytest.raises(ValueError, match="gligen-pixel-positions"):  # continuing needs the same variant
        train.main(["--out", out, "--smoke", "--threads", "1", "--stages", "gligen", "--gligen-init-from",
                    os.path.join(out, "gligen"), "--gligen-name", "again"])
