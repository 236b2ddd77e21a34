"""The committed GLIGEN (benchmarks/instance_control/checkpoints/gligen: GLIGEN + pixel positions, trained with a
box-mask curriculum and then without it; docs/gligen_toy.md) follows a layout, loaded the way the held-out check
loads it: ``evaluate.load_pipelines(ckpt, ("gligen", "none"))``, sampled, scored with the benchmark's scorer.

On these 6 held-out layouts (24 instances, seed 0, 20 DDIM steps, guidance 3) the committed checkpoints give
GLIGEN / no control: colour-and-box 0.58 / 0.00, ISR 0.54 / 0.00, mIoU 0.48 / 0.04, colour accuracy 0.96 / 0.13.
The bounds leave room for a few instances of floating-point drift (~0.04 each), not for a GLIGEN that draws the
no-control picture, as the plain 1200-step GLIGEN does (colour-and-box at the no-control level).
"""

import os

import pytest
import torch

from instance_control import evaluate, scorer, world

CKPT = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "instance_control", "checkpoints")
LAYOUTS = [l for ls in world.eval_layouts(2, (3, 4, 5)).values() for l in ls]
COLOR_BOX_MIN, COLOR_BOX_MARGIN, COLOR_MARGIN, MIOU_MARGIN = 0.4, 0.35, 0.5, 0.25


@pytest.mark.skipif(not os.path.isdir(os.path.join(CKPT, "gligen")), reason="no committed GLIGEN checkpoint")
def test_committed_gligen_puts_instance_colours_in_their_boxes():
    torch.set_num_threads(2)
    pipes = evaluate.load_pipelines(CKPT, ("gligen", "none"))
    scores = {}
    for method, sample in pipes.items():
        rows = []
        for layout in LAYOUTS:
            image = sample(layout, evaluate.generators((0,), layout), num_inference_steps=20, guidance_scale=3.0,
                           height=32, width=32)[0]
            rows += scorer.score_image(image, layout)
        scores[method] = scorer.summarize(rows)
    on, off = scores["gligen"], scores["none"]
    assert on["color_box"] >= COLOR_BOX_MIN, scores
    assert on["color_box"] >= off["color_box"] + COLOR_BOX_MARGIN, scores
    assert on["color_acc"] >= off["color_acc"] + COLOR_MARGIN, scores
    assert on["miou"] >= off["miou"] + MIOU_MARGIN, scores


@pytest.mark.skipif(not os.path.isdir(os.path.join(CKPT, "gligen_4k")), reason="no committed 4.2k-step GLIGEN")
def test_longer_trained_gligen_scores_above_the_committed_one():
    """``gligen_4k`` (the same GLIGEN trained on to 4.2k steps, docs/gligen_toy.md runs L and M) on the same 6
    layouts: colour-and-box 0.83, ISR 0.79 (the 2.2k-step ``gligen`` gives 0.58 / 0.54). A bound of 0.7 leaves
    room for three instances of floating-point drift, not for weights that lost what runs L and M added."""
    torch.set_num_threads(2)
    sample = evaluate.load_pipelines(CKPT, ("gligen_4k",))["gligen_4k"]
    rows = []
    for layout in LAYOUTS:
        image = sample(layout, evaluate.generators((0,), layout), num_inference_steps=20, guidance_scale=3.0,
                       height=32, width=32)[0]
        rows += scorer.score_image(image, layout)
    got = scorer.summarize(rows)
    assert got["color_box"] >= 0.7 and got["isr"] >= 0.65, got
