"""Instance masks (the adapter's *regions*): reading them, resizing them to the image, their bounding boxes.

The forms a mask may take (docs/pipeline.md, "Mask-shaped instances"):

* in Python: a 2-D ``numpy`` array or ``torch`` tensor, bool or floating with values in ``[0, 1]`` (an integer
  array of 0s and 1s too), or a PIL image (mode ``"1"`` is bool, others are read as grey levels / 255);
* in a layout JSON file or a dataset line: a PNG path relative to the file, a COCO RLE
  ``{"size": [h, w], "counts": ...}`` (compressed string or list of run lengths), or a COCO polygon list
  ``[[x1, y1, x2, y2, ...], ...]`` in the layout's ``box_units`` (rasterised once the image size is known).

Every error names the instance (``where``). Masks are kept as float32 numpy arrays; :func:`to_image` resizes one
to the image (nearest for 0/1 masks, antialiased bilinear for soft ones).
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["Polygon", "read_mask", "decode_rle", "rle_runs", "to_image", "mask_box", "is_mask_like"]

#: Largest side of a mask in pixels (the image's limit).
MAX_MASK_SIDE = 8192


@dataclass(frozen=True)
class Polygon:
    """A COCO polygon mask, rasterised by :func:`to_image` once the image size is known: ``rings`` of
    ``(x, y)`` points in ``units`` (``"normalized"`` or ``"pixels"``), filled with the even-odd rule."""

    rings: tuple[tuple[tuple[float, float], ...], ...]
    units: str = "normalized"


def is_mask_like(value: object) -> bool:
    """Whether ``value`` has the type of a Python mask (array, tensor or PIL image)."""
    return isinstance(value, (np.ndarray, torch.Tensor)) or _is_pil(value)


def _is_pil(value: object) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL comes with diffusers
        return False
    return isinstance(value, Image.Image)


def _check_array(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{where} must be a 2-D (height x width) mask, got an array of shape {list(arr.shape)}")
    if min(arr.shape) < 1 or max(arr.shape) > MAX_MASK_SIDE:
        raise ValueError(f"{where} must be 1 to {MAX_MASK_SIDE} pixels a side, got {list(arr.shape)}")
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        if not np.isin(arr, (0, 1)).all():
            raise ValueError(
                f"{where} is an integer array with values other than 0 and 1; pass a bool array, or floats in "
                "[0, 1] for a soft mask"
            )
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{where} must be bool or floating point, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
        raise ValueError(
            f"{where} must hold values in [0, 1] (a soft mask), got values in [{np.nanmin(arr):g}, {np.nanmax(arr):g}]"
            + ("" if np.isfinite(arr).all() else " and non-finite ones")
        )
    return arr


def _from_pil(image: Any, where: str) -> np.ndarray:
    if image.mode == "1":
        return _check_array(np.asarray(image, dtype=bool), where)
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return _check_array(grey, where)


def rle_runs(rle: dict, where: str = "mask") -> tuple[int, int, list[int]]:
    """Check a COCO RLE ``{"size": [h, w], "counts": ...}`` and return ``(h, w, runs)``, its run lengths
    (column-major, starting with a run of 0s), without rasterising it: the cheap check of a dataset line."""
    size, counts = rle.get("size"), rle.get("counts")
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"{where} RLE size must be [height, width] (positive integers), got {size!r}")
    h, w = int(size[0]), int(size[1])
    if max(h, w) > MAX_MASK_SIDE:
        raise ValueError(f"{where} RLE size must be at most {MAX_MASK_SIDE} a side, got {[h, w]}")
    if isinstance(counts, str):
        runs = _decode_counts(counts, where)
    elif isinstance(counts, list) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in counts
    ):
        runs = [int(v) for v in counts]
    else:
        raise ValueError(f"{where} RLE counts must be a string or a list of non-negative integers, got {counts!r}"[:300])
    if sum(runs) != h * w:
        raise ValueError(f"{where} RLE counts add up to {sum(runs)} pixels but size {[h, w]} has {h * w}")
    return h, w, runs


def decode_rle(rle: dict, where: str = "mask") -> np.ndarray:
    """A COCO RLE ``{"size": [h, w], "counts": ...}`` as a float32 ``[h, w]`` array of 0s and 1s. ``counts`` is a
    list of run lengths (uncompressed RLE) or the compressed string of ``pycocotools`` (column-major runs,
    starting with a run of 0s, as COCO stores them)."""
    h, w, runs = rle_runs(rle, where)
    flat = np.zeros(h * w, dtype=np.float32)
    pos = 0
    for i, run in enumerate(runs):
        if i % 2:
            flat[pos:pos + run] = 1
        pos += run
    return flat.reshape(w, h).T.copy()  # COCO runs are column-major


def _decode_counts(s: str, where: str) -> list[int]:
    """pycocotools' compressed counts: 5 bits per character (offset 48), continuation bit 0x20, sign bit 0x10 on
    the last character; from the third run on, each run is stored as the difference to the run two before."""
    runs: list[int] = []
    i = 0
    while i < len(s):
        x, k, more = 0, 0, True
        while more:
            if i >= len(s):
                raise ValueError(f"{where} RLE counts string ends inside a number")
            c = ord(s[i]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"{where} RLE counts string has a character outside the COCO alphabet: {s[i]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            i += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        if x < 0:
            raise ValueError(f"{where} RLE counts string decodes to a negative run")
        runs.append(x)
    return runs


def _polygon(value: list, where: str, units: str) -> Polygon:
    rings = []
    for j, ring in enumerate(value):
        if (
            not isinstance(ring, (list, tuple))
            or len(ring) < 6
            or len(ring) % 2
            or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in ring)
        ):
            raise ValueError(
                f"{where} polygon {j} must be a list of at least 3 points [x1, y1, x2, y2, ...] (numbers), "
                f"got {str(ring)[:80]}"
            )
        pts = tuple((float(ring[i]), float(ring[i + 1])) for i in range(0, len(ring), 2))
        if not all(math.isfinite(v) for p in pts for v in p):
            raise ValueError(f"{where} polygon {j} must have finite coordinates")
        rings.append(pts)
    return Polygon(tuple(rings), units)


def _short_path(value: Any) -> str:
    text = repr(os.fspath(value))
    return text if len(text) <= 80 else text[:77] + "..."


def read_mask(value: Any, where: str, base_dir: str | os.PathLike | None = None, units: str = "normalized"):
    """The mask ``value`` of instance ``where`` as a float32 ``[h, w]`` array in ``[0, 1]``, or a
    :class:`Polygon` (rasterised later by :func:`to_image`). ``base_dir`` is where relative PNG paths start
    (the layout file's folder; ``None``, for layouts that come from no file, refuses paths); ``units`` the coordinates of a polygon (the layout's ``box_units``)."""
    if isinstance(value, torch.Tensor):
        return _check_array(value.detach().cpu().numpy(), where)
    if isinstance(value, np.ndarray):
        return _check_array(value, where)
    if _is_pil(value):
        return _from_pil(value, where)
    if isinstance(value, Polygon):
        return value
    if isinstance(value, (str, os.PathLike)):
        if base_dir is None:
            # Only a layout file may name a file (relative to its folder): a layout from a browser or an API call
            # must never make the server read one of its own paths.
            raise ValueError(
                f"{where} is a path ({_short_path(value)}); a PNG path is only read from a layout file (relative to "
                "its folder); here give the mask as an array, a tensor, a PIL image, a COCO RLE or a COCO polygon"
            )
        path = os.fspath(value)
        if not os.path.isabs(path):
            path = os.path.join(os.fspath(base_dir), path)
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image.load()
                return _from_pil(image, where)
        except FileNotFoundError:
            raise ValueError(f"{where} PNG {os.fspath(value)!r}: no such file ({path})") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{where} PNG {os.fspath(value)!r} cannot be read as an image: {e}") from None
    if isinstance(value, dict):
        if set(value) >= {"size", "counts"}:
            return decode_rle(value, where)
        raise ValueError(f"{where} as an object must be a COCO RLE {{\"size\": [h, w], \"counts\": ...}}, got keys "
                         f"{sorted(value)}")
    if isinstance(value, (list, tuple)) and value and all(isinstance(r, (list, tuple)) for r in value):
        return _polygon(list(value), where, units)
    raise TypeError(
        f"{where} must be a bool/float numpy array, a torch tensor, a PIL image, a PNG path, a COCO RLE "
        f"{{\"size\", \"counts\"}} or a COCO polygon list [[x1, y1, x2, y2, ...], ...]; got {type(value).__name__}"
    )


def _rasterize(poly: Polygon, height: int, width: int) -> np.ndarray:
    """The pixels whose centre lies inside the polygon (even-odd rule over all rings). Each edge only visits the
    rows it crosses (a COCO polygon at 640 px: about 1 ms, not 50 ms for every edge over the whole image)."""
    sx, sy = (width, height) if poly.units == "normalized" else (1.0, 1.0)
    ys = np.arange(height, dtype=np.float64) + 0.5
    xs = np.arange(width, dtype=np.float64) + 0.5
    inside = np.zeros((height, width), dtype=bool)
    for ring in poly.rings:
        pts = np.asarray(ring, dtype=np.float64) * (sx, sy)
        x0, y0 = pts[:, 0], pts[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        for a, b, c, d in zip(x0, y0, x1, y1):
            if b == d:
                continue
            rows = np.nonzero((ys >= min(b, d)) & (ys < max(b, d)))[0]
            if rows.size == 0:
                continue
            x_at = a + (ys[rows] - b) * (c - a) / (d - b)
            inside[rows] ^= xs[None, :] < x_at[:, None]
    return inside.astype(np.float32)


def to_image(mask, height: int, width: int) -> np.ndarray:
    """``mask`` (an array from :func:`read_mask` or a :class:`Polygon`) at the image size: float32
    ``[height, width]``; 0/1 masks by nearest neighbour, soft ones by antialiased bilinear resampling."""
    if isinstance(mask, Polygon):
        return _rasterize(mask, height, width)
    if mask.shape == (height, width):
        return mask
    binary = bool(np.isin(mask, (0.0, 1.0)).all())
    t = torch.from_numpy(np.ascontiguousarray(mask))[None, None]
    if binary:
        out = torch.nn.functional.interpolate(t, size=(height, width), mode="nearest-exact")
    else:
        out = torch.nn.functional.interpolate(t, size=(height, width), mode="bilinear", align_corners=False,
                                              antialias=True).clamp(0, 1)
    return out[0, 0].numpy()


def mask_box(mask: np.ndarray, where: str) -> tuple[float, float, float, float]:
    """The normalised ``(x1, y1, x2, y2)`` bounding box of the nonzero pixels (their pixel edges)."""
    ys, xs = np.nonzero(mask > 0)
    if ys.size == 0:
        raise ValueError(f"{where} is empty (no pixel above 0), so it gives no box; give a box or a non-empty mask")
    h, w = mask.shape
    return (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)
