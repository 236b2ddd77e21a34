"""``roi-ops prepare coco`` on a tiny COCO-format split the test writes (instances, captions, PNGs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from roi_ops.cli import main

W, H = 40, 20  # image 1 (non-square: x is divided by the width, y by the height)


def write_coco(root: Path) -> dict:
    """Three images with boxes and captions; returns the paths. What each entry tests is said next to it."""
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (W, H), (255, 0, 0)).save(images / "a.png")
    Image.new("RGB", (30, 30), (0, 255, 0)).save(images / "sub" / "b.png")  # a file_name with a folder
    Image.new("RGB", (16, 16), (0, 0, 255)).save(images / "c.png")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(images / "d.png")
    instances = {
        "images": [
            {"id": 3, "file_name": "c.png", "width": 16, "height": 16},  # out of id order on purpose
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "sub/b.png", "width": 30, "height": 30},
            {"id": 4, "file_name": "d.png", "width": 16, "height": 16},  # no caption at all
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 67, "name": "dining table"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [4, 2, 10, 8], "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 18, "bbox": [20.5, 5.25, 19.5, 14.75], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 1, "bbox": [0, 0, 40, 20], "iscrowd": 1},  # crowd: dropped
            {"id": 13, "image_id": 1, "category_id": 18, "bbox": [1, 1, 0.5, 10], "iscrowd": 0},  # thin: dropped
            {"id": 14, "image_id": 2, "category_id": 67, "bbox": [0, 0, 30, 30.6], "iscrowd": 0},  # overshoot
            {"id": 15, "image_id": 2, "category_id": 1, "bbox": [3, 3, 0, 6], "iscrowd": 0},  # no width: dropped
            {"id": 16, "image_id": 3, "category_id": 1, "bbox": [0, 0, 2, 2], "iscrowd": 1},  # c.png: crowd only
            {"id": 17, "image_id": 4, "category_id": 1, "bbox": [0, 0, 8, 8], "iscrowd": 0},
        ],
    }
    captions = {
        "images": instances["images"],
        "annotations": [
            {"id": 7, "image_id": 1, "caption": "A man  walking a dog.\n"},  # lowest id wins; spaces tidied
            {"id": 5, "image_id": 1, "caption": " A person with\ta dog on a street. "},
            {"id": 9, "image_id": 2, "caption": "A table set for dinner."},
            {"id": 8, "image_id": 3, "caption": "Blue."},
        ],
    }
    paths = {"instances": root / "instances.json", "captions": root / "captions.json", "images": images}
    paths["instances"].write_text(json.dumps(instances))
    paths["captions"].write_text(json.dumps(captions))
    return paths


def args_for(paths: dict, out: Path, *extra: str) -> list[str]:
    return ["prepare", "coco", "--instances", str(paths["instances"]), "--captions", str(paths["captions"]),
            "--images", str(paths["images"]), "--out", str(out), *extra]


def read_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


EXPECTED = [
    {"file_name": "a.png", "prompt": "A person with a dog on a street.", "instances": [
        {"box": [4 / W, 2 / H, 14 / W, 10 / H], "caption": "person"},
        {"box": [20.5 / W, 5.25 / H, 1.0, 1.0], "caption": "dog"},
    ]},
    {"file_name": "sub/b.png", "prompt": "A table set for dinner.", "instances": [
        {"box": [0.0, 0.0, 1.0, 1.0], "caption": "dining table"},  # y2 = 30.6 / 30 clamped to 1
    ]},
]


def test_convert_exact_lines_and_counts(tmp_path, capsys):
    paths = write_coco(tmp_path)
    out = tmp_path / "out"
    assert main(args_for(paths, out)) == 0
    assert read_lines(out) == EXPECTED
    printed = capsys.readouterr().out
    assert "2 images, 3 instances" in printed
    assert "1 without instances, 1 without a caption" in printed  # c.png (crowd only), d.png (no caption)
    assert "2 crowd, 2 too small" in printed and "clamped to the image: 1 box(es)" in printed
    # copies by default, byte for byte, at the COCO file_name
    for name in ("a.png", "sub/b.png"):
        assert not (out / name).is_symlink()
        assert (out / name).read_bytes() == (paths["images"] / name).read_bytes()
    assert not (out / "c.png").exists() and not (out / "metadata.jsonl.tmp").exists()


def test_options_change_the_rules(tmp_path):
    paths = write_coco(tmp_path)
    out = tmp_path / "out"
    assert main(args_for(paths, out, "--keep-crowd", "--keep-empty", "--min-box-side", "0", "--max-instances", "2",
                         "--link", "symlink")) == 0
    lines = {line["file_name"]: line for line in read_lines(out)}
    assert list(lines) == ["a.png", "sub/b.png", "c.png"]  # image-id order; d.png still has no caption
    # a.png has 4 candidate boxes (the crowd and the thin one kept): the 2 largest, in the file's order
    assert [i["box"] for i in lines["a.png"]["instances"]] == [[20.5 / W, 5.25 / H, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
    # the zero-width box is dropped whatever --min-box-side says
    assert len(lines["sub/b.png"]["instances"]) == 1
    assert lines["c.png"]["instances"] == [{"box": [0.0, 0.0, 0.125, 0.125], "caption": "person"}]
    assert (out / "a.png").is_symlink() and os.path.isabs(os.readlink(out / "a.png"))
    # no --overwrite: refused; with it, replaced
    assert main(args_for(paths, out)) == 2
    assert main(args_for(paths, out, "--overwrite")) == 0
    assert read_lines(out) == EXPECTED


def test_keep_empty_writes_an_empty_instance_list(tmp_path):
    paths = write_coco(tmp_path)
    out = tmp_path / "out"
    assert main(args_for(paths, out, "--keep-empty", "--max-images", "3")) == 0
    lines = read_lines(out)
    assert [line["file_name"] for line in lines] == ["a.png", "sub/b.png", "c.png"]
    assert lines[2] == {"file_name": "c.png", "prompt": "Blue.", "instances": []}


def test_missing_image_is_an_error_or_skipped(tmp_path, capsys):
    paths = write_coco(tmp_path)
    (paths["images"] / "sub" / "b.png").unlink()
    out = tmp_path / "out"
    assert main(args_for(paths, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("roi-ops prepare: error: --images: ") and "sub/b.png" in err and "no such file" in err
    assert "\n" not in err and not out.exists()  # nothing written before everything is checked
    assert main(args_for(paths, out, "--skip-bad-images")) == 0
    assert read_lines(out) == EXPECTED[:1]
    assert "1 missing or unreadable" in capsys.readouterr().out


def test_undecodable_or_wrong_size_image(tmp_path, capsys):
    paths = write_coco(tmp_path)
    (paths["images"] / "a.png").write_bytes(b"not a png")
    assert main(args_for(paths, tmp_path / "o1")) == 2
    err = capsys.readouterr().err
    assert "a.png" in err and "cannot be read as an image" in err
    Image.new("RGB", (W + 1, H), 0).save(paths["images"] / "a.png")
    assert main(args_for(paths, tmp_path / "o2")) == 2
    assert f"is {W + 1}x{H} but the instances file says {W}x{H}" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda i, c: i["annotations"][0].update(bbox=[1, 2, 3]),
     "annotations[0].bbox must be 4 finite numbers [x, y, width, height], got [1, 2, 3]"),
    (lambda i, c: i["annotations"][1].update(image_id=99), "annotations[1].image_id 99 is not in images"),
    (lambda i, c: i["annotations"][1].update(category_id=5), "annotations[1].category_id 5 is not in categories"),
    (lambda i, c: i["images"][1].update(width=0), "images[1].width must be a positive integer, got 0"),
    (lambda i, c: i["images"][1].update(file_name="../a.png"),
     "images[1].file_name must be a relative path inside --images, got '../a.png'"),
    (lambda i, c: i.pop("categories"), "needs a list 'categories' (COCO format), got nothing"),
    (lambda i, c: c["annotations"][0].update(caption=3), "annotations[0].caption must be a string, got 3"),
])
def test_malformed_json_names_the_entry(tmp_path, capsys, edit, message):
    paths = write_coco(tmp_path)
    inst, caps = json.loads(paths["instances"].read_text()), json.loads(paths["captions"].read_text())
    edit(inst, caps)
    paths["instances"].write_text(json.dumps(inst))
    paths["captions"].write_text(json.dumps(caps))
    assert main(args_for(paths, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.startswith("roi-ops prepare: error: --") and message in err and err.count("\n") == 1


def test_bad_arguments(tmp_path, capsys):
    paths = write_coco(tmp_path)
    cases = [
        ({"instances": tmp_path / "nope.json"}, "nope.json'", "no such file"),
        ({"images": tmp_path / "nofolder"}, "--images", "no such folder"),
    ]
    for change, name, what in cases:
        assert main(args_for({**paths, **change}, tmp_path / "out")) == 2
        err = capsys.readouterr().err
        assert name in err and what in err
    (tmp_path / "bad.json").write_text("{")
    assert main(args_for({**paths, "captions": tmp_path / "bad.json"}, tmp_path / "out")) == 2
    assert "--captions" in (err := capsys.readouterr().err) and "is not valid JSON" in err
    assert main(args_for(paths, tmp_path / "out", "--max-instances", "-1")) == 2
    assert "--max-instances must be >= 0 (0 = no limit), got -1" in capsys.readouterr().err
    assert main(args_for(paths, tmp_path / "out", "--min-box-side", "1.5")) == 2
    assert "--min-box-side must be in [0, 1), got 1.5" in capsys.readouterr().err
    # every image filtered out (no annotation left): an error, not an empty dataset
    inst = json.loads(paths["instances"].read_text())
    inst["annotations"] = [a for a in inst["annotations"] if a["iscrowd"]]
    paths["instances"].write_text(json.dumps(inst))
    assert main(args_for(paths, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "no image left to write (0 images, 0 instances; skipped images: 4 without instances" in err
    assert not (tmp_path / "out").exists()


def test_subprocess_exit_status_and_one_line(tmp_path):
    """The console contract: status 2, one line on stderr, no traceback; status 0 on success."""
    paths = write_coco(tmp_path)
    (paths["images"] / "a.png").unlink()
    cmd = [sys.executable, "-m", "roi_ops.cli", *args_for(paths, tmp_path / "out")]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("roi-ops prepare: error: --images: ") and "a.png" in bad.stderr
    good = subprocess.run([*cmd, "--skip-bad-images"], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert read_lines(tmp_path / "out") == EXPECTED[1:]


def test_docs_show_this_output(tmp_path, capsys):
    """docs/training.md quotes this split's output: it must stay what the command writes."""
    import re

    paths = write_coco(tmp_path)
    out = tmp_path / "out"
    assert main(args_for(paths, out)) == 0
    printed = capsys.readouterr().out.strip()
    doc = (Path(__file__).resolve().parents[2] / "docs" / "training.md").read_text()
    assert printed.replace(str(out), "out") in doc
    section = doc.split("## From COCO", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```json\n(.*?)```", section, re.S).group(1)
    assert [json.loads(line) for line in block.splitlines()] == read_lines(out) == EXPECTED


def write_coco_with_masks(root: Path) -> dict:
    """One 40x20 image whose annotations carry each kind of COCO segmentation."""
    from coco_rle import rle_runs, rle_string

    import numpy as np

    images = root / "images"
    images.mkdir(parents=True)
    Image.new("RGB", (W, H), (255, 0, 0)).save(images / "s.png")
    crowd = np.zeros((H, W), dtype=bool)
    crowd[5:15, 20:38] = True
    disc = ((np.arange(W)[None, :] + 0.5 - 10) / 6) ** 2 + ((np.arange(H)[:, None] + 0.5 - 12) / 6) ** 2 <= 1
    instances = {
        "images": [{"id": 1, "file_name": "s.png", "width": W, "height": H}],
        "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "ball"}],
        "annotations": [
            # a polygon (the box itself) and a degenerate 2-point ring, which COCO has now and then: left out
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 2, 10, 8], "iscrowd": 0,
             "segmentation": [[4, 2, 14, 2, 14, 10, 4, 10], [5, 5, 6, 6]]},
            # a crowd region: uncompressed RLE (a run list), kept with --keep-crowd
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [20, 5, 18, 10], "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": rle_runs(crowd)}},
            # pycocotools' compressed string
            {"id": 3, "image_id": 1, "category_id": 2, "bbox": [4, 6, 12, 12], "iscrowd": 0,
             "segmentation": {"size": [H, W], "counts": rle_string(rle_runs(disc))}},
            {"id": 4, "image_id": 1, "category_id": 2, "bbox": [22, 0, 6, 4], "iscrowd": 0},  # no segmentation
        ],
    }
    captions = {"images": instances["images"], "annotations": [{"id": 1, "image_id": 1, "caption": "Shapes."}]}
    paths = {"instances": root / "instances.json", "captions": root / "captions.json", "images": images,
             "crowd": crowd, "disc": disc}
    paths["instances"].write_text(json.dumps(instances))
    paths["captions"].write_text(json.dumps(captions))
    return paths


def test_masks_flag_brings_polygons_and_rles_into_the_lines(tmp_path, capsys):
    import numpy as np

    from roi_ops.training.data import FolderData, read_dataset

    paths = write_coco_with_masks(tmp_path)
    out = tmp_path / "out"
    assert main(args_for(paths, out, "--masks", "--keep-crowd")) == 0
    printed = capsys.readouterr().out
    assert "masks: 1 polygon, 2 RLE, 1 instance(s) without a usable segmentation (box only)" in printed
    [line] = read_lines(out)
    inst = json.loads(paths["instances"].read_text())["annotations"]
    assert line["instances"][0]["mask"] == [[0.1, 0.1, 0.35, 0.1, 0.35, 0.5, 0.1, 0.5]]  # normalised by W and H
    assert line["instances"][1]["mask"] == inst[1]["segmentation"]  # RLEs as COCO stores them
    assert line["instances"][2]["mask"] == inst[2]["segmentation"]
    assert "mask" not in line["instances"][3]
    # the lines read back through the trainer: 40x20 at resolution 20 is cropped 10 px from the left
    records = read_dataset(out)
    assert records[0].has_mask == (True, True, True, False)
    regions = FolderData(records, 20).regions([0])[0].numpy()
    box = np.zeros((H, W), dtype=np.float32)
    box[2:10, 4:14] = 1
    for k, mask in enumerate((box, paths["crowd"], paths["disc"])):
        assert np.array_equal(regions[k], mask[:, 10:30].astype(np.float32)), k
    assert (regions[3] == 1).all()  # box only

    # without --masks: the same lines without masks
    assert main(args_for(paths, tmp_path / "plain", "--keep-crowd")) == 0
    assert "masks:" not in capsys.readouterr().out
    assert [i for i in read_lines(tmp_path / "plain")[0]["instances"]] == [
        {k: v for k, v in i.items() if k != "mask"} for i in line["instances"]]


@pytest.mark.parametrize("segmentation, message", [
    ({"size": [W, H], "counts": [W * H]}, f"annotations[0].segmentation RLE size {[W, H]} is not the image's "
                                          f"[height, width] {[H, W]}"),
    ({"size": [H, W], "counts": [5]}, "annotations[0].segmentation RLE counts add up to 5 pixels"),
    ([[1, 1, 2, 2], [4, 2, 14, 2, 14, 10, 4]], "annotations[0].segmentation polygon 1 must be a list of at least 3 "
                                                "points [x1, y1, x2, y2, ...] (numbers), got [4, 2, 14, 2, 14, 10, 4]"),
    ([[4, 2, 14, 2, "x", 10]], "annotations[0].segmentation polygon 0 must be a list of at least 3 points"),
    ([4, 2, 14, 2, 14, 10], "annotations[0].segmentation must be a list of polygons"),
])
def test_bad_segmentations_name_the_annotation(tmp_path, capsys, segmentation, message):
    paths = write_coco_with_masks(tmp_path)
    inst = json.loads(paths["instances"].read_text())
    inst["annotations"][0]["segmentation"] = segmentation
    paths["instances"].write_text(json.dumps(inst))
    assert main(args_for(paths, tmp_path / "out", "--masks")) == 2
    err = capsys.readouterr().err
    assert err.startswith("roi-ops prepare: error: --instances ") and message in err and err.count("\n") == 1, err
    assert main(args_for(paths, tmp_path / "out")) == 0  # without --masks the segmentation is not read
