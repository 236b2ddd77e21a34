"""Mask-shaped instances in the adapter and the pipeline (docs/ops.md, "Mask-shaped instances"): the mask forms,
their validation messages, the mask's bounding box, clipping to the box, bitwise box-only behaviour, and the blend
maps showing the mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import tiny_pipelines as tp
from coco_rle import rle_runs, rle_string
from roi_ops.roictrl_adapter import ROICtrlInstances, ROICtrlPipeline, normalize_instances
from roi_ops.roictrl_adapter import regions
from roi_ops.roictrl_adapter.generate import read_layout
from roi_ops.roictrl_adapter.pipeline import validate_layout

STEPS = dict(num_inference_steps=2, output_type="np")
SIZE = 64  # the tiny pipelines' image side


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pipe = tp.make_sd_pipeline(tmp_path_factory.mktemp("sd"))
    return pipe, ROICtrlPipeline.from_pipe(pipe, tp.make_pipeline_adapter(pipe))


def disc(size=SIZE, box=(0.1, 0.1, 0.7, 0.7)) -> np.ndarray:
    c = (np.arange(size) + 0.5) / size
    x1, y1, x2, y2 = box
    u = (c[None, :] - (x1 + x2) / 2) / ((x2 - x1) / 2)
    v = (c[:, None] - (y1 + y2) / 2) / ((y2 - y1) / 2)
    return u**2 + v**2 <= 1


def run(roictrl, instances, **kw):
    return roictrl("a picture", instances=instances, generator=torch.Generator().manual_seed(0), **STEPS, **kw)


def test_mask_forms_read_alike(tmp_path):
    from PIL import Image

    m = disc(16)
    png = tmp_path / "m.png"
    Image.fromarray((m * 255).astype(np.uint8)).save(png)
    # COCO RLE, uncompressed (column-major runs starting with 0s) and pycocotools' compressed string of it
    runs = rle_runs(m)
    forms = [m, m.astype(np.float32), torch.from_numpy(m), Image.fromarray(m), "m.png",
             {"size": [16, 16], "counts": runs}, {"size": [16, 16], "counts": rle_string(runs)}]
    for form in forms:
        got = regions.read_mask(form, "instances[0].mask", base_dir=tmp_path)
        assert np.array_equal(got, m.astype(np.float32)), type(form)
    poly = regions.read_mask([[0.25, 0.25, 0.75, 0.25, 0.75, 0.75, 0.25, 0.75]], "m")
    square = regions.to_image(poly, 8, 8)
    assert square.sum() == 16 and square[2:6, 2:6].all()


@pytest.mark.parametrize("bad, match", [
    (np.full((4, 4), 2.0), r"instances\[0\]\[0\] mask must hold values in \[0, 1\]"),
    (np.zeros((2, 3, 4)), r"instances\[0\]\[0\] mask must be a 2-D"),
    (np.full((4, 4), 7, dtype=np.int64), r"instances\[0\]\[0\] mask is an integer array"),
    ({"size": [4, 4], "counts": [3, 2]}, r"instances\[0\]\[0\] mask RLE counts add up to 5"),
    ("nope.png", r"instances\[0\]\[0\] mask is a path \('nope.png'\); a PNG path is only read from a layout file"),
    (3.5, r"instances\[0\]\[0\] mask must be a bool/float numpy array"),
    (np.zeros((4, 4), dtype=bool), r"instances\[0\]\[0\] mask is empty"),
])
def test_bad_masks_name_the_instance(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        normalize_instances([{"caption": "a cat", "mask": bad}], 1, width=SIZE, height=SIZE)


def test_mask_only_gets_its_bounding_box_and_outside_pixels_are_clipped():
    m = np.zeros((8, 8), dtype=bool)
    m[2:5, 1:7] = True
    (inst,) = normalize_instances([{"caption": "a cat", "mask": m}], 1, width=SIZE, height=SIZE)[0]
    assert inst.box == pytest.approx((1 / 8, 2 / 8, 7 / 8, 5 / 8))
    f = SIZE // 8  # nearest-neighbour upsampling factor
    assert inst.mask.shape == (SIZE, SIZE) and inst.mask.sum() == (3 * f) * (6 * f)
    with pytest.warns(UserWarning, match=r"instances\[0\]\[0\] \(\d+ px\)"):
        (inst,) = normalize_instances([{"box": [0, 0, 0.5, 0.5], "caption": "a cat", "mask": m}], 1,
                                      width=SIZE, height=SIZE)[0]
    half = SIZE // 2
    assert inst.mask[:, half:].sum() == 0 and inst.mask[half:].sum() == 0 and inst.mask[2 * f:half, f:half].all()


def test_layout_json_mask_forms(tmp_path):
    from PIL import Image

    Image.fromarray(disc(8)).save(tmp_path / "cat.png")
    layout = {"prompt": "a cat and a dog", "instances": [
        {"box": [0.05, 0.05, 0.8, 0.8], "caption": "a cat", "mask": "cat.png"},
        {"caption": "a dog", "mask": [[0.5, 0.5, 1.0, 0.5, 1.0, 1.0]]},
        {"box": [0, 0, 1, 1], "caption": "a hat", "mask": {"size": [2, 2], "counts": [1, 3]}},
    ]}
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(layout))
    checked = read_layout(path)
    rows = normalize_instances(checked["instances"], 1, width=SIZE, height=SIZE)[0]
    assert rows[0].mask.shape == (SIZE, SIZE) and rows[0].mask.max() == 1
    assert rows[1].box == pytest.approx((0.5, 0.5, 1.0, 1.0), abs=1 / SIZE)  # the triangle's bounding box
    h = SIZE // 2  # RLE [[0, 1], [1, 1]] (column-major runs)
    assert rows[2].mask[:h, :h].sum() == 0 and rows[2].mask[h:].all() and rows[2].mask[:, h:].all()
    with pytest.raises(ValueError, match=r"layout.json'?: instances\[0\].mask PNG 'gone.png': no such file"):
        layout["instances"][0]["mask"] = "gone.png"
        path.write_text(json.dumps(layout))
        read_layout(path)
    with pytest.raises(ValueError, match=r"instances\[0\] must have the keys .*; missing \['box'\]"):
        validate_layout({"prompt": "x", "instances": [{"caption": "a cat"}]})


def test_regions_are_validated():
    boxes, emb = torch.rand(1, 2, 4).sort(-1).values, torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match=r"regions must be Tensor\[B, N, H, W\] with B=1, N=2"):
        ROICtrlInstances(boxes, emb, regions=torch.ones(1, 3, 4, 4))
    with pytest.raises(ValueError, match="regions of valid instances must hold values in"):
        ROICtrlInstances(boxes, emb, regions=torch.full((1, 2, 4, 4), 1.5))
    with pytest.raises(TypeError, match="regions must be bool or floating"):
        ROICtrlInstances(boxes, emb, regions=torch.ones(1, 2, 4, 4, dtype=torch.long))


def test_all_box_only_is_bitwise_and_masks_change_the_image(sd):
    _, roictrl = sd
    # a box-only instance next to a masked one has coverage 1: a mask of ones filling its box is bitwise no mask
    cat, dog = {"box": [0, 0, 1, 1], "caption": "a cat"}, {"box": [0.1, 0.1, 0.7, 0.7], "caption": "a dog"}
    plain = run(roictrl, [cat, dog]).images
    full = run(roictrl, [{**cat, "mask": np.ones((SIZE, SIZE), bool)}, dog]).images
    assert np.array_equal(plain, full)
    shaped = run(roictrl, [cat, {**dog, "mask": disc()}]).images
    assert not np.array_equal(plain, shaped)


def test_blend_maps_show_the_mask(sd):
    _, roictrl = sd
    m = np.zeros((SIZE, SIZE), bool)
    m[8:56, 8:16] = True  # a strip at the left of the box only
    out = run(roictrl, [{"box": [0.1, 0.1, 0.9, 0.9], "caption": "a cat", "mask": m}], return_blend_maps=True)
    (maps,) = out.blend_maps  # [N, H, W] at the image size, per image
    w = maps[0]
    assert w.shape == (SIZE, SIZE)
    # inside the box, right of the mask (past the bilinear upsampling of the coarsest layer, 16 px a pixel):
    # not blended in at all; on the mask: blended in
    assert float(w[16:48, 41:55].abs().max()) == 0.0
    assert float(w[16:48, 9:15].min()) > 0


def test_layout_from_no_file_refuses_mask_paths(tmp_path):
    """A layout that comes from no file (the UI's upload, its /generate API) must never make the server read one
    of its own paths; read from a file, the same layout reads the PNG next to it."""
    import json

    from PIL import Image

    from roi_ops.roictrl_adapter.generate import parse_layout, read_layout

    Image.fromarray(disc(8)).save(tmp_path / "cat.png")
    layout = {"instances": [{"box": [0.05, 0.05, 0.8, 0.8], "caption": "a cat", "mask": str(tmp_path / "cat.png")}]}
    with pytest.raises(ValueError, match=r"upload: instances\[0\].mask is a path .*only read from a layout file"):
        parse_layout(json.dumps(layout), "upload")
    layout["instances"][0]["mask"] = "cat.png"
    (tmp_path / "layout.json").write_text(json.dumps(layout))
    got = read_layout(tmp_path / "layout.json")
    assert got["instances"][0].mask.sum() == disc(8).sum()


def test_region_embedding_acts_only_where_a_mask_leaves_its_box(sd):
    """options.region_embedding: without masks, and with masks filling their boxes, bitwise the adapter without
    it (the same other weights); a mask that leaves part of its box changes the image."""
    pipe, _ = sd
    plain = tp.make_pipeline_adapter(pipe)
    shaped = tp.make_pipeline_adapter(pipe, randomize=False, region_embedding=True)
    missing = shaped.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.endswith((".region_outside", ".region_outside_gate")) for k in missing)
    with torch.no_grad():
        for name, p in shaped.named_parameters():
            if name.endswith((".region_outside", ".region_outside_gate")):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    cat, dog = {"box": [0, 0, 1, 1], "caption": "a cat"}, {"box": [0.1, 0.1, 0.7, 0.7], "caption": "a dog"}
    full = {**cat, "mask": np.ones((SIZE, SIZE), bool)}  # fills its box: regions given, all ones
    a, b = ROICtrlPipeline.from_pipe(pipe, plain), ROICtrlPipeline.from_pipe(pipe, shaped)
    for instances in ([cat, dog], [dog], [full, dog]):
        assert np.array_equal(run(a, instances).images, run(b, instances).images)
    masked = [{**dog, "mask": disc()}]
    assert not np.array_equal(run(a, masked).images, run(b, masked).images)


def test_region_embedding_acts_by_box_minus_coverage():
    """``_outside_region``: with ``o`` = box coverage - region coverage, ``blended * (1 - o * gate) + o * vector``;
    ``blended`` bitwise on the mask and outside the box, the vector alone where the box covers, the mask does not
    and the gate is 1."""
    from roi_ops.roictrl_adapter.block import ROICtrlBlock
    from roi_ops.roictrl_adapter.options import ArchitectureOptions

    block = ROICtrlBlock(8, 2, 16, 4, options=ArchitectureOptions(region_embedding=True))
    with torch.no_grad():
        block.region_outside.copy_(torch.arange(1.0, 9.0))
        block.region_outside_gate.fill_(1.0)
    H = W = 8
    region = torch.zeros(1, 1, 32, 32)
    region[..., :, :16] = 1  # the left half of the image
    inst = ROICtrlInstances(torch.tensor([[[0.0, 0.0, 1.0, 0.5]]]), torch.randn(1, 1, 3, 8), regions=region)
    rois = inst.rois(H, W)
    covered = block.paste_rule.coverage(rois, 1, (H, W), grid=block.grid,
                                        coverage=inst.layer_coverage(rois, (H, W), torch.float32))
    blended = torch.randn(1, H * W, 8)
    out = block._outside_region(blended, rois, 1, (H, W), covered).reshape(H, W, 8)
    hole = torch.zeros(H, W, dtype=torch.bool)
    hole[:4, 4:] = True  # in the box (top half), off the mask (left half)
    assert torch.equal(out[~hole], blended.reshape(H, W, 8)[~hole])
    assert torch.equal(out[hole], torch.arange(1.0, 9.0).expand(int(hole.sum()), 8))
