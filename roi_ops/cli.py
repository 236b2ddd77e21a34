"""The ``roi-ops`` command line (console script ``roi-ops``, or ``python -m roi_ops.cli``).

Each subcommand lives in its own module, which exposes ``add_parser(subparsers)``: it adds its parser and calls
``set_defaults(func=...)`` with the function that runs it (``func(args) -> int`` exit status). Adding a
subcommand is one line in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Modules providing one subcommand each (imported when the parser is built; heavy imports stay inside them).
SUBCOMMANDS = [
    "roi_ops.roictrl_adapter.generate",
    "roi_ops.roictrl_adapter.convert",
    "roi_ops.training.prepare",
    "roi_ops.training.train",
    "roi_ops.ui.command",
]


def fail(command: str, message: object) -> int:
    """The subcommands' error contract: ``roi-ops COMMAND: error: MESSAGE`` as one line on stderr (runs of
    whitespace, newlines included, collapse to one space), and exit status 2 returned."""
    print(f"roi-ops {command}: error: {' '.join(str(message).split())}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="roi-ops", description="roi-ops command line: ROICtrl instance-controlled generation and tools."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the subcommand; returns its exit status."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
