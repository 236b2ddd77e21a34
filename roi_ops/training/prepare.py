"""``roi-ops prepare``: convert existing datasets to the training format (an image folder with metadata.jsonl).

    roi-ops prepare coco --instances instances_val2017.json --captions captions_val2017.json \
        --images val2017 --out coco_roictrl

The rules (crowd, tiny and surplus boxes, images without instances or captions, missing images) are in
docs/training.md, "From COCO", and in ``roi-ops prepare coco --help``.
"""

from __future__ import annotations

import argparse
import functools
import sys

from roi_ops.cli import fail

COCO_HELP = """\
Output: OUT/metadata.jsonl, one line per image,
  {"file_name": "000000000139.jpg", "prompt": "<caption>", "instances": [{"box": [x1, y1, x2, y2], "caption": "<category>"}]}
boxes normalised to [0, 1] of the image's width/height, xyxy (the layout JSON's defaults), and the images at
their COCO file_name under OUT. The prompt is the image's caption with the lowest annotation id. Crowd boxes,
boxes thinner than --min-box-side and images left without instances or without a caption are skipped and
counted; a missing or unreadable image is an error unless --skip-bad-images. With --masks every instance also
gets its segmentation as "mask": polygons normalised like the boxes, RLEs (crowd regions) as COCO stores them.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "prepare", help="convert a dataset (COCO) to the training format of roi-ops train",
        description="Convert an existing dataset to an image folder with metadata.jsonl (docs/training.md).",
    )
    sub = p.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    c = sub.add_parser(
        "coco", help="COCO instances + captions JSON and an image folder",
        description="Convert COCO detection boxes and captions: each box gets its category name as the caption, "
        "an image caption becomes the prompt.",
        epilog=COCO_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--instances", required=True, help="COCO instances JSON (e.g. instances_val2017.json)")
    c.add_argument("--captions", required=True, help="COCO captions JSON (e.g. captions_val2017.json)")
    c.add_argument("--images", required=True, help="folder of the split's images (e.g. val2017)")
    c.add_argument("--out", required=True, help="output folder (created); gets metadata.jsonl and the images")
    c.add_argument("--link", choices=("copy", "symlink", "hardlink"), default="copy",
                   help="how images get into --out (default copy: the folder stands alone)")
    c.add_argument("--max-instances", type=int, default=10,
                   help="instances per image; the largest by area are kept (default 10, 0 = no limit)")
    c.add_argument("--min-box-side", type=float, default=0.02,
                   help="drop boxes whose width or height is below this fraction of the image's (default 0.02)")
    c.add_argument("--keep-crowd", action="store_true", help="keep iscrowd boxes as ordinary instances")
    c.add_argument("--keep-empty", action="store_true",
                   help='keep images left without instances (written with "instances": [])')
    c.add_argument("--skip-bad-images", action="store_true",
                   help="skip and count missing or unreadable images instead of stopping at the first")
    c.add_argument("--max-images", type=int, default=0, help="convert only the first N images by id (0 = all)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing OUT/metadata.jsonl")
    c.add_argument("--masks", action="store_true",
                   help="write each instance's segmentation (polygon or RLE) as its mask (off: boxes only; "
                   "the metadata grows several times over)")
    c.set_defaults(func=run_coco)
    return p


_fail = functools.partial(fail, "prepare")


def run_coco(args: argparse.Namespace) -> int:
    from .coco import CocoError, CocoOptions, convert_coco

    options = CocoOptions(
        min_box_side=args.min_box_side, max_instances=args.max_instances, keep_crowd=args.keep_crowd,
        keep_empty=args.keep_empty, skip_bad_images=args.skip_bad_images, link_mode=args.link,
        max_images=args.max_images, overwrite=args.overwrite, masks=args.masks,
    )
    try:
        stats = convert_coco(args.instances, args.captions, args.images, args.out, options)
    except CocoError as e:
        return _fail(str(e))
    except OSError as e:  # e.g. the output folder cannot be created or the disk is full
        return _fail(f"--out {args.out!r}: {e}")
    print(f"wrote {args.out}/metadata.jsonl: {stats.summary()}")
    for path in stats.bad_images[:5]:
        print(f"  skipped image: {path}", file=sys.stderr)
    if len(stats.bad_images) > 5:
        print(f"  ... and {len(stats.bad_images) - 5} more", file=sys.stderr)
    return 0
