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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)  # "" for the package itself


def _imports() -> dict[str, set[str]]:
    """``{module: modules of roi_ops.roictrl_adapter it imports}``, at any depth of its code (function-level and
    ``TYPE_CHECKING`` imports included), names relative to the package (``official.weights``, ``adapter``...)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".") if name else []
        edges = set()
        for node in ast.walk(_tree(path)):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)] if node.level > 1 else list(package)
                    stem = base + (node.module.split(".") if node.module else [])
                elif node.module and node.module.startswith("roi_ops.roictrl_adapter"):
                    stem = node.module.split(".")[2:]
                else:
                    continue
                targets.append(".".join(stem))
                targets += [".".join(stem + [a.name]) for a in node.names]  # "from . import official"
            elif isinstance(node, ast.Import):
                targets += [a.name.split(".", 2)[2] for a in node.names if a.name.startswith("roi_ops.roictrl_adapter.")]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circle_in_the_adapter_wing():
    """No module of the package imports one that imports it back, and, with the official release's room
    (``official/``) seen as one node, the adapter and the official room do not import each other either way
    round: the room sits below the adapter (the adapter imports it, it never imports the adapter)."""
    graph = _imports()
    assert "official" in graph and "adapter" in graph
    assert _cycles({k: v for k, v in graph.items() if k}) == []  # the package __init__ imports everything

    def room(name):
        return "official" if name == "official" or name.startswith("official.") else name

    rooms: dict[str, set[str]] = {}
    for name, edges in graph.items():
        if name:
            rooms.setdefault(room(name), set()).update(room(e) for e in edges if room(e) != room(name))
    assert _cycles(rooms) == []
    assert "adapter" not in rooms["official"] and "official" in rooms["adapter"]
    # only leaves below it: the option table and the weights validation (the finite-weights check)
    assert rooms["official"] <= {"options", "validation"}, rooms["official"]
    assert rooms["validation"] <= {"options"}, rooms["validation"]


def test_the_official_room_imports_first_in_a_fresh_interpreter():
    import subprocess
    import sys

    code = ("import roi_ops.roictrl_adapter.official as o, roi_ops.roictrl_adapter.convert as c; "
            "from roi_ops.roictrl_adapter import ROICtrlAdapter, OFFICIAL_CONFIG; "
            "assert o.OFFICIAL_CONFIG is OFFICIAL_CONFIG and c.ROICtrlAdapter is ROICtrlAdapter")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
