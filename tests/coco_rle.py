"""COCO RLE encoders for tests (the decoders under test are in roi_ops/roictrl_adapter/regions.py)."""

from __future__ import annotations

import numpy as np


def rle_runs(mask) -> list[int]:
    """COCO's uncompressed RLE of a 2-D bool array: column-major run lengths, starting with a run of 0s."""
    flat = np.asarray(mask, dtype=bool).T.flatten()
    runs, cur, n = [], False, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return runs


def rle_string(runs) -> str:
    """pycocotools' compressed counts string (rleToString) of ``runs`` (the decoder is regions._decode_counts)."""
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)
