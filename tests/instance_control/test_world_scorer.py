"""The synthetic world and the training-free scorer of benchmarks/instance_control."""

import itertools

import numpy as np
import pytest

from instance_control import scorer, world


def test_layouts_are_deterministic_and_valid():
    for seed in range(200):
        a, b = world.sample_layout(seed), world.sample_layout(seed)
        assert a == b
        assert 1 <= len(a.instances) <= 6
        for inst in a.instances:
            x1, y1, x2, y2 = inst.box
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
            assert inst.color in world.COLORS and inst.shape in world.SHAPES
        # Boxes overlap at most pairwise-slightly (the controlled overlap), never heavily.
        for p, q in itertools.combinations(a.instances, 2):
            assert world.box_iou(p.box, q.box) <= 0.15 + 1e-9
        assert a.caption == " and ".join(i.caption for i in a.instances)
    np.testing.assert_array_equal(world.render(world.sample_layout(3)), world.render(world.sample_layout(3)))
    assert world.sample_layout(3) != world.sample_layout(4)


def test_eval_levels_have_their_instance_count_and_leakage_layouts():
    layouts = world.eval_layouts(20)
    assert sorted(layouts) == [2, 3, 4, 5, 6]
    same_shape = same_color = overlapping = 0
    for L, ls in layouts.items():
        assert all(len(l.instances) == L for l in ls)
        for l in ls:
            shapes = [i.shape for i in l.instances]
            colors = [i.color for i in l.instances]
            same_color += len(set(colors)) < len(colors)
            same_shape += any(shapes.count(s) > 1 and len({c for c, t in zip(colors, shapes) if t == s}) > 1
                              for s in shapes)
            overlapping += any(not world._apart(p.box, q.box, 0) for p, q in itertools.combinations(l.instances, 2))
    # Leakage-revealing layouts (one shape in several colours, one colour on several shapes) and overlaps occur.
    assert same_color >= 10 and same_shape >= 20 and overlapping >= 5
    train_seeds = {world.train_layout(i).seed for i in range(1000)}
    assert not train_seeds & {l.seed for ls in layouts.values() for l in ls}


def test_tokenizer_has_one_token_per_word(tmp_path):
    from instance_control import models

    tok = models.build_tokenizer(str(tmp_path))
    ids = tok("a red circle and a blue square").input_ids
    assert len(ids) == 7 + 2
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle and a blue square"


def test_tokenizer_ids_do_not_depend_on_the_process(tmp_path):
    """The BPE trainer numbered some tokens (the word "a" among them) differently in every process, so a
    retraining could not reproduce the committed model: fresh processes with different hash seeds must write
    the committed checkpoint's vocabulary, id for id."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    committed = os.path.join(root, "benchmarks", "instance_control", "checkpoints", "model", "tokenizer", "vocab.json")
    with open(committed) as f:
        want = json.load(f)
    for hash_seed in ("1", "2", "3"):
        out = tmp_path / hash_seed
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        code = "import sys; from instance_control import models; models.build_tokenizer(sys.argv[1])"
        subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env,
                       cwd=os.path.join(root, "benchmarks"))
        with open(out / "vocab.json") as f:
            assert json.load(f) == want, f"PYTHONHASHSEED={hash_seed}"


def _scores(layouts, make_image):
    return scorer.summarize([r for l in layouts for r in scorer.score_image(make_image(l), l)])


def test_scorer_on_ground_truth_images():
    layouts = world.eval_layouts(16)
    per_level = {L: _scores(ls, world.render) for L, ls in layouts.items()}
    assert np.mean([s["isr"] for s in per_level.values()]) >= 0.95
    for L, s in per_level.items():
        assert s["isr"] >= 0.9, (L, s)
        assert s["color_acc"] >= 0.97 and s["leakage"] <= 0.03, (L, s)


def _swap_colors(layout):
    """Every instance takes the colour of the next instance with another colour (a derangement of colours)."""
    insts = layout.instances
    new = []
    for k, inst in enumerate(insts):
        other = next(insts[(k + j) % len(insts)].color for j in range(1, len(insts) + 1)
                     if insts[(k + j) % len(insts)].color != inst.color)
        new.append(world.Instance(inst.box, other, inst.shape))
    return world.Layout(tuple(new), layout.seed)


def test_scorer_with_colours_swapped_between_instances():
    layouts = world.eval_layouts(16)
    for L, ls in layouts.items():
        ls = [l for l in ls if len({i.color for i in l.instances}) > 1]  # one colour only: nothing to swap
        assert len(ls) >= 10
        s = _scores(ls, lambda l: world.render(_swap_colors(l)))
        assert s["isr"] <= 0.1, (L, s)
        assert s["color_acc"] <= 0.05 and s["leakage"] >= 0.9, (L, s)


def test_scorer_shape_box_and_absence():
    layout = world.Layout((world.Instance((0.1, 0.1, 0.5, 0.5), "red", "circle"),
                           world.Instance((0.55, 0.5, 0.95, 0.9), "blue", "triangle")), seed=1)
    img = world.render(layout)
    ok = scorer.score_image(img, layout)
    assert [r["success"] for r in ok] == [True, True] and ok[0]["iou"] > 0.8
    wrong_shape = world.Layout((world.Instance((0.1, 0.1, 0.5, 0.5), "red", "square"), layout.instances[1]), 1)
    assert [r["success"] for r in scorer.score_image(img, wrong_shape)] == [False, True]
    moved = world.Layout((world.Instance((0.55, 0.05, 0.95, 0.45), "red", "circle"), layout.instances[1]), 1)
    r = scorer.score_image(img, moved)[0]
    assert not r["success"] and r["iou"] == 0.0 and r["found"]
    blank = np.zeros_like(img)
    assert scorer.summarize(scorer.score_image(blank, layout)) == {
        "isr": 0.0, "color_box": 0.0, "miou": 0.0, "color_acc": 0.0, "leakage": 0.0, "n": 2}
    with pytest.raises(ValueError, match="n must be"):
        world.sample_layout(0, 7)


def test_overlap_track_layouts():
    """One pair of heavily overlapping boxes per layout (IoU 0.2-0.5), the other boxes apart; deterministic; seeds
    disjoint from training and the main track; some pairs have similar captions."""
    track = world.overlap_layouts(6)
    assert track == world.overlap_layouts(6)
    assert sorted(track) == list(world.OVERLAP_LEVELS)
    similar = 0
    for L, layouts in track.items():
        for layout in layouts:
            assert len(layout.instances) == L
            a, b, *rest = [i.box for i in layout.instances]
            assert world.OVERLAP_IOU[0] <= world.box_iou(a, b) <= world.OVERLAP_IOU[1]
            boxes = [a, b, *rest]
            for i, box in enumerate(boxes):
                for j in range(max(i + 1, 2), len(boxes)):
                    assert world.box_iou(box, boxes[j]) == 0.0
            p, q = layout.instances[:2]
            similar += p.color == q.color or p.shape == q.shape
    assert 0.2 <= similar / sum(len(v) for v in track.values()) <= 0.8
    main_seeds = {l.seed for ls in world.eval_layouts(6).values() for l in ls}
    assert not main_seeds & {l.seed for ls in track.values() for l in ls}
    with pytest.raises(ValueError, match="n must be in 2..6"):
        world.sample_overlap_layout(0, 1)
