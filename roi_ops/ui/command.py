"""``roi-ops ui``: serve the page of :mod:`roi_ops.ui.app` for one model and adapter (docs/ui.md).

The arguments are checked, then the model loads once, then the server starts; it binds 127.0.0.1 unless
``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import os
import sys

from roi_ops.cli import fail

_fail = functools.partial(fail, "ui")
LOOPBACK = "127.0.0.1"


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, 65535], got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, 65535], got {port}")
    return port


def add_parser(subparsers) -> argparse.ArgumentParser:
    from roi_ops.roictrl_adapter.generate import DTYPES

    p = subparsers.add_parser(
        "ui",
        help="a local web page: draw boxes, caption them, generate (needs the [ui] extra: Gradio)",
        description="Serve a web page (Gradio) to draw a layout of boxes with captions, generate its image with a "
        "ROICtrl adapter, see the boxes overlay and the blend maps, and import / export layout JSON files of "
        "roi-ops generate. Also serves the API endpoint /generate (prompt, layout JSON, seed, steps -> image). "
        "The model loads once; requests run one at a time. Needs: pip install 'roi-ops[ui]'.",
    )
    p.add_argument("--model", required=True, help="diffusers folder of an SD1.x/SD2.x/SDXL checkpoint")
    p.add_argument("--adapter", required=True, help="ROICtrl adapter folder or the official release file (as "
                   "roi-ops generate --adapter)")
    p.add_argument("--host", default=LOOPBACK, help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0 serves the network, without authentication)")
    p.add_argument("--port", type=_port, default=7860, help="port (default 7860)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=DTYPES, help="default: float16 on cuda, float32 on cpu")
    p.set_defaults(func=run)
    return p


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: no usage reports sent out
    try:
        import gradio  # noqa: F401
    except ImportError:
        return _fail("roi-ops ui needs Gradio: pip install 'roi-ops[ui]' (or pip install gradio)")
    import torch

    from roi_ops.roictrl_adapter.adapter import check_adapter_path

    if not os.path.isdir(args.model):
        return _fail(f"--model {args.model!r}: no such folder (a diffusers checkpoint folder; roi-ops ui reads "
                     "local folders only)")
    if not os.path.exists(args.adapter):
        return _fail(f"--adapter {args.adapter!r}: no such file or folder")
    try:
        check_adapter_path(args.adapter)
    except (ValueError, FileNotFoundError) as e:
        return _fail(f"--adapter: {e}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda but no CUDA device is available")
    dtype = getattr(torch, args.dtype or ("float16" if device == "cuda" else "float32"))
    if not _is_loopback(args.host):
        print(f"roi-ops ui: warning: --host {args.host} serves the page beyond this machine, to anyone who can "
              "reach it, without authentication", file=sys.stderr)

    from .app import build_app, launch
    from .engine import Engine

    try:
        engine = Engine.load(args.model, args.adapter, device, dtype)
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        return _fail(f"cannot load the model: {e}")
    print(f"roi-ops ui: model {args.model} and adapter {args.adapter} loaded on {device} ({dtype}); images "
          f"{engine.width} x {engine.height}", file=sys.stderr)
    app = build_app(engine)
    try:
        launch(app, args.host, args.port)
    except OSError as e:  # the port is taken, or the address cannot be bound
        return _fail(f"cannot serve on {args.host}:{args.port}: {e}")
    return 0
