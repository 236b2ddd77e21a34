"""Write the synthetic world as a ``roi-ops train`` data folder: PNG images + ``metadata.jsonl``.

    python -m benchmarks.instance_control.make_dataset --out /tmp/shapes --num-samples 2000

Sample ``i`` is ``world.train_layout(i, seed)`` rendered at ``--resolution`` (the toy benchmark's training data,
quantised to 8-bit PNG): ``images/<i>.png``, its global caption as the prompt and one instance per object (box in
normalised xyxy, caption "a <colour> <shape>"). The held-out evaluation layouts (``world.eval_layouts``) use seeds
disjoint from these.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from . import world


def write_dataset(out: str, num_samples: int, seed: int = 0, resolution: int = 32, start: int = 0) -> str:
    """Write ``num_samples`` training layouts (indices ``start``...) to ``out``; returns ``out``."""
    from PIL import Image

    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    with open(os.path.join(out, "metadata.jsonl"), "w") as f:
        for i in range(start, start + num_samples):
            layout = world.train_layout(i, seed)
            pixels = np.round(world.render(layout, resolution).transpose(1, 2, 0) * 255).astype(np.uint8)
            name = f"images/{i:06d}.png"
            Image.fromarray(pixels).save(os.path.join(out, name))
            f.write(json.dumps({"file_name": name, "prompt": layout.caption,
                                "instances": layout.as_pipeline_instances()}) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=32)
    args = p.parse_args(argv)
    write_dataset(args.out, args.num_samples, args.seed, args.resolution)
    print(f"wrote {args.num_samples} images and metadata.jsonl to {args.out}")


if __name__ == "__main__":
    main()
