"""The adapter wing's structure (issue 18): the pipeline reads no private adapter or block state, and no module
of roi_ops.roictrl_adapter imports one that imports it back (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "roi_ops" / "roictrl_adapter"


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_pipeline_reads_no_private_adapter_or_block_state():
    """Private attributes are read only on the pipeline's own objects (``self``) and on the wrapped diffusers
    pipeline (``self.pipe``); nothing private is imported from the adapter's modules, and the blocks' old
    blend-map stash is gone."""
    tree = _tree(PACKAGE / "pipeline.py")
    private, imported = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = node.attr
            if name.startswith("_") and not name.startswith("__") and ast.unparse(node.value) not in ("self",
                                                                                                      "self.pipe"):
                private.append(f"line {node.lineno}: {ast.unparse(node)}")
            if name in ("blend_logits", "keep_blend_logits", "_states"):
                private.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and node.level >= 1:
            imported += [f"line {node.lineno}: {a.name}" for a in node.names if a.name.startswith("_")]
    assert private == [], private
    assert imported == [], imported
