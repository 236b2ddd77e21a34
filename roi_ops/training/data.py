"""The training data of ``roi-ops train``: an image folder with a ``metadata.jsonl``.

Each line of ``<data>/metadata.jsonl`` is one training image (the convention of ``datasets``' imagefolder)::

    {"file_name": "images/0001.png", "prompt": "a red circle and a blue square",
     "instances": [{"box": [0.1, 0.2, 0.5, 0.6], "caption": "a red circle"}, ...],
     "box_format": "xyxy", "box_units": "normalized"}

``instances``, ``box_format`` and ``box_units`` are those of the layout JSON of ``roi-ops generate`` and are
checked by the same validator (:func:`roi_ops.roictrl_adapter.pipeline.normalize_instances`), with the image's own
width and height for pixel boxes. ``instances`` may be empty or left out (an image without instances).

:func:`read_dataset` checks the whole folder before training: every line, every image (opened and decoded), and
raises :class:`DatasetError` naming the first problem as ``metadata.jsonl:<line>: <what>``.

**Resize and crop.** Every image is resized so that its shorter side is ``resolution`` (bicubic), then the centre
``resolution x resolution`` square is cut out. Boxes follow exactly: a normalised x becomes
``(x * resized_width - left) / resolution`` (same for y), then is clipped to ``[0, 1]``. An instance whose clipped
box is narrower or lower than one output pixel (it lay outside the crop, or only a sliver of it is left) is dropped
for that image. There is no random augmentation (no random crop, no flip), so a sample is the same every time it
is drawn.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DatasetError", "Record", "read_dataset", "crop_geometry", "transform_box", "load_image", "METADATA"]

METADATA = "metadata.jsonl"
LINE_KEYS = ("file_name", "prompt", "instances", "box_format", "box_units")


class DatasetError(ValueError):
    """A problem in the training data, named by file and line."""


@dataclass(frozen=True)
class Record:
    """One checked line: the image's path and size, its prompt, and its instances (normalised xyxy boxes on the
    original image; :meth:`instances_at` gives them after the resize/crop)."""

    line: int
    path: str
    width: int
    height: int
    prompt: str
    boxes: tuple[tuple[float, float, float, float], ...]
    captions: tuple[str, ...]
    geometry: dict = field(default_factory=dict, compare=False)

    def instances_at(self, resolution: int) -> tuple[list[tuple[float, float, float, float]], list[str]]:
        """Boxes (normalised xyxy on the ``resolution`` crop) and captions of the instances left in the crop."""
        g = crop_geometry(self.width, self.height, resolution)
        boxes, captions = [], []
        for box, caption in zip(self.boxes, self.captions):
            b = transform_box(box, g, resolution)
            if b is not None:
                boxes.append(b)
                captions.append(caption)
        return boxes, captions


def crop_geometry(width: int, height: int, resolution: int) -> dict:
    """Resize (shorter side to ``resolution``) and centre-crop geometry of a ``width x height`` image:
    ``resized`` (w, h), ``left``/``top`` of the crop in resized pixels, ``original`` (h, w) (SDXL's time ids)."""
    scale = resolution / min(width, height)
    rw, rh = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    return {"resized": (rw, rh), "left": (rw - resolution) // 2, "top": (rh - resolution) // 2,
            "original": (height, width)}


def transform_box(box, geometry: dict, resolution: int):
    """``box`` (normalised xyxy on the original image) on the crop, clipped to ``[0, 1]``; ``None`` when less
    than one output pixel of it is left in either direction."""
    rw, rh = geometry["resized"]
    left, top = geometry["left"], geometry["top"]
    x1, y1, x2, y2 = box
    out = ((x1 * rw - left) / resolution, (y1 * rh - top) / resolution,
           (x2 * rw - left) / resolution, (y2 * rh - top) / resolution)
    out = tuple(min(max(v, 0.0), 1.0) for v in out)
    if (out[2] - out[0]) * resolution < 1 or (out[3] - out[1]) * resolution < 1:
        return None
    return out


def load_image(path: str, resolution: int):
    """float32 ``[3, resolution, resolution]`` in ``[-1, 1]``: the image resized and centre-cropped as above."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        g = crop_geometry(im.width, im.height, resolution)
        if g["resized"] != (im.width, im.height):
            im = im.resize(g["resized"], Image.BICUBIC)
        im = im.crop((g["left"], g["top"], g["left"] + resolution, g["top"] + resolution))
        arr = np.asarray(im, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) of the image at ``path``, after decoding it completely (raises ``OSError``)."""
    from PIL import Image

    with Image.open(path) as im:
        size = im.size
        if im.format == "JPEG":  # decode at a reduced scale: every byte is still read and checked, faster
            im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        im.load()
    return size


_WHERE = re.compile(r"instances\[0\]\[(\d+)\]")


def _check_line(obj, n: int, root: str) -> Record:
    from roi_ops.roictrl_adapter.pipeline import normalize_instances

    if not isinstance(obj, dict):
        raise ValueError(f"must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(LINE_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown}; expected some of {list(LINE_KEYS)}")
    name = obj.get("file_name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"file_name must be a non-empty string, got {name!r}")
    if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"file_name must be a path inside the data folder, got {name!r}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {prompt!r}")
    instances = obj.get("instances", [])
    if not isinstance(instances, list):
        raise ValueError(f"instances must be a list, got {type(instances).__name__}")
    for i, inst in enumerate(instances):
        if isinstance(inst, dict) and "mask" in inst:
            # the pipeline reads instance masks; the folder data does not carry them through its crop yet
            raise ValueError(
                f"instances[{i}].mask: masks in dataset lines are not supported by the trainer yet (only in "
                "ROICtrlPipeline, roi-ops generate layouts and the toy benchmark's in-memory data); drop the key"
            )
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise ValueError(f"image {name!r}: no such file in {root}")
    try:
        width, height = _image_size(path)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise ValueError(f"image {name!r} cannot be decoded: {e}") from None
    try:
        rows = normalize_instances(
            instances, 1, width=width, height=height, box_format=obj.get("box_format", "xyxy"),
            box_units=obj.get("box_units", "normalized"),
        )
    except (ValueError, TypeError) as e:
        raise ValueError(_WHERE.sub(r"instances[\1]", str(e))) from None
    row = rows[0]
    return Record(n, path, width, height, prompt, tuple(i.box for i in row), tuple(i.caption for i in row))


def read_dataset(data_dir: str | os.PathLike, limit_errors: int = 1) -> list[Record]:
    """Check ``<data_dir>/metadata.jsonl`` and every image it names; return one :class:`Record` per line.

    Blank lines are skipped. Raises :class:`DatasetError` (``metadata.jsonl:<line>: ...``) at the first problem, or
    when the folder, the file or the dataset is missing or empty.
    """
    root = os.fspath(data_dir)
    if not os.path.isdir(root):
        raise DatasetError(f"--data {root!r}: no such folder")
    meta = os.path.join(root, METADATA)
    if not os.path.isfile(meta):
        raise DatasetError(f"--data {root!r} has no {METADATA} (one JSON object per line: file_name, prompt, "
                           "instances)")
    records = []
    with open(meta, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{METADATA}:{n}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{where}: not UTF-8 ({e})") from None
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON: {e}") from None
            try:
                records.append(_check_line(obj, n, root))
            except ValueError as e:
                raise DatasetError(f"{where}: {e}") from None
    if not records:
        raise DatasetError(f"{meta} holds no training image (an empty dataset)")
    return records


# ---------------------------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """What one micro-batch needs before the frozen encoders: pixels (or the cached latent posterior), prompts,
    instances padded to ``N`` slots (captions ``""`` in padded slots), and SDXL's size conditioning."""

    prompts: list[str]
    captions: list[list[str]]
    boxes: Any  # Tensor[B, N, 4]
    masks: Any  # Tensor[B, N] bool
    images: Any = None  # Tensor[B, 3, R, R] in [-1, 1]
    latent_mean: Any = None  # Tensor[B, C, h, w]
    latent_std: Any = None
    time_ids: Any = None  # Tensor[B, 6]: original (h, w), crop (top, left), target (h, w)
    regions: Any = None  # Tensor[B, N, h, w] in [0, 1]: instance masks (all ones: box only); None: boxes only


class FolderData:
    """The checked records of a folder, as :class:`Batch` es at ``resolution`` (images decoded on demand)."""

    def __init__(self, records: Sequence[Record], resolution: int):
        self.records, self.resolution = list(records), resolution
        self.instances = [r.instances_at(resolution) for r in self.records]
        self.max_instances = max([len(b) for b, _ in self.instances] + [1])

    def __len__(self) -> int:
        return len(self.records)

    def meta(self, indices: Sequence[int]) -> Batch:
        """The batch without pixels."""
        import torch

        indices = [int(i) for i in indices]
        R, N = self.resolution, self.max_instances
        B = len(indices)
        boxes = torch.zeros(B, N, 4)
        masks = torch.zeros(B, N, dtype=torch.bool)
        captions = [[""] * N for _ in range(B)]
        time_ids = torch.zeros(B, 6)
        for b, i in enumerate(indices):
            bx, caps = self.instances[i]
            for k, (box, cap) in enumerate(zip(bx, caps)):
                boxes[b, k] = torch.tensor(box)
                masks[b, k] = True
                captions[b][k] = cap
            rec = self.records[i]
            g = crop_geometry(rec.width, rec.height, R)
            time_ids[b] = torch.tensor([*g["original"], g["top"], g["left"], R, R], dtype=torch.float32)
        return Batch([self.records[i].prompt for i in indices], captions, boxes, masks, time_ids=time_ids)

    def get(self, indices: Sequence[int]) -> Batch:
        import torch

        indices = [int(i) for i in indices]
        batch = self.meta(indices)
        batch.images = torch.stack([load_image(self.records[i].path, self.resolution) for i in indices])
        return batch


class TensorData:
    """In-memory data: the latent posterior (mean, std) of every sample, with prompts and padded instances. What
    ``--cache-embeddings`` builds from a folder, and what the toy benchmark hands the trainer directly."""

    def __init__(self, latent_mean, latent_std, prompts, captions, boxes, masks, time_ids=None, regions=None):
        self.latent_mean, self.latent_std = latent_mean, latent_std
        self.prompts, self.captions, self.boxes, self.masks = list(prompts), captions, boxes, masks
        self.time_ids = time_ids
        self.regions = regions  # Tensor[n, N, h, w] or None
        self.max_instances = boxes.shape[1]

    def __len__(self) -> int:
        return len(self.prompts)

    def get(self, indices) -> Batch:
        import torch

        idx = torch.as_tensor(indices, dtype=torch.long)
        il = idx.tolist()
        return Batch(
            [self.prompts[i] for i in il], [list(self.captions[i]) for i in il], self.boxes[idx], self.masks[idx],
            latent_mean=self.latent_mean[idx], latent_std=self.latent_std[idx],
            time_ids=None if self.time_ids is None else self.time_ids[idx],
            regions=None if self.regions is None else self.regions[idx],
        )


def check_resolution(resolution: int, multiple: int) -> None:
    if resolution <= 0 or resolution % multiple:
        raise ValueError(
            f"--resolution {resolution} is not a positive multiple of {multiple} (the VAE factor x the UNet's "
            f"downsampling): the VAE and UNet cannot take it; try {max(multiple, multiple * math.floor(resolution / multiple))}"
        )
