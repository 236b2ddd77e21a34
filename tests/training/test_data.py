"""The data folder of ``roi-ops train``: every line and image checked before training, the first problem named
as ``metadata.jsonl:<line>: ...``; boxes follow the resize and centre crop exactly."""

import os

import numpy as np
import pytest
import torch
from training_helpers import write_lines
from PIL import Image

from roi_ops.training.data import DatasetError, FolderData, crop_geometry, load_image, read_dataset, transform_box

GOOD = {"file_name": "a.png", "prompt": "a red thing", "instances": [{"box": [0.1, 0.1, 0.5, 0.9], "caption": "red"}]}


def _error(tmp_path, lines, images=("a.png",)) -> str:
    with pytest.raises(DatasetError) as e:
        read_dataset(write_lines(tmp_path, lines, images))
    return str(e.value)


@pytest.mark.parametrize("line, message", [
    # instances: the layout validator's messages (roi-ops generate's), with the instance's index
    ({**GOOD, "instances": [{"box": [0.1, 0.2, 0.3], "caption": "x"}]}, "metadata.jsonl:2: instances[0] box.*4 numbers"),
    ({**GOOD, "instances": [GOOD["instances"][0], {"box": [0.1, 0.2, 0.3, 0.4]}]}, "metadata.jsonl:2: instances[1].*caption"),
    ({**GOOD, "instances": [{"box": [5, 5, 30, 20], "caption": "x"}]}, "metadata.jsonl:2: instances[0] box.*pixel"),
    ({**GOOD, "box_units": "inches"}, "metadata.jsonl:2: box_units must be one of"),
    ({**GOOD, "file_name": "missing.png"}, "metadata.jsonl:2: image 'missing.png': no such file"),
    ({**GOOD, "file_name": "../a.png"}, "metadata.jsonl:2: file_name must be a path inside the data folder"),
    ({**GOOD, "prompt": 3}, "metadata.jsonl:2: prompt must be a string"),
    ({**GOOD, "colour": "red"}, "metadata.jsonl:2: unknown keys ['colour']"),
    ('{"file_name": "a.png", "prompt": ', "metadata.jsonl:2: not valid JSON"),
    ("[1, 2]", "metadata.jsonl:2: must be a JSON object"),
])
def test_first_problem_is_named_with_its_line(tmp_path, line, message):
    got = _error(tmp_path, [GOOD, line, "not even json"])
    prefix, _, rest = message.partition(".*")
    assert got.startswith(prefix) and rest.lower() in got.lower(), got


def test_pixel_boxes_use_the_image_size_and_blank_lines_are_skipped(tmp_path):
    line = {**GOOD, "box_units": "pixels", "box_format": "xywh", "instances": [{"box": [4, 6, 20, 12], "caption": "x"}]}
    records = read_dataset(write_lines(tmp_path, [GOOD, "", line]))
    assert [r.line for r in records] == [1, 3]
    assert records[1].boxes == ((0.1, 0.25, 0.6, 0.75),)  # the image is 40x24


def test_undecodable_and_missing_images_and_empty_datasets(tmp_path):
    folder = write_lines(tmp_path / "a", [GOOD, {**GOOD, "file_name": "b.png"}])
    with open(os.path.join(folder, "b.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(DatasetError, match=r"^metadata.jsonl:2: image 'b.png' cannot be decoded"):
        read_dataset(folder)
    with pytest.raises(DatasetError, match="an empty dataset"):
        read_dataset(write_lines(tmp_path / "b", ["", "  "]))
    with pytest.raises(DatasetError, match="has no metadata.jsonl"):
        read_dataset(tmp_path)
    with pytest.raises(DatasetError, match="no such folder"):
        read_dataset(tmp_path / "nowhere")


def test_boxes_follow_resize_and_centre_crop_exactly(tmp_path):
    """A 60x40 image with a white rectangle on pixel edges: after the resize to 32 (48x32) and the centre crop
    (8 px off the left), the transformed box is exactly where the rectangle's pixels are."""
    W, H, R = 60, 40, 32
    img = np.zeros((H, W, 3), np.uint8)
    x1, y1, x2, y2 = 20, 10, 50, 30  # pixel edges
    img[y1:y2, x1:x2] = 255
    Image.fromarray(img).save(tmp_path / "r.png")
    g = crop_geometry(W, H, R)
    assert g == {"resized": (48, 32), "left": 8, "top": 0, "original": (40, 60)}
    box = transform_box((x1 / W, y1 / H, x2 / W, y2 / H), g, R)
    assert box == pytest.approx(((20 * 0.8 - 8) / 32, 8 / 32, (50 * 0.8 - 8) / 32, 24 / 32))
    pixels = load_image(str(tmp_path / "r.png"), R)
    assert pixels.shape == (3, R, R) and -1 <= pixels.min() and pixels.max() <= 1
    inside = pixels[0] > 0
    ys, xs = torch.nonzero(inside, as_tuple=True)
    # the bright region's pixel edges, normalised, match the box (bicubic blurs at most one pixel)
    got = (xs.min().item() / R, ys.min().item() / R, (xs.max().item() + 1) / R, (ys.max().item() + 1) / R)
    assert got == pytest.approx(box, abs=1.01 / R)


def test_instances_outside_the_crop_are_dropped_and_partial_ones_clipped(tmp_path):
    line = {"file_name": "a.png", "prompt": "p", "instances": [
        {"box": [0.0, 0.0, 0.1, 1.0], "caption": "left edge, cropped away"},
        {"box": [0.05, 0.0, 0.5, 0.5], "caption": "half in"},
        {"box": [0.4, 0.4, 0.6, 0.6], "caption": "centre"},
    ]}
    records = read_dataset(write_lines(tmp_path, [line]))  # 40x24 -> 53x32, 10 px cut on the left
    data = FolderData(records, 32)
    batch = data.get([0])
    assert data.max_instances == 2 and batch.captions == [["half in", "centre"]]
    assert batch.boxes[0, 0, 0] == 0 and batch.masks.tolist() == [[True, True]]
    assert batch.images.shape == (1, 3, 32, 32)
    assert batch.time_ids.tolist() == [[24, 40, 0, 10, 32, 32]]
