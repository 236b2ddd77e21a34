"""COCO -> the training data format: an image folder with ``metadata.jsonl`` (see docs/training.md, "From COCO").

Each output line is ``{"file_name": ..., "prompt": ..., "instances": [{"box": [x1, y1, x2, y2], "caption": ...}]}``
with boxes normalised to ``[0, 1]`` of the image's width and height (``xyxy``, the layout JSON's defaults, so no
``box_format``/``box_units`` keys are needed). With ``masks`` (``--masks``) each instance also gets its COCO
segmentation as ``"mask"``: polygons normalised like the boxes, RLEs (``iscrowd``'s run lists, compressed
strings) as COCO stores them. The rules for crowd, tiny and surplus boxes, images without
instances or captions and missing images are in :class:`CocoOptions` and docs/training.md.

Importable without torch (``masks`` imports it, to check segmentations with the trainer's own parser)::

    from roi_ops.training.coco import CocoOptions, convert_coco
    stats = convert_coco("instances_val2017.json", "captions_val2017.json", "val2017", "coco_roictrl")
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

LINK_MODES = ("copy", "symlink", "hardlink")
#: Digits kept of each normalised coordinate: 1e-6 of a 640 px side is well under a pixel, and lines stay short.
BOX_DIGITS = 6


class CocoError(ValueError):
    """A problem with the inputs, the message names the file and the entry (the CLI prints it as one line)."""


@dataclass
class CocoOptions:
    """The conversion rules (each one a CLI option of ``roi-ops prepare coco``)."""

    #: Boxes whose width or height is below this fraction of the image's width or height are dropped (a box
    #: with no area is always dropped). 0.02 is a bit over one pixel of the finest adapter feature map of a
    #: 512 px training image (64 latent pixels a side); a thinner box may cover no feature-map pixel.
    min_box_side: float = 0.02
    #: At most this many instances per image (the largest by area are kept, ties to the earlier annotation,
    #: in the file's order); 0 = no limit.
    max_instances: int = 10
    #: Keep ``iscrowd`` boxes (a box around a group, e.g. a crowd of people) as ordinary instances.
    keep_crowd: bool = False
    #: Keep images left without instances (after the filters above) with ``"instances": []``.
    keep_empty: bool = False
    #: Skip (and count) images that are missing, unreadable or of another size than the JSON says, instead of
    #: stopping with an error naming the first one.
    skip_bad_images: bool = False
    #: How images get into the output folder: ``copy`` (default, the folder stands alone), ``symlink`` (absolute
    #: links to the originals, no extra disk) or ``hardlink`` (same file system only).
    link_mode: str = "copy"
    #: Convert only the first N images (by image id) that yield a line; 0 = all.
    max_images: int = 0
    #: Replace an existing ``metadata.jsonl`` in the output folder.
    overwrite: bool = False
    #: Write each instance's segmentation as its ``"mask"`` (polygons normalised to the image, RLEs as given).
    #: Off by default: masks change what the adapter learns (mask-shaped blending) and polygons take most of an
    #: instances file's bytes, so the metadata grows several times over.
    masks: bool = False


@dataclass
class CocoStats:
    """What the conversion did, counted (printed by the CLI, returned by :func:`convert_coco`)."""

    images_written: int = 0
    instances_written: int = 0
    images_in_json: int = 0
    skipped_no_instances: int = 0
    skipped_no_caption: int = 0
    skipped_bad_image: int = 0
    dropped_crowd: int = 0
    dropped_small: int = 0
    dropped_over_limit: int = 0
    clamped_boxes: int = 0
    masks_polygon: int = 0
    masks_rle: int = 0
    masks_missing: int = 0
    masks: bool = False
    bad_images: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{self.images_written} images, {self.instances_written} instances"]
        skipped = [("without instances", self.skipped_no_instances), ("without a caption", self.skipped_no_caption),
                   ("missing or unreadable", self.skipped_bad_image)]
        dropped = [("crowd", self.dropped_crowd), ("too small", self.dropped_small),
                   ("over --max-instances", self.dropped_over_limit)]
        parts.append("skipped images: " + ", ".join(f"{n} {what}" for what, n in skipped))
        parts.append("dropped boxes: " + ", ".join(f"{n} {what}" for what, n in dropped))
        if self.clamped_boxes:
            parts.append(f"clamped to the image: {self.clamped_boxes} box(es)")
        if self.masks:
            parts.append(f"masks: {self.masks_polygon} polygon, {self.masks_rle} RLE, {self.masks_missing} "
                         "instance(s) without a usable segmentation (box only)")
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------- reading
def _load_json(path: str | os.PathLike, flag: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CocoError(f"{flag} {os.fspath(path)!r}: no such file") from None
    except IsADirectoryError:
        raise CocoError(f"{flag} {os.fspath(path)!r} is a folder, expected a COCO JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CocoError(f"{flag} {os.fspath(path)!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CocoError(f"{flag} {os.fspath(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def _list(data: dict, key: str, where: str) -> list:
    value = data.get(key)
    if not isinstance(value, list):
        got = "nothing" if value is None else type(value).__name__
        raise CocoError(f"{where} needs a list {key!r} (COCO format), got {got}")
    return value


def _int_id(entry: Any, key: str, where: str) -> int:
    if not isinstance(entry, dict):
        raise CocoError(f"{where} must be an object, got {type(entry).__name__}")
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CocoError(f"{where}.{key} must be an integer, got {value!r}")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _safe_relative(name: Any, where: str) -> str:
    """A COCO ``file_name`` as a relative POSIX path that stays inside the folders (no ``..``, not absolute)."""
    if not isinstance(name, str) or not name.strip():
        raise CocoError(f"{where}.file_name must be a non-empty string, got {name!r}")
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise CocoError(f"{where}.file_name must be a relative path inside --images, got {name!r}")
    return str(p)


def _clean_text(text: str) -> str:
    return " ".join(text.split())  # COCO captions carry stray newlines and double spaces


# ----------------------------------------------------------------------------------------------- conversion
def convert_segmentation(seg: Any, width: int, height: int, where: str):
    """A COCO ``segmentation`` as a dataset line's ``"mask"``, or ``None`` when it has no usable shape.

    Polygons (``[[x1, y1, x2, y2, ...], ...]`` in pixels) are normalised by the image's width and height and rounded
    like the boxes; rings of fewer than 3 points (COCO has a few) are left out. An RLE (``{"size": [h, w],
    "counts": list or compressed string}``, e.g. an ``iscrowd`` region) is kept as COCO stores it; its size must be
    the image's ``[height, width]``. Both are checked with the trainer's own parser (``regions``), so a written
    line always reads back; a malformed one raises :class:`CocoError` naming ``where``."""
    from roi_ops.roictrl_adapter import regions

    if seg is None or seg == [] or seg == {}:
        return None
    try:
        if isinstance(seg, dict):
            h, w, runs = regions.rle_runs(seg, where)
            if [h, w] != [height, width]:
                raise ValueError(f"{where} RLE size {[h, w]} is not the image's [height, width] {[height, width]}")
            if not any(runs[1::2]):
                return None
            return {"size": [h, w], "counts": seg["counts"]}
        if not isinstance(seg, list) or not all(isinstance(r, list) for r in seg):
            raise ValueError(f"{where} must be a list of polygons [[x1, y1, ...], ...] or an RLE object, got "
                             f"{str(seg)[:80]}")
        rings = []
        for j, ring in enumerate(seg):
            if len(ring) < 6 and len(ring) % 2 == 0 and all(_number(v) for v in ring):
                continue  # fewer than 3 points: no area
            try:
                regions.read_mask([ring], where, units="pixels")  # numbers, even length, finite
            except ValueError as e:  # it numbers the rings it was given: name this one by its index
                raise ValueError(str(e).replace(f"{where} polygon 0", f"{where} polygon {j}", 1)) from None
            rings.append(ring)
        if not rings:
            return None
    except (ValueError, TypeError) as e:
        raise CocoError(str(e)) from None
    return [[round(v / (width if j % 2 == 0 else height), BOX_DIGITS) for j, v in enumerate(r)] for r in rings]


def convert_box(bbox: list, width: int, height: int) -> tuple[list[float], bool]:
    """COCO ``[x, y, w, h]`` in pixels -> normalised ``[x1, y1, x2, y2]`` clamped to ``[0, 1]`` (and whether a
    coordinate had to be clamped: COCO boxes overshoot the image by a fraction of a pixel now and then)."""
    x, y, w, h = (float(v) for v in bbox)
    raw = (x / width, y / height, (x + w) / width, (y + h) / height)
    box = [round(min(max(v, 0.0), 1.0), BOX_DIGITS) for v in raw]
    return box, any(v < 0.0 or v > 1.0 for v in raw)


def _image_problem(path: Path, width: int, height: int) -> str | None:
    """Why ``path`` cannot be used (missing, unreadable, another size than the JSON's), or None. Reads the
    header only (PIL opens lazily), so checking a whole COCO split costs seconds, not a decode of every image."""
    if not path.is_file():
        return "no such file"
    try:
        from PIL import Image

        with Image.open(path) as im:
            size = im.size
    except Exception as e:  # PIL raises several types for bad files
        return f"cannot be read as an image ({type(e).__name__}: {e})"
    if size != (width, height):
        return f"is {size[0]}x{size[1]} but the instances file says {width}x{height} (the boxes would be wrong)"
    return None


def build_lines(instances_json: dict, captions_json: dict, images_dir: str | os.PathLike,
                options: CocoOptions, instances_name: str = "--instances",
                captions_name: str = "--captions") -> tuple[list[tuple[str, dict]], CocoStats]:
    """The metadata lines (with each line's source image path), in image-id order, and the counts.

    Raises :class:`CocoError` naming the file and entry of the first malformed record, or (without
    ``skip_bad_images``) the first missing or unreadable image.
    """
    stats = CocoStats(masks=options.masks)
    images_dir = Path(images_dir)
    categories: dict[int, str] = {}
    for i, c in enumerate(_list(instances_json, "categories", instances_name)):
        where = f"{instances_name} categories[{i}]"
        cid = _int_id(c, "id", where)
        name = c.get("name")
        if not isinstance(name, str) or not name.strip():
            raise CocoError(f"{where}.name must be a non-empty string, got {name!r}")
        categories[cid] = _clean_text(name)

    images: dict[int, dict] = {}
    for i, im in enumerate(_list(instances_json, "images", instances_name)):
        where = f"{instances_name} images[{i}]"
        iid = _int_id(im, "id", where)
        for key in ("width", "height"):
            v = im.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise CocoError(f"{where}.{key} must be a positive integer, got {v!r}")
        if iid in images:
            raise CocoError(f"{where}: image id {iid} appears twice")
        images[iid] = {"file_name": _safe_relative(im.get("file_name"), where), "width": im["width"],
                       "height": im["height"], "boxes": []}
    stats.images_in_json = len(images)

    for i, a in enumerate(_list(instances_json, "annotations", instances_name)):
        where = f"{instances_name} annotations[{i}]"
        iid, cid = _int_id(a, "image_id", where), _int_id(a, "category_id", where)
        if iid not in images:
            raise CocoError(f"{where}.image_id {iid} is not in images")
        if cid not in categories:
            raise CocoError(f"{where}.category_id {cid} is not in categories")
        bbox = a.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
            raise CocoError(f"{where}.bbox must be 4 finite numbers [x, y, width, height], got {bbox!r}")
        im = images[iid]
        if a.get("iscrowd", 0) and not options.keep_crowd:
            stats.dropped_crowd += 1
            continue
        x, y, w, h = bbox
        if w <= 0 or h <= 0 or w < options.min_box_side * im["width"] or h < options.min_box_side * im["height"]:
            stats.dropped_small += 1
            continue
        box, clamped = convert_box(bbox, im["width"], im["height"])
        if box[2] <= box[0] or box[3] <= box[1]:  # entirely outside the image: nothing left after clamping
            stats.dropped_small += 1
            continue
        stats.clamped_boxes += clamped
        instance = {"box": box, "caption": categories[cid]}
        if options.masks:
            mask = convert_segmentation(a.get("segmentation"), im["width"], im["height"], f"{where}.segmentation")
            if mask is not None:
                instance["mask"] = mask
        im["boxes"].append((w * h, len(im["boxes"]), instance))

    prompts: dict[int, tuple[int, str]] = {}  # image id -> (caption id, text): the lowest caption id wins
    for i, c in enumerate(_list(captions_json, "annotations", captions_name)):
        where = f"{captions_name} annotations[{i}]"
        iid, cap_id = _int_id(c, "image_id", where), _int_id(c, "id", where)
        text = c.get("caption")
        if not isinstance(text, str):
            raise CocoError(f"{where}.caption must be a string, got {text!r}")
        text = _clean_text(text)
        if iid in images and text and (iid not in prompts or cap_id < prompts[iid][0]):
            prompts[iid] = (cap_id, text)

    lines: list[tuple[str, dict]] = []
    for iid in sorted(images):
        if options.max_images and len(lines) >= options.max_images:
            break
        im = images[iid]
        boxes = im["boxes"]
        if options.max_instances and len(boxes) > options.max_instances:
            keep = sorted(boxes, key=lambda b: (-b[0], b[1]))[: options.max_instances]
            stats.dropped_over_limit += len(boxes) - len(keep)
            boxes = sorted(keep, key=lambda b: b[1])
        if not boxes and not options.keep_empty:
            stats.skipped_no_instances += 1
            continue
        if iid not in prompts:
            stats.skipped_no_caption += 1
            continue
        source = images_dir / im["file_name"]
        problem = _image_problem(source, im["width"], im["height"])
        if problem is not None:
            if not options.skip_bad_images:
                raise CocoError(
                    f"--images: {os.fspath(source)!r} (image id {iid}) {problem}; pass --skip-bad-images to skip "
                    "such images"
                )
            stats.skipped_bad_image += 1
            stats.bad_images.append(os.fspath(source))
            continue
        line = {"file_name": im["file_name"], "prompt": prompts[iid][1], "instances": [b[2] for b in boxes]}
        lines.append((os.fspath(source), line))
        stats.images_written += 1
        stats.instances_written += len(boxes)
        for _, _, inst in boxes:  # masks are counted on what is written
            kind = type(inst.get("mask")).__name__
            stats.masks_polygon += kind == "list"
            stats.masks_rle += kind == "dict"
            stats.masks_missing += options.masks and kind == "NoneType"
    return lines, stats


def _place(source: str, target: Path, mode: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    if mode == "copy":
        shutil.copyfile(source, target)
    elif mode == "symlink":
        target.symlink_to(os.path.abspath(source))
    else:
        os.link(source, target)


def convert_coco(instances: str | os.PathLike, captions: str | os.PathLike, images: str | os.PathLike,
                 out: str | os.PathLike, options: CocoOptions | None = None) -> CocoStats:
    """Convert a COCO split to ``out/metadata.jsonl`` plus the images (copied or linked at their COCO
    ``file_name`` under ``out``). Everything is checked before anything is written; ``metadata.jsonl`` is
    written last, through a temporary file, so an interrupted run leaves no metadata file that names missing
    images. Returns the counts; raises :class:`CocoError` with a one-line message."""
    options = options or CocoOptions()
    if options.link_mode not in LINK_MODES:
        raise CocoError(f"--link must be one of {list(LINK_MODES)}, got {options.link_mode!r}")
    if not 0.0 <= options.min_box_side < 1.0:
        raise CocoError(f"--min-box-side must be in [0, 1), got {options.min_box_side}")
    for flag, value in (("--max-instances", options.max_instances), ("--max-images", options.max_images)):
        if value < 0:
            raise CocoError(f"{flag} must be >= 0 (0 = no limit), got {value}")
    if not Path(images).is_dir():
        raise CocoError(f"--images {os.fspath(images)!r}: no such folder")
    out = Path(out)
    metadata = out / "metadata.jsonl"
    if metadata.exists() and not options.overwrite:
        raise CocoError(f"--out {os.fspath(out)!r} already holds metadata.jsonl; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise CocoError(f"--out {os.fspath(out)!r} is a file, expected a folder")
    if Path(images).resolve() == out.resolve():
        raise CocoError("--out must differ from --images (the images would be copied onto themselves)")

    lines, stats = build_lines(_load_json(instances, "--instances"), _load_json(captions, "--captions"), images,
                               options, f"--instances {os.fspath(instances)!r}", f"--captions {os.fspath(captions)!r}")
    if not lines:
        raise CocoError(f"no image left to write ({stats.summary()})")
    out.mkdir(parents=True, exist_ok=True)
    for source, line in lines:
        try:
            _place(source, out / line["file_name"], options.link_mode)
        except OSError as e:
            raise CocoError(f"--link {options.link_mode}: cannot place {source!r} in --out: {e}") from None
    tmp = out / "metadata.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for _, line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, metadata)
    return stats
