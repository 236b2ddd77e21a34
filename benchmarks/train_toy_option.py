"""Retrain the toy benchmark's ROICtrl adapter with extra architecture options (issue 19's inexact options).

    python benchmarks/train_toy_option.py guidance_kv_pool=2 -- --out <scratch copy of
        benchmarks/instance_control/checkpoints> --threads 1 --stages roictrl --grid-policy footprint

Everything after ``--`` goes to ``python -m benchmarks.instance_control.train`` unchanged; the options before it
(``name=int``, ``name=str``) are added to the adapter that stage builds, so the run is the stage's own recipe
(data, seed, steps, noise) with only those options changed. The saved ``roictrl/config.json`` records them, and
``python -m benchmarks.instance_control.evaluate --ckpt <that copy> --methods roictrl`` scores it.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_options(items: list[str]) -> dict:
    from roi_ops.roictrl_adapter.options import ArchitectureOptions

    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in ArchitectureOptions.names():
            raise SystemExit(f"options must be name=value with a name in {list(ArchitectureOptions.names())}, "
                             f"got {item!r}")
        options[name] = int(value) if value.lstrip("-").isdigit() else value
    ArchitectureOptions(**options)  # the option's own check, before minutes of training
    return options


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit(__doc__)
    split = argv.index("--")
    options, train_args = parse_options(argv[:split]), argv[split + 1:]
    sys.path.insert(0, str(REPO))
    from benchmarks.instance_control import train

    make = train.make_roictrl_adapter
    train.make_roictrl_adapter = lambda unet, seed, grid_policy="fixed": _rebuilt(make(unet, seed, grid_policy),
                                                                                  options)
    train.main(train_args)


def _rebuilt(adapter, options: dict):
    """``adapter`` with ``options`` changed, its weights copied (the stage's seeded init kept bit for bit)."""
    import torch

    state = torch.get_rng_state()  # building the copy draws init weights: leave the stage's RNG where it was
    new = type(adapter)(adapter.specs, adapter.position_dim, adapter.fourier_freqs, adapter.position_hidden_dim,
                        adapter.ff_mult, **{**adapter.options.to_dict(), **options})
    torch.set_rng_state(state)
    new.load_state_dict(adapter.state_dict())
    return new.to(next(adapter.parameters()).dtype)


if __name__ == "__main__":
    main()
