"""Retrain the toy benchmark's ROICtrl adapter with extra architecture options (issue 19's inexact options).

    python benchmarks/train_toy_option.py guidance_kv_pool=2 -- --out <scratch copy of
        benchmarks/instance_control/checkpoints> --threads 1 --stages roictrl --grid-policy footprint

Everything after ``--`` goes to ``python -m benchmarks.instance_control.train`` unchanged; the options before it
(``name=int``, ``name=true|false``, ``name=str``) are added to the adapter that stage builds, so the run is the stage's own recipe
(data, seed, steps, noise) with only those options changed. The saved ``roictrl/config.json`` records them, and
``python -m benchmarks.instance_control.evaluate --ckpt <that copy> --methods roictrl`` scores it.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:  # bench_step sits beside this file
    sys.path.insert(0, str(HERE))


def parse_options(items: list[str]) -> dict:
    from bench_step import parse_overrides

    from roi_ops.roictrl_adapter.options import ArchitectureOptions

    for item in items:
        name, sep, _ = item.partition("=")
        if not sep or name not in (*ArchitectureOptions.names(), "ff_mult"):
            raise SystemExit(f"options must be name=value with a name in {list(ArchitectureOptions.names())} or "
                             f"ff_mult, got {item!r}")
    options = parse_overrides(",".join(items))
    ArchitectureOptions(**{k: v for k, v in options.items() if k != "ff_mult"})  # checked before minutes of training
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
    train.make_roictrl_adapter = lambda *args, **kwargs: _rebuilt(make(*args, **kwargs), options)
    train.main(train_args)


def _rebuilt(adapter, options: dict):
    """``adapter`` with ``options`` changed, its weights copied (the stage's seeded init kept bit for bit). Weights an
    option removes (the feed-forward of ``guidance_feed_forward=False``) are left out; weights an option adds or
    reshapes (``guidance_keys="positions"``, ``ff_mult``) keep their own init, drawn after the RNG state is saved."""
    import torch
    from bench_step import load_shared_weights

    state = torch.get_rng_state()  # building the copy draws init weights: leave the stage's RNG where it was
    options = dict(options)
    ff_mult = options.pop("ff_mult", adapter.ff_mult)
    new = type(adapter)(adapter.specs, adapter.position_dim, adapter.fourier_freqs, adapter.position_hidden_dim,
                        ff_mult, **{**adapter.options.to_dict(), **options})
    torch.set_rng_state(state)
    missing = load_shared_weights(new, adapter)
    if missing:
        print(f"options {options}: {len(missing)} new weights keep their own init (e.g. {missing[0]})", flush=True)
    return new.to(next(adapter.parameters()).dtype)


if __name__ == "__main__":
    main()
