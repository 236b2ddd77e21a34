"""Train a ROICtrl adapter on the synthetic world of coloured shapes: a worked example of ``roi-ops train``.

Only the adapter learns; the UNet, VAE and text encoder stay frozen; ``L = L_LDM + 0.01 * L_reg``. The example
writes the toy benchmark's training layouts (``benchmarks/instance_control/world.py``: 1-6 coloured shapes, each
with its box and a caption such as "a red circle", the global caption listing them all) as an image folder with a
``metadata.jsonl``, then runs ``roi-ops train`` on it with the committed 32 px toy model. Every flag it does not
know is passed on to ``roi-ops train`` (docs/training.md).

    python examples/train_roictrl.py --output-dir runs/roictrl --max-steps 400 --learning-rate 1e-3

    # several processes, the same script (Accelerate reads torchrun's / accelerate's environment)
    torchrun --nproc-per-node 2 examples/train_roictrl.py --output-dir runs/roictrl-ddp --max-steps 200
    accelerate launch --num_processes 2 examples/train_roictrl.py --output-dir runs/roictrl-ddp --max-steps 200

    # continue from the newest checkpoint-<step>/ in --output-dir
    python examples/train_roictrl.py --output-dir runs/roictrl --max-steps 800 --resume

    # another SD-format model folder on disk (the images are then resized to its --resolution)
    python examples/train_roictrl.py --model /path/to/sd15 --resolution 512 --output-dir runs/sd15

Outputs (``roi-ops train``'s): ``<output-dir>/checkpoint-<step>/``, ``<output-dir>/adapter/`` (``load_adapter``
reads it), ``<output-dir>/train_log.jsonl``; the data folder is ``<output-dir>/data`` unless ``--data`` says.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_MODEL = os.path.join(ROOT, "benchmarks", "instance_control", "checkpoints", "model")


def write_world(data: str, num_samples: int, seed: int, resolution: int) -> str:
    """The world's first ``num_samples`` training layouts as a data folder at ``data`` (kept if already there).
    Written to a temporary folder and renamed, so concurrent processes of one launch never read half a folder."""
    if os.path.isfile(os.path.join(data, "metadata.jsonl")):
        return data
    sys.path.insert(0, ROOT)
    from benchmarks.instance_control.make_dataset import write_dataset

    parent = os.path.dirname(os.path.abspath(data))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".data-", dir=parent)
    write_dataset(tmp, num_samples, seed, resolution)
    try:
        os.rename(tmp, data)
    except OSError:  # another process of the launch was first: same content
        shutil.rmtree(tmp, ignore_errors=True)
    return data


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--model", default=TOY_MODEL, help="diffusers model folder (default: the committed toy model)")
    p.add_argument("--data", help="data folder to write/read (default: <output-dir>/data)")
    p.add_argument("--num-samples", type=int, default=2000, help="layouts in the data folder (default 2000)")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the world's layouts")
    p.add_argument("--world-resolution", type=int, default=32, help="side of the rendered images (default 32)")
    args, rest = p.parse_known_args(argv)
    data = write_world(args.data or os.path.join(args.output_dir, "data"), args.num_samples, args.world_seed,
                       args.world_resolution)
    from roi_ops.cli import main as cli

    return cli(["train", "--model", args.model, "--data", data, "--output-dir", args.output_dir, *rest])


if __name__ == "__main__":
    sys.exit(main())
