"""Publish: where the adapter benchmark's results go (the JSON, the plot, the table in docs/efficiency.md).

Writes what ``adapter_measure.py`` measured and ``adapter_report.py`` made of it; computes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from adapter_report import plot, table

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
JSON_PATH = RESULTS / "adapter_cpu.json"
PNG_PATH = RESULTS / "adapter_cpu.png"
DOC_PATH = REPO / "docs" / "efficiency.md"
TABLE_BEGIN = "<!-- adapter-table:begin (bench_adapter.py --report writes this) -->"
TABLE_END = "<!-- adapter-table:end -->"


def write_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def doc_target(json_path: str | Path, quick: bool) -> Path | None:
    """The docs table is written from the committed results only, not from a quick or elsewhere-saved run."""
    return DOC_PATH if Path(json_path).resolve() == JSON_PATH.resolve() and not quick else None


def publish(doc: dict, png: Path, doc_path: Path | None) -> None:
    """The plot to ``png`` and, with ``doc_path``, the tables between its markers."""
    plot(doc, png)
    print(f"wrote {png}")
    if doc_path is None:
        return
    text = doc_path.read_text() if doc_path.exists() else ""
    if TABLE_BEGIN not in text or TABLE_END not in text:
        raise SystemExit(f"{doc_path} has no {TABLE_BEGIN!r} ... {TABLE_END!r} markers to write the table between")
    before, rest = text.split(TABLE_BEGIN, 1)
    _, after = rest.split(TABLE_END, 1)
    doc_path.write_text(before + TABLE_BEGIN + "\n" + table(doc, JSON_PATH.name) + "\n" + TABLE_END + after)
    print(f"wrote the table in {doc_path}")
