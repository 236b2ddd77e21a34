"""The training data of ``roi-ops train``: an image folder with a ``metadata.jsonl``.

Each line of ``<data>/metadata.jsonl`` is one training image (the convention of ``datasets``' imagefolder)::

    {"file_name": "images/0001.png", "prompt": "a red circle and a blue square",
     "instances": [{"box": [0.1, 0.2, 0.5, 0.6], "caption": "a red circle"}, ...],
     "box_format": "xyxy", "box_units": "normalized"}

``instances``, ``box_format`` and ``box_units`` are those of the layout JSON of ``roi-ops generate`` and are
checked by the same validator (:func:`roi_ops.roictrl_adapter.pipeline.normalize_instances`), with the image's own
width and height for pixel boxes. ``instances`` may be empty or left out (an image without instances).

**Masks.** An instance may carry a ``"mask"`` in the forms of a layout file (``regions.read_mask``, the one parser):
a PNG path relative to the data folder, a COCO RLE ``{"size": [h, w], "counts": ...}`` (compressed string or
list of runs) or a COCO polygon list (in the line's ``box_units``). They are checked when the folder is read (a
PNG decoded, an RLE's runs counted, a polygon parsed; not rasterised) and decoded per sample when a batch is made,
as the instance's *region*: its exact area average over each pixel of the crop's ``region_size`` grid (the
latents), after the resize and crop below. Mask pixels outside the instance's box are cut (by pixel centre). The
folder's masks are not kept in memory: each record remembers where its line is in ``metadata.jsonl`` and re-reads
it (checking that it did not change).

:func:`read_dataset` checks the whole folder before training: every line, every image (opened and decoded), and
raises :class:`DatasetError` naming the first problem as ``metadata.jsonl:<line>: <what>``.

**Resize and crop.** Every image is resized so that its shorter side is ``resolution`` (bicubic), then the centre
``resolution x resolution`` square is cut out. Boxes follow exactly: a normalised x becomes
``(x * resized_width - left) / resolution`` (same for y), then is clipped to ``[0, 1]``. An instance whose clipped
box is narrower or lower than one output pixel (it lay outside the crop, or only a sliver of it is left) is dropped
for that image; a mask follows the same geometry. There is no random augmentation (no random crop, no flip), so a
sample is the same every time it is drawn.
"""

from __future__ import annotations

import json
import math
import os
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DatasetError", "Record", "read_dataset", "crop_geometry", "transform_box", "load_image", "METADATA"]

METADATA = "metadata.jsonl"
LINE_KEYS = ("file_name", "prompt", "instances", "box_format", "box_units")


class DatasetError(ValueError):
    """A problem in the training data, named by file and line."""


@dataclass(frozen=True)
class Record:
    """One checked line: the image's path and size, its prompt, and its instances (normalised xyxy boxes on the
    original image; :meth:`instances_at` gives them after the resize/crop). ``has_mask[k]``: instance ``k`` has a
    mask, read again from the line at ``line_span`` (byte offset, length; ``line_crc`` its CRC-32) when needed."""

    line: int
    path: str
    width: int
    height: int
    prompt: str
    boxes: tuple[tuple[float, float, float, float], ...]
    captions: tuple[str, ...]
    geometry: dict = field(default_factory=dict, compare=False)
    has_mask: tuple[bool, ...] = ()
    root: str = ""
    line_span: tuple[int, int] = (0, 0)
    line_crc: int = 0
    units: str = "normalized"  # the line's box_units: the coordinates of its polygons

    def crop(self, resolution: int) -> list[tuple[int, tuple[float, float, float, float]]]:
        """``(instance index, box on the resolution crop)`` of the instances left in the crop."""
        g = crop_geometry(self.width, self.height, resolution)
        kept = []
        for k, box in enumerate(self.boxes):
            b = transform_box(box, g, resolution)
            if b is not None:
                kept.append((k, b))
        return kept

    def instances_at(self, resolution: int) -> tuple[list[tuple[float, float, float, float]], list[str]]:
        """Boxes (normalised xyxy on the ``resolution`` crop) and captions of the instances left in the crop."""
        kept = self.crop(resolution)
        return [b for _, b in kept], [self.captions[k] for k, _ in kept]

    def mask_values(self) -> list:
        """The ``mask`` value of every instance of the line (``None`` without one), read again from the file."""
        with open(os.path.join(self.root, METADATA), "rb") as f:
            f.seek(self.line_span[0])
            raw = f.read(self.line_span[1])
        if zlib.crc32(raw) != self.line_crc:
            raise DatasetError(f"{METADATA}:{self.line}: the file changed since it was checked; start again")
        return [inst.get("mask") if isinstance(inst, dict) else None
                for inst in json.loads(raw.decode("utf-8")).get("instances", [])]

    def regions_at(self, resolution: int, size: int) -> dict[int, np.ndarray]:
        """``{instance index: float32 [size, size] array}`` for the instances with a mask left in the crop: each
        pixel of the ``size x size`` grid over the crop gets the mask's exact area average over its footprint
        (the mask as a piecewise-constant function over the whole image, whatever its own resolution; a polygon
        is first rasterised at the image's size, as the pipeline does)."""
        from roi_ops.roictrl_adapter import regions
        from roi_ops.roictrl_adapter.pipeline import _clip_mask

        kept = [k for k, _ in self.crop(resolution) if self.has_mask[k]]
        if not kept:
            return {}
        values = self.mask_values()
        g = crop_geometry(self.width, self.height, resolution)
        (rw, rh), left, top = g["resized"], g["left"], g["top"]
        out = {}
        for k in kept:
            where = f"{METADATA}:{self.line}: instances[{k}].mask"
            try:
                mask = regions.read_mask(values[k], where, base_dir=self.root, units=self.units)
            except (ValueError, TypeError) as e:
                raise DatasetError(str(e)) from None
            if isinstance(mask, regions.Polygon):
                mask = regions.to_image(mask, self.height, self.width)
            mask, _ = _clip_mask(mask, self.boxes[k])  # the pipeline's rule: pixels outside the box are cut
            # only the box's rows and columns can be nonzero now: the products skip the rest
            mh, mw = mask.shape
            x1, y1, x2, y2 = self.boxes[k]
            r0, r1 = int(math.floor(y1 * mh)), min(mh, int(math.ceil(y2 * mh)))
            c0, c1 = int(math.floor(x1 * mw)), min(mw, int(math.ceil(x2 * mw)))
            ay = _area_weights(mh, top / rh, (top + resolution) / rh, size)[:, r0:r1]
            ax = _area_weights(mw, left / rw, (left + resolution) / rw, size)[:, c0:c1]
            cov = ay @ mask[r0:r1, c0:c1].astype(np.float64) @ ax.T
            cov[cov < 1e-9] = 0.0  # float rounding of the footprints' edges, not mask
            out[k] = np.minimum(cov, 1.0).astype(np.float32)
        return out


def _area_weights(n_src: int, lo: float, hi: float, n_out: int):
    """``[n_out, n_src]``: row ``j`` averages source pixels ``i`` (spanning ``[i, i+1) / n_src`` of the image) over
    the output pixel ``[lo + j (hi - lo) / n_out, lo + (j + 1) (hi - lo) / n_out)``, by overlap length."""
    out_edges = lo + (hi - lo) * np.arange(n_out + 1) / n_out
    src_edges = np.arange(n_src + 1) / n_src
    overlap = np.minimum(out_edges[1:, None], src_edges[None, 1:]) - np.maximum(out_edges[:-1, None],
                                                                                src_edges[None, :-1])
    return np.clip(overlap, 0.0, None) / ((hi - lo) / n_out)


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


def _inside_folder(name: str) -> bool:
    """Whether the relative path ``name`` stays inside the folder it is relative to (not absolute, no ``..``)."""
    return not os.path.isabs(name) and ".." not in name.replace("\\", "/").split("/")


def _check_mask(value, where: str, root: str, width: int, height: int, units: str):
    """Check the mask ``value`` of a dataset line, cheaply: a PNG is decoded (like the images), an RLE's runs are
    counted, a polygon is parsed; nothing is rasterised. Returns what :func:`regions.read_mask` gives for a PNG
    or polygon, the RLE itself otherwise. A mask of another aspect ratio than the image (beyond one pixel of
    rounding) is refused: resized to the image, it would be stretched (a transposed RLE, another image's PNG)."""
    from roi_ops.roictrl_adapter import regions

    if isinstance(value, str) and not _inside_folder(value):
        raise ValueError(f"{where} PNG path must be relative to the data folder and stay inside it, got {value!r}")
    if isinstance(value, dict) and {"size", "counts"} <= set(value):
        h, w, _ = regions.rle_runs(value, where)
        parsed = value
    else:
        if not isinstance(value, (str, dict, list)) or (
            isinstance(value, list) and not (value and all(isinstance(r, list) for r in value))
        ):
            raise ValueError(
                f"{where} must be a PNG path (relative to the data folder), a COCO RLE {{\"size\": [h, w], "
                f"\"counts\": ...}} or a COCO polygon list [[x1, y1, x2, y2, ...], ...] (a list of rings); got "
                f"{json.dumps(value)[:60]}"
            )
        parsed = regions.read_mask(value, where, base_dir=root, units=units)
        if isinstance(parsed, regions.Polygon):
            return parsed
        h, w = parsed.shape
    if abs(h * width / w - height) > max(1.0, height / h):
        raise ValueError(
            f"{where} is {w}x{h} (width x height) but the image is {width}x{height}: not the image's aspect ratio "
            "(a transposed RLE size, or the mask of another image?)"
        )
    return parsed


def _check_line(obj, n: int, root: str, span: tuple[int, int] = (0, 0), crc: int = 0) -> Record:
    from roi_ops.roictrl_adapter import regions
    from roi_ops.roictrl_adapter.pipeline import _UNIT_ALIASES, _check_box_options, normalize_instances

    if not isinstance(obj, dict):
        raise ValueError(f"must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(LINE_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown}; expected some of {list(LINE_KEYS)}")
    name = obj.get("file_name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"file_name must be a non-empty string, got {name!r}")
    if not _inside_folder(name):
        raise ValueError(f"file_name must be a path inside the data folder, got {name!r}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {prompt!r}")
    instances = obj.get("instances", [])
    if not isinstance(instances, list):
        raise ValueError(f"instances must be a list, got {type(instances).__name__}")
    box_format, box_units = obj.get("box_format", "xyxy"), obj.get("box_units", "normalized")
    _check_box_options(box_format, box_units)
    units = _UNIT_ALIASES[box_units]
    path = os.path.join(root, name)
    if not os.path.isfile(path):
        raise ValueError(f"image {name!r}: no such file in {root}")
    try:
        width, height = _image_size(path)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise ValueError(f"image {name!r} cannot be decoded: {e}") from None
    # The boxes and captions go through the layout validator without their masks (checked here, decoded per
    # sample); a mask without a box goes with it, decoded, so that the validator takes its bounding box.
    plain, has_mask = [], []
    for i, inst in enumerate(instances):
        mask = inst.get("mask") if isinstance(inst, dict) else None
        has_mask.append(mask is not None)
        if mask is None:
            plain.append(inst)
            continue
        parsed = _check_mask(mask, f"instances[{i}].mask", root, width, height, units)
        rest = {k: v for k, v in inst.items() if k != "mask"}
        if "box" not in inst:
            rest["mask"] = regions.decode_rle(parsed) if isinstance(parsed, dict) else parsed
        plain.append(rest)
    try:
        rows = normalize_instances(plain, 1, width=width, height=height, box_format=box_format, box_units=box_units)
    except (ValueError, TypeError) as e:
        raise ValueError(_WHERE.sub(r"instances[\1]", str(e))) from None
    row = rows[0]
    return Record(n, path, width, height, prompt, tuple(tuple(float(v) for v in i.box) for i in row),
                  tuple(i.caption for i in row),
                  has_mask=tuple(has_mask), root=root, line_span=span, line_crc=crc, units=units)


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
    offset = 0
    with open(meta, "rb") as f:
        for n, raw in enumerate(f, start=1):
            span, offset = (offset, len(raw)), offset + len(raw)
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
                records.append(_check_line(obj, n, root, span, zlib.crc32(raw)))
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
    """The checked records of a folder, as :class:`Batch` es at ``resolution`` (images and masks decoded on demand).

    Masks become ``regions`` ``Tensor[B, N, region_size, region_size]`` (default: ``resolution``; ``roi-ops train``
    passes the latent side, ``resolution / vae_scale_factor``, which the adapter's layer maps divide exactly): the
    area-averaged coverage of each masked instance, all ones for instances without a mask and for padding, or
    ``None`` for a batch without any mask (boxes only, bitwise the adapter without regions)."""

    def __init__(self, records: Sequence[Record], resolution: int, region_size: int | None = None):
        self.records, self.resolution = list(records), resolution
        self.region_size = resolution if region_size is None else int(region_size)
        self.instances = [r.instances_at(resolution) for r in self.records]
        self.max_instances = max([len(b) for b, _ in self.instances] + [1])

    def __len__(self) -> int:
        return len(self.records)

    def meta(self, indices: Sequence[int]) -> Batch:
        """The batch without pixels and masks."""
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

    def regions(self, indices: Sequence[int]):
        """``Tensor[B, N, region_size, region_size]`` of the samples' masks (see the class), or ``None``."""
        import torch

        indices = [int(i) for i in indices]
        if not any(any(self.records[i].has_mask) for i in indices):
            return None
        s = self.region_size
        out = torch.ones(len(indices), self.max_instances, s, s)
        any_mask = False
        for b, i in enumerate(indices):
            rec = self.records[i]
            if not any(rec.has_mask):
                continue
            found = rec.regions_at(self.resolution, s)
            for slot, (k, _) in enumerate(rec.crop(self.resolution)):  # the slots of instances_at, in order
                if k in found:
                    out[b, slot] = torch.from_numpy(found[k])
                    any_mask = True
        return out if any_mask else None  # every mask was cropped away: boxes only

    def get(self, indices: Sequence[int]) -> Batch:
        import torch

        indices = [int(i) for i in indices]
        batch = self.meta(indices)
        batch.images = torch.stack([load_image(self.records[i].path, self.resolution) for i in indices])
        batch.regions = self.regions(indices)
        return batch


class TensorData:
    """In-memory data: the latent posterior (mean, std) of every sample, with prompts and padded instances. What
    ``--cache-embeddings`` builds from a folder, and what the toy benchmark hands the trainer directly."""

    def __init__(self, latent_mean, latent_std, prompts, captions, boxes, masks, time_ids=None, regions=None):
        self.latent_mean, self.latent_std = latent_mean, latent_std
        self.prompts, self.captions, self.boxes, self.masks = list(prompts), captions, boxes, masks
        self.time_ids = time_ids
        # Tensor[n, N, h, w], None, or a function (indices -> Tensor[B, N, h, w] | None) that decodes a batch's
        # masks on demand: a folder's masks are not cached (they would cost n x N x h x w floats)
        self.regions = regions
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
            regions=self.regions(il) if callable(self.regions) else (
                None if self.regions is None else self.regions[idx]),
        )


def check_resolution(resolution: int, multiple: int) -> None:
    if resolution <= 0 or resolution % multiple:
        raise ValueError(
            f"--resolution {resolution} is not a positive multiple of {multiple} (the VAE factor x the UNet's "
            f"downsampling): the VAE and UNet cannot take it; try {max(multiple, multiple * math.floor(resolution / multiple))}"
        )
