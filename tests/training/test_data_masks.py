"""Instance masks in ``roi-ops train``'s data folder: every form of a layout file read from a line, errors naming
the line and the instance, the masks following the resize and centre crop exactly as the boxes do, batches that mix
instances with and without masks, and a 2-step ``roi-ops train`` run on masks."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from coco_rle import rle_runs, rle_string
from training_helpers import TOY_MODEL, write_lines

from roi_ops.training.data import DatasetError, FolderData, TensorData, load_image, read_dataset

W, H = 40, 24  # write_lines' images; at resolution 24 nothing is resized and the crop starts 8 px from the left
# an L on pixel edges (even ones, so the half-size PNG below is exact)
L = np.zeros((H, W), dtype=bool)
L[4:20, 10:14] = True
L[16:20, 10:30] = True
L_BOX = [10 / W, 4 / H, 30 / W, 20 / H]
L_POLY_PX = [10, 4, 14, 4, 14, 16, 30, 16, 30, 20, 10, 20]
L_POLY = [[v / (W if j % 2 == 0 else H) for j, v in enumerate(L_POLY_PX)]]


def _line(mask, box=L_BOX, **extra):
    inst = {"caption": "an L", "mask": mask}
    if box is not None:
        inst["box"] = box
    return {"file_name": "a.png", "prompt": "p", "instances": [inst], **extra}


def test_every_mask_form_of_a_line_gives_the_same_region(tmp_path):
    runs = rle_runs(L)
    lines = [
        _line("m.png"),  # grey PNG, 0/255
        _line("masks/m1.png"),  # mode "1" PNG in a subfolder
        _line("half.png"),  # the same mask at half the image's resolution
        _line({"size": [H, W], "counts": runs}),  # COCO RLE, run list
        _line({"size": [H, W], "counts": rle_string(runs)}),  # COCO RLE, pycocotools' compressed string
        _line(L_POLY),  # polygon, normalised
        _line([L_POLY_PX], box=[10, 4, 30, 20], box_units="pixels"),  # polygon in the line's pixel units
        _line({"size": [H, W], "counts": runs}, box=None),  # no box: the mask's bounding box
    ]
    folder = write_lines(tmp_path, lines)
    os.makedirs(tmp_path / "masks")
    Image.fromarray((L * 255).astype(np.uint8)).save(tmp_path / "m.png")
    Image.fromarray(L).convert("1").save(tmp_path / "masks" / "m1.png")
    Image.fromarray((L[::2, ::2] * 255).astype(np.uint8)).save(tmp_path / "half.png")
    records = read_dataset(folder)
    assert [r.has_mask for r in records] == [(True,)] * len(lines)
    assert all(r.boxes == (tuple(L_BOX),) for r in records), [r.boxes for r in records]
    crop = L[:, 8:32].astype(np.float32)
    full = FolderData(records, 24).regions(range(len(lines)))
    assert full.shape == (len(lines), 1, 24, 24)
    for i in range(len(lines)):
        assert np.array_equal(full[i, 0].numpy(), crop), i
    # at the latents' resolution (a quarter here): each pixel the exact mean of its 2x2 footprint
    latent = FolderData(records, 24, region_size=12).regions(range(len(lines)))
    expected = crop.reshape(12, 2, 12, 2).mean(axis=(1, 3))
    assert latent.shape == (len(lines), 1, 12, 12)
    assert max(float(np.abs(latent[i, 0].numpy() - expected).max()) for i in range(len(lines))) < 1e-6


@pytest.mark.parametrize("mask, message", [
    ("/etc/hostname", "metadata.jsonl:2: instances[0].mask PNG path must be relative to the data folder and stay "
                      "inside it, got '/etc/hostname'"),
    ("../a.png", "metadata.jsonl:2: instances[0].mask PNG path must be relative to the data folder"),
    ("nope.png", "metadata.jsonl:2: instances[0].mask PNG 'nope.png': no such file"),
    ("metadata.jsonl", "metadata.jsonl:2: instances[0].mask PNG 'metadata.jsonl' cannot be read as an image"),
    ({"size": [H, W], "counts": [3, 2]}, f"metadata.jsonl:2: instances[0].mask RLE counts add up to 5 pixels but "
                                         f"size {[H, W]} has {H * W}"),
    ({"size": [W, H], "counts": [W * H]}, "metadata.jsonl:2: instances[0].mask is 24x40 (width x height) but the "
                                          "image is 40x24: not the image's aspect ratio"),
    ({"size": [H, W], "counts": "!!"}, "metadata.jsonl:2: instances[0].mask RLE counts string"),
    ({"counts": [1]}, "metadata.jsonl:2: instances[0].mask as an object must be a COCO RLE"),
    ([[0.1, 0.1, 0.5, 0.5]], "metadata.jsonl:2: instances[0].mask polygon 0 must be a list of at least 3 points"),
    ([], "metadata.jsonl:2: instances[0].mask must be a PNG path (relative to the data folder), a COCO RLE"),
    (3, "metadata.jsonl:2: instances[0].mask must be a PNG path"),
    ([0.1, 0.1, 0.5, 0.1, 0.5, 0.5], "metadata.jsonl:2: instances[0].mask must be a PNG path (relative to the data "
                                     "folder), a COCO RLE {\"size\": [h, w], \"counts\": ...} or a COCO polygon list "
                                     "[[x1, y1, x2, y2, ...], ...] (a list of rings); got [0.1, 0.1"),
])
def test_bad_masks_name_the_line_and_the_instance(tmp_path, mask, message):
    good = _line(L_POLY)
    with pytest.raises(DatasetError) as e:
        read_dataset(write_lines(tmp_path, [good, _line(mask)]))
    assert str(e.value).startswith(message), str(e.value)


def test_a_mask_only_instance_with_an_empty_mask_is_refused_by_its_index(tmp_path):
    empty = {"size": [H, W], "counts": [H * W]}
    line = {"file_name": "a.png", "prompt": "p", "instances": [{"box": L_BOX, "caption": "x"},
                                                               {"caption": "y", "mask": empty}]}
    with pytest.raises(DatasetError, match=r"^metadata.jsonl:1: instances\[1\] mask is empty"):
        read_dataset(write_lines(tmp_path, [line]))


def test_masks_follow_the_resize_and_centre_crop_as_the_boxes_do(tmp_path):
    """A 60x40 image at resolution 32: resized to 48x32 (x0.8), cropped 8 px from the left. A rectangle mask off
    the output's pixel grid covers exactly its transformed box: the box's pixels, with the partial edge pixels'
    fractions (area preserved); a rectangle half outside the crop is cut where the box is."""
    w, h, R = 60, 40, 32
    inside = np.zeros((h, w), dtype=bool)
    inside[7:33, 21:47] = True  # -> x [8.8, 29.6), y [5.6, 26.4) output pixels
    edge = np.zeros((h, w), dtype=bool)
    edge[0:10, 0:30] = True  # -> x [-8, 16) cut to [0, 16), y [0, 8)
    Image.new("RGB", (w, h)).save(tmp_path / "r.png")
    boxes = [[21 / w, 7 / h, 47 / w, 33 / h], [0, 0, 30 / w, 10 / h]]
    line = {"file_name": "r.png", "prompt": "p", "instances": [
        {"box": boxes[0], "caption": "a", "mask": {"size": [h, w], "counts": rle_runs(inside)}},
        {"box": boxes[1], "caption": "b", "mask": {"size": [h, w], "counts": rle_runs(edge)}}]}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(line) + "\n")
    data = FolderData(read_dataset(tmp_path), R)
    batch = data.get([0])
    for k, area in ((0, 20.8 * 20.8), (1, 16 * 8)):
        x1, y1, x2, y2 = (batch.boxes[0, k] * R).tolist()
        region = batch.regions[0, k]
        ys, xs = torch.nonzero(region, as_tuple=True)
        got = (xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1)
        assert got == (int(np.floor(x1 + 1e-6)), int(np.floor(y1 + 1e-6)), int(np.ceil(x2 - 1e-6)),
                       int(np.ceil(y2 - 1e-6))), (k, got, (x1, y1, x2, y2))
        assert float(region.sum()) == pytest.approx(area, abs=1e-3)
        assert float(region.max()) == 1.0
    assert float(batch.regions[0, 0, 10, 8]) == pytest.approx(0.2, abs=1e-5)  # the left edge pixel: 8.8 -> 9
    assert float(batch.regions[0, 0, 10, 29]) == pytest.approx(0.6, abs=1e-5)  # the right one: 29 -> 29.6


def test_a_shaped_mask_lands_where_the_image_pixels_do(tmp_path):
    """An L given as a polygon, and drawn into the 90x60 image by the same rasteriser: after the trainer's resize
    (bicubic, to 48x32) and crop, the region and the image's pixels agree (bicubic only blurs the edges)."""
    from roi_ops.roictrl_adapter import regions

    w, h, R = 90, 60, 32
    poly = [10, 6, 30, 6, 30, 40, 80, 40, 80, 55, 10, 55]
    drawn = regions.to_image(regions.read_mask([poly], "m", units="pixels"), h, w)
    Image.fromarray((np.repeat(drawn[..., None], 3, axis=2) * 255).astype(np.uint8)).save(tmp_path / "l.png")
    line = {"file_name": "l.png", "prompt": "p", "box_units": "pixels",
            "instances": [{"box": [10, 6, 80, 55], "caption": "an L", "mask": [poly]}]}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(line) + "\n")
    batch = FolderData(read_dataset(tmp_path), R).get([0])
    region, grey = batch.regions[0, 0], (batch.images[0, 0] + 1) / 2
    assert torch.equal(region >= 0.5, grey >= 0.5)
    assert float((region - grey).abs().mean()) < 0.01  # 0.0028 when written
    # area preserved: the crop keeps x in [8, 40) of the 48 px resize, [15, 75) of the image, at 32/60 the scale
    assert float(region.sum()) == pytest.approx(float(drawn[:, 15:75].sum()) * (32 / 60) ** 2, rel=1e-5)


def test_batches_mix_masked_unmasked_and_padded_slots(tmp_path):
    Image.new("RGB", (W, H)).save(tmp_path / "a.png")
    big = np.ones((H, W), dtype=bool)  # spills out of its box: cut to the box
    lines = [
        {"file_name": "a.png", "prompt": "masked + box only", "instances": [
            {"box": [0.4, 0.2, 0.6, 0.8], "caption": "m", "mask": {"size": [H, W], "counts": rle_runs(big)}},
            {"box": [0.5, 0.5, 0.7, 0.9], "caption": "b"}]},
        {"file_name": "a.png", "prompt": "box only", "instances": [{"box": [0.3, 0.3, 0.6, 0.6], "caption": "b"}]},
        {"file_name": "a.png", "prompt": "mask cropped away", "instances": [
            {"box": [0.0, 0.0, 0.1, 1.0], "caption": "gone", "mask": L_POLY},
            {"box": [0.3, 0.3, 0.6, 0.6], "caption": "b"}]},
    ]
    write_lines(tmp_path, lines)
    data = FolderData(read_dataset(tmp_path), 24)
    assert data.max_instances == 2
    batch = data.get([0, 1])
    assert batch.masks.tolist() == [[True, True], [True, False]]
    r = batch.regions
    assert r.shape == (2, 2, 24, 24)
    assert torch.equal(r[0, 1], torch.ones(24, 24)) and torch.equal(r[1], torch.ones(2, 24, 24))  # box only, padding
    # the mask filled the image: only the pixels whose centre lies in the box are left (x 16..24 -> 8..16 in the
    # crop, y 4.8..19.2 -> rows 5..19 by centre)
    expected = torch.zeros(24, 24)
    expected[5:19, 8:16] = 1
    assert torch.equal(r[0, 0], expected)
    # no mask left in the batch: boxes only (None), so the adapter runs as without regions
    assert data.get([1, 2]).regions is None and data.get([2]).captions == [["b", ""]]
    # --cache-embeddings hands TensorData the folder's decoder: masks decoded per batch, not cached
    cached = TensorData(torch.zeros(3, 4, 12, 12), torch.ones(3, 4, 12, 12), ["a"] * 3, [["", ""]] * 3,
                        torch.zeros(3, 2, 4), torch.zeros(3, 2, dtype=torch.bool), regions=data.regions)
    assert torch.equal(cached.get([0, 1]).regions, r) and cached.get([1]).regions is None


def test_a_changed_metadata_file_is_noticed_when_masks_are_read(tmp_path):
    folder = write_lines(tmp_path, [_line(L_POLY)])
    data = FolderData(read_dataset(folder), 24)
    text = (tmp_path / "metadata.jsonl").read_text()
    (tmp_path / "metadata.jsonl").write_text(text.replace('"p"', '"q"'))
    with pytest.raises(DatasetError, match=r"^metadata.jsonl:1: the file changed since it was checked"):
        data.get([0])


def _with_masks(world: str, out) -> str:
    """The world folder with masks on most instances, in every form (PNG, RLE list and string, polygon), some
    instances left box-only."""
    shutil.copytree(world, out)
    lines = [json.loads(t) for t in (out / "metadata.jsonl").read_text().splitlines() if t.strip()]
    os.makedirs(out / "masks")
    for n, line in enumerate(lines):
        for k, inst in enumerate(line["instances"]):
            x1, y1, x2, y2 = inst["box"]
            form = (n + k) % 5
            if form == 0:
                continue  # box only
            side = Image.open(out / line["file_name"]).size[0]
            c = (np.arange(side) + 0.5) / side
            disc = ((c[None, :] - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2 + (
                (c[:, None] - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2 <= 1
            if form == 1:
                name = f"masks/{n}_{k}.png"
                Image.fromarray((disc * 255).astype(np.uint8)).save(out / name)
                inst["mask"] = name
            elif form == 2:
                inst["mask"] = {"size": [side, side], "counts": rle_runs(disc)}
            elif form == 3:
                inst["mask"] = {"size": [side, side], "counts": rle_string(rle_runs(disc))}
            else:  # a triangle in the box
                inst["mask"] = [[x1, y2, (x1 + x2) / 2, y1, x2, y2]]
    (out / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return os.fspath(out)


def test_train_runs_on_a_folder_with_masks(cli, world_data, tmp_path):
    """2 steps on the toy model: the masks reach the adapter as regions (the same run without them ends with
    other weights and another L_reg), and --cache-embeddings trains what the uncached run trains."""
    from safetensors.torch import load_file

    masked = _with_masks(world_data, tmp_path / "data")
    records = read_dataset(masked)
    assert sum(sum(r.has_mask) for r in records) > 2 * len(records)
    fast = ["--model", TOY_MODEL, "--max-steps", 2, "--batch-size", 2, "--learning-rate", 1e-3, "--seed", 0,
            "--no-progress"]
    runs = {}
    for name, data, extra in (("masks", masked, []), ("boxes", world_data, []), ("cached", masked,
                                                                                  ["--cache-embeddings"])):
        status, _, err = cli("train", "--data", data, "--output-dir", tmp_path / name, *fast, *extra)
        assert status == 0, err
        log = [json.loads(t) for t in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        runs[name] = (load_file(tmp_path / name / "adapter" / "roictrl_adapter.safetensors"), log)
    (masks, log_m), (boxes, log_b), (cached, _) = runs["masks"], runs["boxes"], runs["cached"]
    assert log_m[0]["l_reg"] != log_b[0]["l_reg"]
    assert any(not torch.equal(masks[k], boxes[k]) for k in masks)
    assert all(torch.allclose(masks[k], cached[k], atol=1e-5) for k in masks)
